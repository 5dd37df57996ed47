"""Benchmark: the certificate ladder against the incumbents, side by side in one process.

Networks trained here on scikit-learn's digits (inputs /16; Adam, 60 epochs for the MLPs),
and ResNet-18 with random weights at 32×32 and 224×224. For each: the best lower bound
(lipnorm.lipschitz_lower_bound from the data, or Gaussian inputs), the product bound,
ECLipsE-Fast (eclipse-nn; MLPs of Linear/ReLU/tanh only — it assumes slopes in [0, 1],
not sound for GELU/SiLU, so it is not run there), LipSDP-Neuron through cvxpy + SCS
(its multipliers re-checked by lipnorm's exact test; capped), and each lipnorm method.

Run: PYTHONPATH=. python benchmarks/bench_tight.py [--quick] [--cvxpy-cap SECONDS]
Writes benchmarks/results/bench_tight.md and .json (``benchmarks/plot_tight.py`` draws
docs/img/certify_ladder.png from it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lipnorm  # noqa: E402
from cnn_nets import digits, train  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "bench_tight.md"
JSON = RESULTS.with_suffix(".json")
MLPS = [
    ("64-32-10 ReLU", [64, 32, 10], "relu"),
    ("64-64-64-10 tanh", [64, 64, 64, 10], "tanh"),
    ("64-128-128-10 ReLU", [64, 128, 128, 10], "relu"),
    ("64-256-256-256-10 ReLU", [64, 256, 256, 256, 10], "relu"),
    ("64-512-512-10 ReLU", [64, 512, 512, 10], "relu"),
    ("64-128-128-10 GELU", [64, 128, 128, 10], "gelu"),
    ("64-128-128-10 SiLU", [64, 128, 128, 10], "silu"),
]


def mlp(sizes, activation):
    import torch
    from torch import nn

    torch.manual_seed(0)
    act = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}[activation]
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)



def small_cnn():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 4 * 4, 10))


def small_resnet(blocks: int = 2, width: int = 8):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))

        def forward(self, x):
            return torch.relu(x + self.body(x))

    torch.manual_seed(0)
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width),
                         nn.ReLU(), *[Block() for _ in range(blocks)], nn.Flatten(), nn.Linear(width * 64, 10))


def resnet18(size: int):
    from tests.resnet18 import random_resnet18

    return random_resnet18(), (3, size, size)


def eclipse_fast(model):
    """ECLipsE-Fast from eclipse-nn, on the model's Linear weights (slopes assumed in [0, 1])."""
    from eclipse_nn.LipConstEstimator import LipConstEstimator

    estimator = LipConstEstimator(model=model.double())
    start = time.perf_counter()
    value = float(estimator.estimate(method="ECLipsE_Fast"))
    return value, time.perf_counter() - start


def cvxpy_reference(certificate, cap: float):
    """LipSDP-Neuron through cvxpy + SCS on lipnorm's dense view, re-checked exactly."""
    from lipsdp_cvxpy import lipsdp_cvxpy

    from lipnorm.certify.methods.sdp import check_multipliers

    network = next(p.network for p in certificate.proof.proofs.values() if hasattr(p, "network"))
    start = time.perf_counter()
    rho, multipliers, status = lipsdp_cvxpy(network, solver="SCS", time_limit=cap, eps=1e-6)
    seconds = time.perf_counter() - start
    if rho is None:
        return None, seconds, status
    for slack in (1e-9, 1e-7, 1e-5, 1e-4, 1e-3, 1e-2):
        if check_multipliers(network, multipliers, rho * (1 + slack)):
            return float(np.sqrt(rho * (1 + slack))), seconds, f"{status}, certified at ρ·(1+{slack:g})"
    return None, seconds, f"{status}: reported {np.sqrt(rho):.6g}, failed the exact re-check"


def lipnorm_methods(model, shape, budget: float):
    rows = {}
    for method in ("product", "chain", "sdp", "auto"):
        start = time.perf_counter()
        try:
            certificate = lipnorm.certify(model, shape, method=method, time_budget=budget)
        except ValueError as error:
            rows[method] = (None, time.perf_counter() - start, str(error))
            continue
        rows[method] = (certificate.upper, time.perf_counter() - start, certificate.method)
        last = certificate
    return rows, last


