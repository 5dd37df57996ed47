"""Certified conv norms on the 20 convolutions of ResNet-18 at 224x224.

Truth: ARPACK Lanczos (scipy ``svds``, tol 1e-10) on torch's own ``conv2d`` and its
adjoint ``conv_transpose2d`` in float64 -- independent of lipnorm's convolution code.
ARPACK is warm-started from lipnorm's near-top vector (only its speed depends on that).
Per layer: lipnorm's certified interval (``method="svd"`` and ``"gram"``) over truth and
its time (median of repeats), and what a user could pick instead: sigma of the reshaped
kernel (torch/Keras spectral norm) and the circular FFT norm at the input size ignoring
stride. Writes benchmarks/results/bench_conv.md and benchmarks/results/bench_conv.json.

Run: ``OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_conv.py``
(one BLAS thread: on a shared 2-core machine threaded OpenBLAS on many small matrices was
40x slower than one thread). ``BENCH_REPEATS`` sets the repeats (default 3).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import scipy
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator as ScipyOperator
from scipy.sparse.linalg import svds

import lipnorm
from lipnorm.conv import conv_operator
from lipnorm.conv.bounds import _circular_upper, _lanczos_refine, _top_blocks, _top_plane_wave, embedding_grid

RESULTS = Path(__file__).parent / "results"

# (name, cin, cout, kernel, stride, padding, input size) of torchvision's resnet18
RESNET18_CONVS = [("conv1", 3, 64, 7, 2, 3, 224)]
for _block in range(2):
    RESNET18_CONVS += [(f"layer1.{_block}.conv{i}", 64, 64, 3, 1, 1, 56) for i in (1, 2)]
for _layer, (_cin, _cout, _size) in enumerate([(64, 128, 56), (128, 256, 28), (256, 512, 14)], start=2):
    RESNET18_CONVS += [
        (f"layer{_layer}.0.conv1", _cin, _cout, 3, 2, 1, _size),
        (f"layer{_layer}.0.conv2", _cout, _cout, 3, 1, 1, _size // 2),
        (f"layer{_layer}.0.downsample", _cin, _cout, 1, 2, 0, _size),
        (f"layer{_layer}.1.conv1", _cout, _cout, 3, 1, 1, _size // 2),
        (f"layer{_layer}.1.conv2", _cout, _cout, 3, 1, 1, _size // 2),
    ]


def kaiming_kernel(rng, cin, cout, k):
    """torchvision's init: kaiming_normal_(mode='fan_out', nonlinearity='relu')."""
    return rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cout * k * k))


def lipnorm_start_vector(op):
    """lipnorm's near-top input vector (plane wave of the embedding, Lanczos-refined): a warm start."""
    geom = op.geometry
    kernel = np.asarray(op.kernel)
    grid = embedding_grid(geom)
    _, top, _ = _circular_upper(kernel, geom, grid, "svd", 10)
    start = _top_plane_wave(geom, grid, _top_blocks(kernel, geom, grid, top))
    return _lanczos_refine(kernel, geom, start, 24, 1e-10).ravel()


def lanczos_truth(weight, stride, padding, size, start):
    w = torch.from_numpy(weight)
    cin = weight.shape[1]
    x_shape = (1, cin, size, size)
    out = F.conv2d(torch.zeros(x_shape, dtype=torch.float64), w, stride=stride, padding=padding)
    y_shape = tuple(out.shape)
    extra = size - ((y_shape[2] - 1) * stride - 2 * padding + weight.shape[2])

    def mv(x):
        return F.conv2d(torch.from_numpy(np.ascontiguousarray(x).reshape(x_shape)), w, stride=stride,
                        padding=padding).numpy().ravel()

    def rmv(y):
        return F.conv_transpose2d(torch.from_numpy(np.ascontiguousarray(y).reshape(y_shape)), w, stride=stride,
                                  padding=padding, output_padding=extra).numpy().ravel()

    n, m = int(np.prod(x_shape)), int(np.prod(y_shape))
    op = ScipyOperator((m, n), matvec=mv, rmatvec=rmv, dtype=np.float64)
    v0 = start if n <= m else mv(start)  # svds iterates on the smaller side
    return float(svds(op, k=1, tol=1e-10, v0=v0, return_singular_vectors=False)[0])


def timed(fn, repeats):
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return value, statistics.median(times)


