"""σ of every tensor of a safetensors checkpoint, with a histogram.

The script first writes a checkpoint, as a training run would: a small transformer encoder
from ``torch.nn`` (embeddings, attention and feed-forward weights, LayerNorms, and an
integer ``position_ids`` buffer as Hugging Face models carry), saved with
``safetensors.torch.save_file``. It then measures it exactly as ``lipnorm sigma
model.safetensors --json`` does, through :func:`lipnorm.cli.main`, and plots the
distribution of σ over the weight matrices.

Run::

    python examples/checkpoint_sigma_histogram.py            # 6 layers, d_model 256
    python examples/checkpoint_sigma_histogram.py --fast     # 2 layers, d_model 64 (CI)
    python examples/checkpoint_sigma_histogram.py --plot sigma_histogram.png

The same from the shell, on any checkpoint::

    lipnorm sigma model.safetensors
    lipnorm sigma model.safetensors --json > sigmas.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from lipnorm.cli import main as lipnorm_command


def write_checkpoint(path: Path, layers: int, width: int, seed: int = 0) -> None:
    """Save a randomly initialized transformer encoder's state dict as safetensors."""
    torch.manual_seed(seed)
    model = nn.ModuleDict({
        "embeddings": nn.Embedding(1000, width),
        "encoder": nn.ModuleDict({"layers": nn.ModuleList(
            nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width, batch_first=True)
            for _ in range(layers)
        )}),
    })
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    state["embeddings.position_ids"] = torch.arange(512).unsqueeze(0)  # an int64 buffer
    save_file(state, str(path))


def measure(path: Path) -> list[dict]:
    """The rows of ``lipnorm sigma PATH --json``; the skipped-tensor note goes to stderr."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = lipnorm_command(["sigma", str(path), "--json"])
    if code != 0:
        raise RuntimeError(f"lipnorm sigma {path} failed with exit code {code}")
    return json.loads(printed.getvalue())


def plot(rows: list[dict], path: str) -> None:
    """Histogram of σ over the measured tensors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sigmas = [row["sigma"] for row in rows]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    # Logarithmic bins: an embedding table's σ is tens of times a projection's.
    ax.hist(sigmas, bins=np.geomspace(min(sigmas) / 1.05, max(sigmas) * 1.05, 40),
            color="tab:blue", edgecolor="white")
    ax.set_xscale("log")
    ax.set_xlabel("σ_max of the tensor (lipnorm sigma), log scale")
    ax.set_ylabel("tensors")
    ax.set_title(f"{len(rows)} weight matrices of a transformer encoder checkpoint")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a 2-layer, width-64 model (for CI)")
    parser.add_argument("--checkpoint", default="model.safetensors", help="where to write it")
    parser.add_argument("--plot", metavar="PNG", help="write the histogram here")
    args = parser.parse_args(argv)
    path = Path(args.checkpoint)
    write_checkpoint(path, layers=2 if args.fast else 6, width=64 if args.fast else 256)
    rows = measure(path)
    print(f"{len(rows)} tensors measured in {path}")
    for row in sorted(rows, key=lambda row: -row["sigma"])[:5]:
        print(f"  {row['name']:<45} {'×'.join(map(str, row['shape'])):>10}  sigma {row['sigma']:.4f}")
    if args.plot:
        plot(rows, args.plot)
        print(f"histogram written to {args.plot}")
    return rows


if __name__ == "__main__":
    run()
