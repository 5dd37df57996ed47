"""Benchmark: the certificate ladder against the incumbents, side by side in one process.

Two groups of networks, all trained here on scikit-learn's digits (see
``benchmarks/cnn_nets.py`` for the data and the training; two large nets keep random
weights):

* digits nets (8×8 inputs /16; Adam, 60 epochs for the MLPs, 30 for a CNN and a small
  ResNet), beside ECLipsE-Fast (eclipse-nn; MLPs of Linear/ReLU/tanh only — it assumes
  slopes in [0, 1], not sound for GELU/SiLU, so it is not run there) and LipSDP-Neuron
  through cvxpy + SCS (its multipliers re-checked by lipnorm's exact test; capped);
* CNN-scale nets (``cnn_nets.NETS``: the 4-conv CNN at 32×32 and 16×16, ResNet-8, a
  BN-GELU-avgpool CNN, the CIFAR ResNet-18, resnet18 at 224×224, Keras ResNet50), each
  with the time budget of its target in issue 19.

For every net ``lipnorm.certify(method="auto")`` runs once; the table shows each rung of
the ladder (``lipnorm.certify.methods.LADDER``, whatever methods it lists) with its own
bound and time inside that run, and the result of ``auto``. Lower bounds: the steepest
secant of ``lipnorm.lipschitz_lower_bound`` from the data and, on the CNN-scale nets
small enough for it, the exact-Jacobian ascent of ``benchmarks/jacobian_ascent.py`` (64
starts from the data's best points, 60 steps); ``bound / lower`` uses the larger.

Run: PYTHONPATH=. python benchmarks/bench_tight.py [--only GROUP] [--quick] [--cvxpy-cap SECONDS]
with GROUP one of ``mlp``, ``conv`` (the digits CNN and ResNet), ``cnn`` (every CNN-scale
net) or a key of ``cnn_nets.NETS`` (one net), repeatable. Results are merged by network
into benchmarks/results/bench_tight.json (a row is replaced when its net runs again) and
the whole table benchmarks/results/bench_tight.md is written from it; each row records its
date, load average and commit. ``benchmarks/plot_tight.py`` draws docs/img/certify_ladder.png
and docs/img/certify_cnn_ladder.png from the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lipnorm  # noqa: E402
from cnn_nets import NETS, digits, load_net, train  # noqa: E402
from jacobian_ascent import jacobian_ascent  # noqa: E402

from lipnorm.certify.methods import LADDER  # noqa: E402

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



#: CNN-scale nets on which the exact-Jacobian reference runs (10 outputs, small inputs; on
#: the CIFAR ResNet-18 it would take hours of CPU: 0.56 GMAC a sample, 1 797 Jacobians of
#: ten backward passes to rank the data, then 64 × 60 more).
REFERENCE_NETS = ("cnn32", "cnn16", "resnet8", "bn_gelu_cnn")
#: lipschitz_lower_bound on the CNN-scale nets: (data points, starts, steps, time budget).
LOWER_SEARCH = {"resnet18_224": (64, 8, 20, 300.0), "keras_resnet50": (16, 4, 10, 300.0)}
LOWER_DEFAULT = (None, 64, 100, 60.0)


def certify_ladder(model, shape, budget: float):
    """One ``auto`` run: each rung's own bound, time and note, and ``auto``'s result."""
    start = time.perf_counter()
    certificate = lipnorm.certify(model, shape, method="auto", time_budget=budget)
    seconds = time.perf_counter() - start
    methods = {run.method: {"upper": run.upper, "seconds": run.seconds, "note": run.note}
               for run in certificate.ladder}
    for name in LADDER:
        methods.setdefault(name, {"upper": None, "seconds": 0.0, "note": "not run"})
    methods["auto"] = {"upper": certificate.upper, "seconds": seconds, "note": certificate.method}
    return methods, certificate


def digits_lower_bound(model, x, shape, starts: int, steps: int) -> dict:
    """The steepest secant from ``starts`` digits and as many Gaussian points around them."""
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    data = x.double().numpy()
    chosen = data[rng.choice(len(data), size=min(starts, len(data)), replace=False)]
    around = data.mean(0) + 0.5 * data.std() * rng.standard_normal((starts, data.shape[1]))
    values = [lipnorm.lipschitz_lower_bound(model, points.reshape((-1, *shape)), starts=starts, steps=steps).value
              for points in (chosen, around)]
    return {"value": max(values), "seconds": time.perf_counter() - start, "budget": None,
            "starts": starts, "steps": steps}


def run_info() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            "load": round(os.getloadavg()[0], 1), "commit": commit}


def digits_rows(groups, args):
    x, y = digits()
    mlps = (MLPS[:2] if args.quick else MLPS) if "mlp" in groups else []
    for name, sizes, activation in mlps:
        info = run_info()
        model, accuracy, _ = train(mlp(sizes, activation), x, y, epochs=60)
        model = model.double()
        methods, certificate = certify_ladder(model, (64,), args.budget)
        low = digits_lower_bound(model, x, (64,), starts=512, steps=400)
        eclipse = eclipse_fast(model) if activation in ("relu", "tanh") else None
        reference = cvxpy_reference(certificate, args.cvxpy_cap)
        yield {"network": name, "group": "digits", "accuracy": accuracy, "budget": args.budget,
               "lower": low["value"], "lower_lipnorm": low, "lower_reference": None, "methods": methods,
               "eclipse_fast": None if eclipse is None else {"upper": eclipse[0], "seconds": eclipse[1]},
               "lipsdp_cvxpy": {"upper": reference[0], "seconds": reference[1], "status": reference[2]},
               "run": info}
    convs = [("digits CNN (16-32 conv, stride 2)", small_cnn), ("digits ResNet (2 residual blocks, BN)", small_resnet)]
    for name, factory in convs if "conv" in groups else ():
        info = run_info()
        model, accuracy, _ = train(factory(), x, y, epochs=30)
        model = model.double()
        methods, _ = certify_ladder(model, (64,), 60.0)
        low = digits_lower_bound(model, x, (64,), starts=512, steps=200)
        yield {"network": name, "group": "digits", "accuracy": accuracy, "budget": 60.0, "lower": low["value"],
               "lower_lipnorm": low, "lower_reference": None, "methods": methods, "eclipse_fast": None,
               "lipsdp_cvxpy": None, "run": info}


def cnn_row(key: str) -> dict:
    """Certify one CNN-scale net within its budget; lower bounds from its data."""
    info = run_info()
    net = load_net(key)
    methods, _ = certify_ladder(net.model, None if net.spec.framework == "keras" else net.input_shape,
                                net.spec.budget)
    print(key, {m: (v["upper"], round(v["seconds"], 2)) for m, v in methods.items()}, flush=True)
    count, starts, steps, budget = LOWER_SEARCH.get(key, LOWER_DEFAULT)
    start = time.perf_counter()
    found = lipnorm.lipschitz_lower_bound(net.model, net.inputs(count), starts=starts, steps=steps,
                                          time_budget=budget)
    low = {"value": found.value, "seconds": time.perf_counter() - start, "budget": budget,
           "starts": starts, "steps": steps, "points": count or len(net.labels())}
    reference = exact_jacobian_reference(net) if key in REFERENCE_NETS else None
    print(key, "lower", low, reference, flush=True)
    best = max(low["value"], reference["value"] if reference else 0.0)
    info["load_end"] = round(os.getloadavg()[0], 1)
    return {"network": net.spec.title, "group": "cnn", "key": key, "weights_id": net.weights, "accuracy": net.accuracy,
            "weights": "trained" if net.spec.trained else "random", "budget": net.spec.budget,
            "lower": best, "lower_lipnorm": low, "lower_reference": reference, "methods": methods,
            "eclipse_fast": None, "lipsdp_cvxpy": None, "run": info}


def exact_jacobian_reference(net) -> dict:
    """The exact-Jacobian ascent's result for these weights, computed once and cached beside them."""
    from cnn_nets import CACHE

    path = CACHE / f"{net.weights}-jacobian-ascent.json"
    if path.exists():
        return json.loads(path.read_text())
    result = jacobian_ascent(net.model, net.inputs(), starts=64, steps=60)
    reference = {"value": result.value, "seconds": result.seconds, "data_best": result.data_best}
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(reference))
    return reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two MLPs only")
    parser.add_argument("--cvxpy-cap", type=float, default=600.0, help="seconds for cvxpy + SCS per net")
    parser.add_argument("--budget", type=float, default=10.0, help="time_budget of the lipnorm methods (MLPs)")
    parser.add_argument("--only", choices=("mlp", "conv", "cnn", *NETS), action="append",
                        help="run only these groups or nets (repeatable); other rows of the table are kept")
    parser.add_argument("--table-only", action="store_true", help="rewrite the table from the JSON, run nothing")
    args = parser.parse_args()
    groups = set() if args.table_only else set(args.only or ("mlp", "conv", "cnn"))
    if "cnn" in groups:
        groups |= set(NETS)
    import torch

    torch.set_num_threads(2)
    # each row, once measured, is merged by network into the JSON as it is then (another run
    # may have written rows of its own meanwhile)
    for new in itertools.chain(digits_rows(groups, args), (cnn_row(key) for key in NETS if key in groups)):
        rows = {row["network"]: row for row in (json.loads(JSON.read_text()) if JSON.exists() else [])}
        rows[new["network"]] = new
        JSON.write_text(json.dumps(list(rows.values()), indent=2) + "\n")
    write(json.loads(JSON.read_text()) if JSON.exists() else [], args)


