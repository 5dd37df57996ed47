"""Training-step cost of spectral normalization in PyTorch: lipnorm vs torch's two implementations.

For each model, the same initial network is built once per variant (no SN, lipnorm matrix
mode, lipnorm operator mode, torch's parametrization SN, torch's legacy SN); one training
step is forward + backward + SGD step. Variants are timed side by side in one process,
interleaved step by step (the order rotates every round), and the median step time of each
is divided by the median of the model without SN. Peak memory is the maximum resident set
size (``ru_maxrss``) of a fresh subprocess that builds the model and runs a few steps; the
table gives it relative to the no-SN subprocess (the difference includes allocator noise).

Run ``python benchmarks/bench_torch_sn.py`` (``--quick`` for fewer repeats); the table is
written to ``benchmarks/results/bench_torch_sn.md``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.utils.parametrizations as torch_parametrizations
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lipnorm.backends.torch import spectral_norm  # noqa: E402

VARIANTS = ("none", "lipnorm matrix", "lipnorm operator", "torch parametrization", "torch legacy")
RESULTS = Path(__file__).resolve().parent / "results" / "bench_torch_sn.md"


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1))


def dcgan_discriminator() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 64, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(64, 128, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(128, 256, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(256, 1, 4, 1, 0), nn.Flatten())


class BasicBlock(nn.Module):
    """ResNet basic block without normalization layers (their cost is not the subject)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None

    def forward(self, x):
        out = self.conv2(torch.relu(self.conv1(x)))
        return torch.relu(out + (x if self.shortcut is None else self.shortcut(x)))


def resnet18_convs() -> nn.Module:
    """ResNet-18's 20 convolutions at CIFAR resolution (32x32 input), and a linear head."""
    layers = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.ReLU()]
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)]
    return nn.Sequential(*layers)


MODELS = {
    "MLP 1024-4096-4096-1, batch 64": (mlp, (64, 1024)),
    "MLP 1024-4096-4096-1, batch 8": (mlp, (8, 1024)),
    "DCGAN discriminator, 32x32, batch 64": (dcgan_discriminator, (64, 3, 32, 32)),
    "ResNet-18 convs, 32x32, batch 32": (resnet18_convs, (32, 3, 32, 32)),
}


def with_spectral_norm(model: nn.Module, variant: str) -> nn.Module:
    """Return a copy of ``model`` with every Linear/Conv normalized by ``variant``."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if variant == "lipnorm matrix":
            spectral_norm(module)
        elif variant == "lipnorm operator":
            spectral_norm(module, mode="operator" if isinstance(module, nn.Conv2d) else "matrix")
        elif variant == "torch parametrization":
            torch_parametrizations.spectral_norm(module)
        elif variant == "torch legacy":
            nn.utils.spectral_norm(module)
    return model


def make_step(model: nn.Module, x: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()

    return step


def variants_for(model_name: str) -> tuple[str, ...]:
    """Operator mode only differs from matrix mode on convolutions."""
    return VARIANTS if "MLP" not in model_name else tuple(v for v in VARIANTS if v != "lipnorm operator")


def time_model(model_name: str, repeats: int) -> dict[str, float]:
    """Median step time (seconds) per variant, interleaved side by side."""
    build, shape = MODELS[model_name]
    torch.manual_seed(0)
    base, x = build(), torch.randn(shape)
    names = variants_for(model_name)
    steps = {name: make_step(with_spectral_norm(base, name), x) for name in names}
    for step in steps.values():  # warm-up (operator mode infers u, v here)
        step()
        step()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_rss_mib(model_name: str, variant: str) -> float:
    """Max resident set size (MiB) of a fresh process running 3 steps of one variant."""
    out = subprocess.run([sys.executable, __file__, "--peak-memory", model_name, variant],
                         check=True, capture_output=True, text=True)
    return float(out.stdout.split()[-1])


def _peak_memory_child(model_name: str, variant: str) -> None:
    build, shape = MODELS[model_name]
    torch.manual_seed(0)
    step = make_step(with_spectral_norm(build(), variant), torch.randn(shape))
    for _ in range(3):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--peak-memory", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.peak_memory:
        _peak_memory_child(*args.peak_memory)
        return
    load_before = os.getloadavg()
    rows = []
    for model_name in MODELS:
        repeats = 4 if "ResNet" in model_name else 10
        if args.quick:
            repeats = max(3, repeats // 2)
        medians = time_model(model_name, repeats)
        memory = {name: peak_rss_mib(model_name, name) for name in variants_for(model_name)}
        rows.append((model_name, repeats, medians, memory))
        print(model_name, {k: f"{v / medians['none']:.2f}x" for k, v in medians.items()}, flush=True)
    load_after = os.getloadavg()
    args.output.write_text(render(rows, load_before, load_after))
    print(f"wrote {args.output}")


def render(rows, load_before, load_after) -> str:
    columns = VARIANTS[1:]
    lines = [
        "# Spectral normalization training-step cost (PyTorch, CPU)",
        "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        f"- python {platform.python_version()}, torch {torch.__version__}",
        f"- load average (1, 5, 15 min) before: {', '.join(f'{v:.1f}' for v in load_before)}; "
        f"after: {', '.join(f'{v:.1f}' for v in load_after)} (the machine is shared; other jobs ran)",
        "- step = forward + backward + SGD step; median over interleaved repeats; "
        "ratio = median step time / median step time without SN, same process",
        "- operator mode applies to convolutions (Linear layers use matrix mode, which is their operator norm)",
        "",
        "## Step time relative to no SN",
        "",
        "| model | repeats | no SN (ms) | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for model_name, repeats, medians, _ in rows:
        base = medians["none"]
        cells = [f"{medians[c] / base:.2f}x" if c in medians else "—" for c in columns]
        lines.append(f"| {model_name} | {repeats} | {base * 1e3:.1f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Peak memory (max RSS of a fresh process, 3 steps), MiB above no SN",
        "",
        "| model | no SN (MiB) | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for model_name, _, _, memory in rows:
        base = memory["none"]
        cells = [f"{memory[c] - base:+.0f}" if c in memory else "—" for c in columns]
        lines.append(f"| {model_name} | {base:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
