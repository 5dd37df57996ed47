"""Benchmark: the convolutional SDP (``conv_sdp``) on the issue-19 CNN at 16×16 and 32×32.

The CNN (conv 32, 32 stride 2, 64, 64 stride 2 — 3×3 and 4×4 kernels, zero padding — then
FC 256, FC 10) as :mod:`benchmarks.cnn_nets` trains it (``cnn16``, ``cnn32``: the digits
upsampled to 3×n×n, tinted). For each: the product bound; the conv_sdp method alone
(:func:`lipnorm.certify.methods.conv_sdp.conv_sdp_bound` with ``budget`` seconds: its
number of steps fixed from the cost model) and ``method="auto"`` within
``time_budget=budget`` and ``time_budget=short`` (bound, seconds, bound / product; the
method ``auto`` reported); and a lower bound (exact Jacobian ascent from 32 data points, 60
steps). One process, one run; the load average (1 min, after each net) is written into the table.

Run: PYTHONPATH=. python benchmarks/bench_conv_sdp.py [--nets cnn16 cnn32] [--budget 60] [--short 5]
Writes benchmarks/results/bench_conv_sdp.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lipnorm  # noqa: E402
from benchmarks.cnn_nets import load_net  # noqa: E402
from lipnorm.certify.frequency_sdp import FrequencySdp  # noqa: E402
from lipnorm.certify.graph import prepare_graph  # noqa: E402
from lipnorm.certify.methods.conv_sdp import conv_sdp_bound  # noqa: E402
from lipnorm.certify.methods.product import bound_nodes  # noqa: E402
from lipnorm.certify.torch_frontend import build_graph  # noqa: E402
from lipnorm.certify.torus_builder import torus_network  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "bench_conv_sdp.md"


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=["cnn16", "cnn32"])
    parser.add_argument("--budget", type=float, default=60.0)
    parser.add_argument("--short", type=float, default=5.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for key in args.nets:
        net = load_net(key)
        model, shape, accuracy = net.model.double(), net.input_shape, net.accuracy
        x = torch.tensor(net.inputs(32), dtype=torch.float64)
        size = shape[-1]
        product = lipnorm.certify(model, shape, method="product")
        start = time.perf_counter()
        builder, _ = build_graph(model, shape)
        builder.graph.record_shape(builder.graph.input_name, (1, *shape))
        graph = prepare_graph(builder.graph)
        sdp = FrequencySdp(torus_network(graph, bound_nodes(graph)))
        bound, proof = conv_sdp_bound(sdp, time_budget=args.budget)
        cells = {"conv_sdp": (bound, time.perf_counter() - start, "conv_sdp")}
        assert proof.verify() == bound
        print(size, "conv_sdp", cells["conv_sdp"], flush=True)
        for cell, budget in (("auto", args.budget), ("short", args.short)):
            start = time.perf_counter()
            certificate = lipnorm.certify(model, shape, method="auto", time_budget=budget)
            cells[cell] = (certificate.upper, time.perf_counter() - start, certificate.method)
            print(size, cell, cells[cell], [(r.method, r.upper, round(r.seconds, 1)) for r in certificate.ladder],
                  flush=True)
        lower = lipnorm.lipschitz_lower_bound(model, x, starts=32, steps=60).value
        rows.append((size, accuracy, product.upper, cells, lower, os.getloadavg()[0]))
        print(size, "product", product.upper, "lower", lower, flush=True)
    write(rows, args)


def write(rows, args) -> None:
    lines = [
        "# conv_sdp on the issue-19 CNN",
        "",
        f"`PYTHONPATH=. python benchmarks/bench_conv_sdp.py --nets {' '.join(args.nets)} "
        f"--budget {args.budget:g} --short {args.short:g}` — {datetime.date.today()}, {os.cpu_count()} CPUs, "
        f"{platform.platform()}, lipnorm {lipnorm.__version__}. One run; bound (seconds, bound / product).",
        "",
        f"| input | accuracy | product | conv_sdp alone, {args.budget:g} s | auto, time_budget={args.budget:g} "
        f"(method) | auto, time_budget={args.short:g} (method) | lower bound | load |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(value, product):
        bound, seconds, *method = value
        named = f", {method[0]}" if method else ""
        return f"{bound:.2f} ({seconds:.1f} s, {bound / product:.3f}{named})"

    for size, accuracy, product, cells, lower, load in rows:
        lines.append(f"| 3×{size}×{size} | {accuracy:.3f} | {product:.2f} | {cell(cells['conv_sdp'][:2], product)} | "
                     f"{cell(cells['auto'], product)} | {cell(cells['short'], product)} | {lower:.2f} | {load:.1f} |")
    RESULTS.write_text("\n".join(lines) + "\n")
    print(RESULTS.read_text())


if __name__ == "__main__":
    main()
