"""Benchmark: certify ResNet-18 (torch, 224×224) and Keras ResNet50 end to end.

Reports total certify time, per-layer times, the certified upper bound, a lower bound
from lipschitz_lower_bound, and the product of the σ of each reshaped kernel — what a
user would get from torch/Keras spectral norm, which is *not* a bound. For every
convolution the certificate also holds a certified lower bound of its norm; upper/lower
bounds its excess over the true operator norm.

Run: PYTHONPATH=. python benchmarks/bench_certify.py [--quick]
Writes benchmarks/results/bench_certify.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lipnorm.certify import certify, lipschitz_lower_bound  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "bench_certify.md"


def naive_product(kernels) -> float:
    """Π σ(kernel reshaped to (out, −1)) over conv/dense kernels (torch/Keras SN's number)."""
    product = 1.0
    for kernel in kernels:
        product *= np.linalg.svd(kernel.reshape(kernel.shape[0], -1), compute_uv=False)[0]
    return product


def torch_resnet18(quick: bool):
    import torch

    from tests.resnet18 import random_resnet18

    model = random_resnet18()
    size = 64 if quick else 224
    kernels = [m.weight.detach().double().numpy() for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return model, (3, size, size), kernels


def keras_resnet50(quick: bool):
    import keras

    keras.utils.set_random_seed(0)
    size = 64 if quick else 224
    model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3))
    kernels = []
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            k = np.asarray(layer.kernel, dtype=np.float64)
            kernels.append(np.moveaxis(k, -1, 0))
    return model, None, kernels


def run(name, build, quick):
    model, shape, kernels = build(quick)
    start = time.perf_counter()
    certificate = certify(model, shape)
    total = time.perf_counter() - start
    shape = certificate.input_shape
    start = time.perf_counter()
    lower = lipschitz_lower_bound(model, input_shape=shape, starts=2, steps=8).value
    lower_time = time.perf_counter() - start
    naive = naive_product(kernels)
    convs = [row for row in certificate.layers if row.method.startswith("conv")]
    return {
        "name": name, "shape": shape, "total": total, "upper": certificate.upper, "lower": lower,
        "lower_time": lower_time, "naive": naive, "convs": convs, "certificate": certificate,
    }


def versions() -> str:
    import importlib

    parts = []
    for module in ("numpy", "scipy", "torch", "keras", "tensorflow", "onnx"):
        try:
            parts.append(f"{module} {importlib.import_module(module).__version__}")
        except ImportError:
            pass
    return ", ".join(parts)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="64×64 inputs (smoke run)")
    parser.add_argument("--only", choices=["torch", "keras"])
    args = parser.parse_args()
    builds = [("ResNet-18 (torch)", torch_resnet18), ("ResNet50 (keras.applications)", keras_resnet50)]
    if args.only:
        builds = [b for b in builds if args.only in b[0]]
    results = []
    for name, build in builds:  # write after each model: a long run keeps what it finished
        results.append(run(name, build, args.quick))
        write(results)
        print(f"{name}: {results[-1]['total']:.1f} s, upper {results[-1]['upper']:.4g}", flush=True)


def write(results):
    lines = [
        "# bench_certify: certify whole networks",
        "",
        f"Date: {datetime.date.today()} · machine: {platform.platform()}, {os.cpu_count()} CPUs "
        f"(shared with other jobs: timings are upper estimates) · {platform.python_version()} · {versions()}",
        "",
        "| model | input | certify time [s] | certified upper | lower (search) | upper/lower "
        "| naive Π σ(reshaped kernel) | conv layers | slowest conv [s] | worst conv upper/certified lower |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        slowest = max((row.seconds for row in r["convs"]), default=0.0)
        worst = max((row.bound / row.lower for row in r["convs"] if row.lower), default=float("nan"))
        lines.append(
            f"| {r['name']} | {r['shape']} | {r['total']:.1f} | {r['upper']:.4g} | {r['lower']:.4g} "
            f"| {r['upper'] / r['lower']:.3g} | {r['naive']:.4g} | {len(r['convs'])} | {slowest:.1f} "
            f"| {worst:.4f} |"
        )
    for r in results:
        lines += ["", f"## {r['name']}: per layer", "", "```", r["certificate"].table(), "```"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
