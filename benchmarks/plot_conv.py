"""Plot reshaped-kernel sigma and lipnorm's certified interval against the true conv norms.

Reads benchmarks/results/bench_conv.json (written by bench_conv.py) and writes
docs/img/conv_reshaped_vs_operator.png.

Run: ``PYTHONPATH=. python benchmarks/plot_conv.py``
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "benchmarks" / "results" / "bench_conv.json"
TARGET = ROOT / "docs" / "img" / "conv_reshaped_vs_operator.png"


def main():
    rows = json.loads(SOURCE.read_text())
    names = [r["layer"] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.axhline(1.0, color="black", lw=1, label="true operator norm (Lanczos)")
    ax.plot(x, [r["reshaped"] for r in rows], "o", color="tab:red", label="σ of reshaped kernel (torch / Keras SN)")
    ax.plot(x, [r["circular_no_stride"] for r in rows], "s", color="tab:gray", mfc="none",
            label="circular FFT, stride ignored")
    ax.plot(x, [r["svd"]["upper"] for r in rows], "v", color="tab:blue", label="lipnorm certified upper")
    ax.plot(x, [r["svd"]["lower"] for r in rows], "^", color="tab:green", label="lipnorm certified lower")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("value / true operator norm")
    ax.set_title("ResNet-18 convolutions at 224×224 (Kaiming init, zero padding)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylim(top=2.0)  # room above the markers for the legend
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    fig.tight_layout()
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(TARGET, dpi=120)
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