def _cell(value, low, seconds=None):
    if value is None:
        return "—"
    ratio = f" ({value / low:.4f}×)" if low else ""
    time_part = "" if seconds is None else f", {seconds:.2f} s"
    return f"{value:.5g}{ratio}{time_part}"


def _load(run: dict) -> str:
    """The load average at the start of a row's run, and at its end where recorded."""
    return f"{run['load']}–{run['load_end']}" if "load_end" in run else f"{run['load']}"


def _ratio(value, reference) -> str:
    return "—" if value is None or not reference else f"{value / reference:.3g}"


#: The dense chain's bound of the 16×16 CNN before the torus view (commit d799c32: the chain
#: rung was the dense view alone; 77 s on the shared machine), for these weights only.
DENSE_CHAIN_16 = {"cnn16-543daf8d65d3": 128.0567985096465}

#: Issue 19's targets: net key → (what it asks, whether a row meets it: (row, auto bound,
#: auto / product, auto seconds) → bool, or None where the weights have no baseline).
TARGETS = {
    "cnn32": ("≤ 0.55× the product within 60 s (stretch ≤ 0.4×)", lambda row, bound, ratio, t: ratio <= 0.55 and t <= 60),
    "cnn16": ("as tight as the dense chain (128.06 with these weights), in ≤ 5 s",
              lambda row, bound, ratio, t: None if row.get("weights_id") not in DENSE_CHAIN_16
              else bound <= DENSE_CHAIN_16[row["weights_id"]] and t <= 5),
    "resnet8": ("≤ 0.2× the product within 60 s (stretch ≤ 0.05×)", lambda row, bound, ratio, t: ratio <= 0.2 and t <= 60),
    "resnet18_cifar": ("≤ 0.5× the product within 120 s", lambda row, bound, ratio, t: ratio <= 0.5 and t <= 120),
    "resnet18_224": ("a bound, within 600 s", lambda row, bound, ratio, t: t <= 600),
    "bn_gelu_cnn": ("tighter than the product", lambda row, bound, ratio, t: ratio < 1),
    "keras_resnet50": ("through the ladder within 600 s", lambda row, bound, ratio, t: t <= 600),
}