def lower_bound(model, x, shape, starts: int, steps: int) -> float:
    """The steepest secant from ``starts`` data points and as many Gaussian points around them."""
    rng = np.random.default_rng(0)
    if x is None:
        return lipnorm.lipschitz_lower_bound(model, input_shape=shape, starts=starts, steps=steps).value
    data = x.double().numpy()
    chosen = data[rng.choice(len(data), size=min(starts, len(data)), replace=False)]
    around = data.mean(0) + 0.5 * data.std() * rng.standard_normal((starts, data.shape[1]))
    values = [lipnorm.lipschitz_lower_bound(model, points.reshape((-1, *shape)), starts=starts, steps=steps).value
              for points in (chosen, around)]
    return max(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two MLPs, no ResNet-18 at 224")
    parser.add_argument("--cvxpy-cap", type=float, default=600.0, help="seconds for cvxpy + SCS per net")
    parser.add_argument("--budget", type=float, default=10.0, help="time_budget of the lipnorm methods (MLPs)")
    parser.add_argument("--only", choices=("mlp", "conv", "resnet18"), action="append",
                        help="run only these groups (repeatable; the table then has only them)")
    args = parser.parse_args()
    groups = set(args.only or ("mlp", "conv", "resnet18"))
    import torch

    torch.set_num_threads(2)
    x, y = digits()
    table = []
    for name, sizes, activation in (MLPS[:2] if args.quick else MLPS) if "mlp" in groups else ():
        model, accuracy, _ = train(mlp(sizes, activation), x, y, epochs=60)
        model = model.double()
        rows, certificate = lipnorm_methods(model, (64,), args.budget)
        low = lower_bound(model, x, (64,), starts=512, steps=400)
        eclipse = eclipse_fast(model) if activation in ("relu", "tanh") else None
        reference = cvxpy_reference(certificate, args.cvxpy_cap)
        table.append((name, accuracy, low, rows, eclipse, reference))
        print(name, accuracy, low, rows, eclipse, reference, flush=True)
    convs = [("digits CNN (16-32 conv, stride 2)", small_cnn, 60.0),
             ("digits ResNet (2 residual blocks, BN)", small_resnet, 60.0)]
    for name, factory, budget in convs if "conv" in groups else ():
        model, accuracy, _ = train(factory(), x, y, epochs=30)
        model = model.double()
        rows, certificate = lipnorm_methods(model, (64,), budget)
        low = lower_bound(model, x, (64,), starts=512, steps=200)
        table.append((name, accuracy, low, rows, None, None))
        print(name, accuracy, low, rows, flush=True)
    for size in ((32,) if args.quick else (32, 224)) if "resnet18" in groups else ():
        model, shape = resnet18(size)
        rows, _ = lipnorm_methods(model, shape, 60.0)
        low = lower_bound(model, None, shape, starts=4 if size == 224 else 32, steps=10 if size == 224 else 60)
        table.append((f"ResNet-18 {size}×{size} (random)", None, low, rows, None, None))
        print(size, low, rows, flush=True)
    write(table, args)
    save_json(table)


def _cell(value, low, seconds=None):
    if value is None:
        return "—"
    ratio = f" ({value / low:.4f}×)" if low else ""
    time_part = "" if seconds is None else f", {seconds:.2f} s"
    return f"{value:.5g}{ratio}{time_part}"


def write(table, args) -> None:
    import cvxpy
    import scs
    import torch

    lines = [
        "# Tight network certificates: the ladder against the incumbents",
        "",
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.platform()}, "
        f"{__import__('os').cpu_count()} CPUs; torch {torch.__version__}, cvxpy {cvxpy.__version__}, "
        f"SCS {scs.__version__}, lipnorm {lipnorm.__version__}. `python benchmarks/bench_tight.py "
        f"--cvxpy-cap {args.cvxpy_cap:g} --budget {args.budget:g}`.",
        "",
        "Each cell: bound (bound / lower bound, time). Lower bound: the steepest secant found by",
        "`lipnorm.lipschitz_lower_bound` from 512 digits and 512 Gaussian points around them, 400",
        "steps (200 for the CNNs; Gaussian starts only for ResNet-18). ECLipsE-Fast assumes slopes in [0, 1]: not run on GELU/SiLU, where that is",
        "unsound. LipSDP-Neuron (cvxpy + SCS, eps 1e-6) is re-checked with lipnorm's exact test;",
        "its certified value is shown. `auto` is the default: the tightest certified bound of the",
        f"ladder within `time_budget` ({args.budget:g} s for the MLPs, 60 s for the others).",
        "",
        "| network | train acc | lower bound | product | ECLipsE-Fast | LipSDP (cvxpy+SCS) | chain | sdp | auto | auto / product |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, accuracy, low, rows, eclipse, reference in table:
        product = rows["product"][0]
        auto = rows["auto"][0]
        eclipse_cell = "n/a" if eclipse is None else _cell(eclipse[0], low, eclipse[1])
        if reference is None:
            reference_cell = "n/a"
        else:
            reference_cell = (_cell(reference[0], low, reference[1]) if reference[0] is not None
                              else f"none ({reference[2]}, {reference[1]:.0f} s)")
        lines.append(
            f"| {name} | {'' if accuracy is None else f'{accuracy:.3f}'} | {low:.5g} | "
            f"{_cell(*rows['product'][:1], low, rows['product'][1])} | {eclipse_cell} | {reference_cell} | "
            f"{_cell(rows['chain'][0], low, rows['chain'][1])} | {_cell(rows['sdp'][0], low, rows['sdp'][1])} | "
            f"{_cell(auto, low, rows['auto'][1])} [{rows['auto'][2]}] | "
            f"{'' if auto is None else f'{auto / product:.3f}'} |")
    RESULTS.write_text("\n".join(lines) + "\n")
    print(RESULTS.read_text())


def save_json(table) -> None:
    """The figures of the table, for benchmarks/plot_tight.py."""
    rows = []
    for name, accuracy, low, methods, eclipse, reference in table:
        rows.append({"network": name, "accuracy": accuracy, "lower": low,
                     "methods": {m: {"upper": v[0], "seconds": v[1], "note": v[2]} for m, v in methods.items()},
                     "eclipse_fast": None if eclipse is None else {"upper": eclipse[0], "seconds": eclipse[1]},
                     "lipsdp_cvxpy": None if reference is None else
                     {"upper": reference[0], "seconds": reference[1], "status": reference[2]}})
    JSON.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