def main(repeats: int = 3, part: slice = slice(None)):
    """Run the layers in ``part`` (all by default) and write their table.

    With ``BENCH_PART=i/p`` the layers are split in ``p`` parts run by separate processes,
    each writing ``bench_conv.part<i>.json``; ``python bench_conv.py merge`` joins them.
    """
    rng = np.random.default_rng(0)
    kernels = [kaiming_kernel(rng, cin, cout, k) for _, cin, cout, k, *_ in RESNET18_CONVS]
    rows = []
    for weight, (name, cin, cout, k, stride, padding, size) in list(zip(kernels, RESNET18_CONVS))[part]:
        op = conv_operator(weight, (cin, size, size), stride=stride, padding=padding)
        truth = lanczos_truth(weight, stride, padding, size, lipnorm_start_vector(op))
        row = dict(layer=name, shape=f"{cin}->{cout} k{k} s{stride} @{size}", truth=truth)
        for method, runs in (("svd", repeats), ("gram", 1)):  # gram is the slow alternative: one run
            interval, seconds = timed(lambda: op.sigma_bounds(method=method), runs)
            row[method] = dict(lower=interval.lower / truth, upper=interval.upper / truth, seconds=seconds,
                               path=interval.method)
        row["reshaped"] = float(np.linalg.norm(weight.reshape(cout, -1), 2)) / truth
        no_stride = conv_operator(weight, (cin, size, size), padding="circular")
        row["circular_no_stride"] = no_stride.exact_sigma() / truth
        rows.append(row)
        print(name, json.dumps(row), flush=True)
        if part == slice(None):
            write_report(rows, repeats)  # after every layer, so a partial run still leaves a table
        else:
            (RESULTS / f"bench_conv.part{part.start}.json").write_text(json.dumps(rows, indent=1))


def write_report(rows, repeats):
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_conv.json").write_text(json.dumps(rows, indent=1))
    total = {m: sum(r[m]["seconds"] for r in rows) for m in ("svd", "gram")}
    lines = [
        "# Certified operator norms of ResNet-18's convolutions (224x224, zero padding)",
        "",
        f"Date {datetime.date.today()}; {platform.platform()}; {platform.processor() or 'cpu'}; "
        f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, load average at end "
        f"{os.getloadavg()[0]:.1f} (shared machine); "
        f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, "
        f"torch {torch.__version__}, lipnorm {lipnorm.__version__}. Times: median of {repeats} ('svd'), "
        "one run ('gram').",
        "",
        "Truth: ARPACK Lanczos (tol 1e-10) on torch's conv2d / conv_transpose2d, float64, warm-started "
        "from lipnorm's near-top vector. Ratios are to truth. 'svd': method='svd' (the path, e.g. "
        "conv-embedding-symbol, is in the last column: Gram symbol + Cholesky certificates, or the stacked "
        "blocks' certificate, or exact channel matrices for 1x1); 'gram': the blocks by 10 Gram steps.",
        "",
        "| layer | shape | truth | svd lower | svd upper | svd s | gram lower | gram upper | gram s "
        "| reshaped-kernel σ | circular, no stride | svd path |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['shape']} | {r['truth']:.4f} | {r['svd']['lower']:.5f} | {r['svd']['upper']:.5f} "
            f"| {r['svd']['seconds']:.2f} | {r['gram']['lower']:.5f} | {r['gram']['upper']:.5f} "
            f"| {r['gram']['seconds']:.2f} | {r['reshaped']:.3f} | {r['circular_no_stride']:.3f} "
            f"| {r['svd']['path']} |"
        )
    lines += ["", f"Total certified time: svd {total['svd']:.1f} s, gram {total['gram']:.1f} s.", ""]
    (RESULTS / "bench_conv.md").write_text("\n".join(lines))


if __name__ == "__main__":
    import sys

    repeats = int(os.environ.get("BENCH_REPEATS", "3"))
    if sys.argv[1:] == ["merge"]:
        parts = sorted(RESULTS.glob("bench_conv.part*.json"), key=lambda f: int(f.stem.split("part")[1]))
        write_report([row for f in parts for row in json.loads(f.read_text())], repeats)
    elif "BENCH_PART" in os.environ:
        index, count = (int(v) for v in os.environ["BENCH_PART"].split("/"))
        chunk = -(-len(RESNET18_CONVS) // count)
        main(repeats, slice(index * chunk, (index + 1) * chunk))
    else:
        main(repeats)