def write(rows, args) -> None:
    import cvxpy
    import scs
    import torch

    digits_nets = [row for row in rows if row.get("group", "digits") == "digits"]
    cnn_nets = [row for row in rows if row.get("group") == "cnn"]
    lines = [
        "# Tight network certificates: the ladder against the incumbents",
        "",
        f"Written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.platform()}, "
        f"{os.cpu_count()} CPUs (shared: each row gives its load average); torch {torch.__version__}, "
        f"cvxpy {cvxpy.__version__}, SCS {scs.__version__}, lipnorm {lipnorm.__version__}. Rerun: "
        f"`PYTHONPATH=. python benchmarks/bench_tight.py --cvxpy-cap {args.cvxpy_cap:g} --budget {args.budget:g}` "
        "(or `--only NET` for one row).",
        "",
        "## Digits networks",
        "",
        "Each cell: bound (bound / lower bound, time). Lower bound: the steepest secant found by",
        "`lipnorm.lipschitz_lower_bound` from 512 digits and 512 Gaussian points around them, 400",
        "steps (200 for the CNNs). ECLipsE-Fast assumes slopes in [0, 1]: not run on GELU/SiLU, where that is",
        "unsound. LipSDP-Neuron (cvxpy + SCS, eps 1e-6) is re-checked with lipnorm's exact test;",
        "its certified value is shown. `auto` is the default: the tightest certified bound of the",
        f"ladder within `time_budget` ({args.budget:g} s for the MLPs, 60 s for the others); the method",
        "columns are the rungs of that one run.",
        "",
        "| network | train acc | lower bound | " + " | ".join(LADDER[:1]) + " | ECLipsE-Fast | LipSDP (cvxpy+SCS) | "
        + " | ".join(LADDER[1:]) + " | auto | auto / product | load |",
        "|---|---|---|---|---|---|" + "---|" * (len(LADDER) - 1) + "---|---|---|",
    ]
    for row in digits_nets:
        low, methods = row["lower"], row["methods"]
        eclipse, reference = row.get("eclipse_fast"), row.get("lipsdp_cvxpy")
        eclipse_cell = "n/a" if eclipse is None else _cell(eclipse["upper"], low, eclipse["seconds"])
        if reference is None:
            reference_cell = "n/a"
        else:
            reference_cell = (_cell(reference["upper"], low, reference["seconds"]) if reference["upper"] is not None
                              else f"none ({reference['status']}, {reference['seconds']:.0f} s)")
        rungs = [_cell(methods.get(m, {}).get("upper"), low, methods.get(m, {}).get("seconds")) for m in LADDER]
        auto = methods["auto"]
        accuracy = "" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
        lines.append(
            f"| {row['network']} | {accuracy} | {low:.5g} | "
            f"{rungs[0]} | {eclipse_cell} | {reference_cell} | " + " | ".join(rungs[1:])
            + f" | {_cell(auto['upper'], low, auto['seconds'])} [{auto['note']}] | "
            f"{_ratio(auto['upper'], methods['product']['upper'])} | {row.get('run', {}).get('load', '')} |")
    if cnn_nets:
        lines += _cnn_tables(cnn_nets)
    RESULTS.write_text("\n".join(lines) + "\n")
    print(RESULTS.read_text())


def _cnn_tables(rows) -> list[str]:
    lines = [
        "",
        "## CNN-scale networks",
        "",
        "Digits upsampled to 3×32×32 (3×16×16 for the 16×16 CNN; 224×224 for the last two) in three",
        "tinted channels (`benchmarks/cnn_nets.py`). One `certify(method=\"auto\", time_budget=budget)` per",
        "net: each rung's own bound and time within that run (a rung that gave none says why), then",
        "`auto`'s result and total time. `bound / lower` divides by the larger of the two lower bounds",
        "below.",
        "",
        "| network | weights | budget | method | bound | time | bound / product | bound / lower | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        product = row["methods"]["product"]["upper"]
        weights = "random" if row["accuracy"] is None else f"trained, {row['accuracy']:.3f}"
        for index, method in enumerate((*LADDER, "auto")):
            result = row["methods"].get(method, {"upper": None, "seconds": 0.0, "note": "not in this run's ladder"})
            first = index == 0
            note = result["note"] if method != "auto" else f"from {result['note']}"
            bound = "—" if result["upper"] is None else f"{result['upper']:.5g}"
            name = f"**{method}**" if method == "auto" else method
            budget = f"{row['budget']:g} s" if first else ""
            lines.append(
                f"| {row['network'] if first else ''} | {weights if first else ''} | "
                f"{budget} | {name} | {bound} | {result['seconds']:.2f} s | "
                f"{_ratio(result['upper'], product)} | {_ratio(result['upper'], row['lower'])} | "
                f"{note.replace('|', '/')[:160]} |")
    lines += [
        "",
        "Lower bounds. lipnorm: `lipschitz_lower_bound(model, data, starts, steps, time_budget)` (it",
        "screens the data points it reaches in a third of the budget and climbs from the steepest;",
        "a float64 secant). Reference: exact-Jacobian",
        "ascent (`benchmarks/jacobian_ascent.py`: ‖J(x)‖₂ of every data point by full Jacobian and SVD,",
        "then 64 starts from the best, 60 steps), on the nets small enough for it.",
        "",
        "| network | lipnorm lower bound | time (budget) | points, starts, steps | reference ‖J(x)‖₂ ascent | time | data's best ‖J(x)‖₂ | lipnorm / reference | load | date, commit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        low, ref, run = row["lower_lipnorm"], row["lower_reference"], row["run"]
        lines.append(
            f"| {row['network']} | {low['value']:.5g} | {low['seconds']:.1f} s ({low['budget']:g} s) | "
            f"{low['points']}, {low['starts']}, {low['steps']} | "
            + (f"{ref['value']:.5g} | {ref['seconds']:.1f} s | {ref['data_best']:.5g} | {low['value'] / ref['value']:.4f}"
               if ref else "not run | | |")
            + f" | {_load(run)} | {run['date']}, {run['commit']} |")
    lines += ["", "Targets of issue 19 (`auto`, one run):", "",
              "| network | target | auto / product | auto / lower | auto time | met | load | date, commit |",
              "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        target, meets = TARGETS.get(row.get("key"), ("", lambda *_: None))
        auto, product = row["methods"]["auto"], row["methods"]["product"]["upper"]
        ratio = auto["upper"] / product
        met = {True: "yes", False: "no", None: "no baseline"}[meets(row, auto["upper"], ratio, auto["seconds"])]
        lines.append(f"| {row['network']} | {target} | {ratio:.3g} | {_ratio(auto['upper'], row['lower'])} | "
                     f"{auto['seconds']:.1f} s | {met} | {_load(row['run'])} | {row['run']['date']}, {row['run']['commit']} |")
    return lines


if __name__ == "__main__":
    main()
