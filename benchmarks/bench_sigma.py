"""σ_max of dense matrices: lipnorm next to ARPACK, the full SVD and plain power iteration.

Every method runs in this one process on the same float32 matrices, medians over repeats:

- ``lipnorm.estimate_sigma(W, rtol=1e-6)`` (matrix-vector products from ``state.matvecs``);
- ``scipy.sparse.linalg.svds(W, k=1)`` (ARPACK), default ``tol`` and ``tol=1e-6``; its
  products are counted in a separate run through a counting ``LinearOperator``;
- ``np.linalg.norm(W, 2)`` and ``torch.linalg.matrix_norm(W, 2)`` (full SVDs);
- plain power iteration stopping when σ changes by less than 1e-6 relative;
- ``lipnorm.sigma_bounds(W)``: time and upper/lower;
- on the 4096×4096 matrix, the time of ``W @ X`` for ``X`` with 1 to 16 columns, and of
  ``W^T W X`` in one pass over W a block of rows at a time (what lipnorm does for one
  vector): what a block Krylov method (several vectors per pass over W) would pay per
  vector;
- a wide C-ordered 2048×5632 matrix next to a C-ordered copy of its transpose (the side
  lipnorm iterates on follows the memory order);
- stacks (``batched=True``): 1024 float32 matrices of 64×64 (NumPy) against a Python loop
  of ``estimate_sigma`` and NumPy's batched SVD, and 32 float32 matrices of 1024×1024
  (torch) against ``torch.linalg.matrix_norm(W, ord=2)`` on the stack; every slice's error
  against its float64 SVD, and ``sigma_bounds(W, batched=True)`` checked to contain it.

Passes over W: reads of the whole matrix. lipnorm computes ``W v`` and ``W^T W v`` in one
pass (``lipnorm.operators.fused_normal_products``), so its passes are half its products;
Golub–Kahan before it (the same Krylov space and stopping rule, hence the same products)
and ARPACK read W once per product.

With ``--device cuda`` the matrices are torch tensors on the GPU and lipnorm runs next
to ``torch.linalg.matrix_norm(W, 2)`` there (ARPACK and NumPy have no GPU); the table
goes to ``benchmarks/results/bench_sigma_cuda.md``.

Errors are relative to ``scipy.linalg.svdvals`` of the same matrix in float64. "Krylov
minimum" is the fewest products with W and Wᵀ after which the best estimate in the Krylov
space of the start vector (the exact-arithmetic Lanczos Ritz value, computed here in
float64 with full reorthogonalization) is within 1e-6 of σ: no method that builds on
products from one start vector can need fewer (it does not pay for verifying convergence).

Run ``python benchmarks/bench_sigma.py`` (or ``make bench``) at the default BLAS thread
count; it writes ``benchmarks/results/bench_sigma.md``. ``--only 4096`` (repeatable) keeps the matrices
(and stacks) whose name holds that text.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.sparse.linalg

import lipnorm
import lipnorm.operators

RTOL = 1e-6
RESULTS = Path(__file__).parent / "results" / "bench_sigma.md"
CUDA_RESULTS = RESULTS.with_name("bench_sigma_cuda.md")


@dataclass
class Measurement:
    """One method on one matrix."""

    method: str
    sigma: float
    seconds: float  # median over repeats
    matvecs: int | None = None  # products with W or Wᵀ
    note: str = ""
    passes: int | None = None  # reads of the whole of W


def benchmark_matrices(seed: int = 0) -> dict[str, np.ndarray]:
    """The benchmark's float32 matrices by name."""
    rng = np.random.default_rng(seed)
    n = 2048
    left, _ = np.linalg.qr(rng.standard_normal((n, n)))
    right, _ = np.linalg.qr(rng.standard_normal((n, n)))
    decaying = ((left * 0.99 ** np.arange(n)) @ right.T).astype(np.float32)
    return {
        "Gaussian 4096×4096": rng.standard_normal((4096, 4096), dtype=np.float32),
        "Gaussian 4096×512": rng.standard_normal((4096, 512), dtype=np.float32),
        "Gaussian 1024×1024": rng.standard_normal((1024, 1024), dtype=np.float32),
        "decaying σᵢ = 0.99ⁱ, 2048×2048": decaying,
        "Gaussian 4096×4096 / 64, default_rng(0)": (
            np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32) / 64
        ),
    }


def median_times(runs: dict[str, Callable[[int], float]], repeats: int) -> dict[str, tuple[float, float]]:
    """Median seconds of each ``run(repeat_index)`` and the value it returned the first time.

    The runs take turns within every repeat, so a change in the machine's load falls on
    all of them alike rather than on whichever ran during it.
    """
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    first: dict[str, float] = {}
    for repeat in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            value = run(repeat)
            seconds[name].append(time.perf_counter() - start)
            first.setdefault(name, float(value))
    return {name: (statistics.median(times), first[name]) for name, times in seconds.items()}


def median_time(run: Callable[[int], float], repeats: int) -> tuple[float, float]:
    """:func:`median_times` of one run."""
    return median_times({"run": run}, repeats)["run"]


class CountingOperator(scipy.sparse.linalg.LinearOperator):
    """``W`` as a LinearOperator that counts its products with W and Wᵀ."""

    def __init__(self, matrix: np.ndarray) -> None:
        super().__init__(dtype=matrix.dtype, shape=matrix.shape)
        self.matrix = matrix
        self.count = 0

    def _matvec(self, x):
        self.count += 1
        return self.matrix @ x

    def _rmatvec(self, x):
        self.count += 1
        return self.matrix.T @ x

    def _matmat(self, x):
        self.count += x.shape[1]
        return self.matrix @ x

    def _rmatmat(self, x):
        self.count += x.shape[1]
        return self.matrix.T @ x


def arpack(matrix: np.ndarray, tol: float, seed: int) -> float:
    return float(
        scipy.sparse.linalg.svds(
            matrix, k=1, tol=tol, return_singular_vectors=False, random_state=seed
        )[0]
    )


def arpack_matvecs(matrix: np.ndarray, tol: float) -> int:
    operator = CountingOperator(matrix)
    scipy.sparse.linalg.svds(operator, k=1, tol=tol, return_singular_vectors=False, random_state=0)
    return operator.count


def power_iteration(matrix: np.ndarray, seed: int, change: float = RTOL) -> tuple[float, int]:
    """Plain power iteration; stops when σ changes by at most ``change`` relative."""
    v = np.random.default_rng(seed).standard_normal(matrix.shape[1]).astype(matrix.dtype)
    v /= np.linalg.norm(v)
    sigma = 0.0
    for iteration in range(1, 100_001):
        u = matrix @ v
        u /= np.linalg.norm(u)
        w = matrix.T @ u
        previous, sigma = sigma, float(np.linalg.norm(w))
        v = w / sigma
        if abs(sigma - previous) <= change * sigma:
            return sigma, 2 * iteration
    return sigma, 2 * iteration


def krylov_minimum(matrix: np.ndarray, exact: float, rtol: float = RTOL, limit: int = 2000) -> int:
    """Products after which the Krylov space's best estimate is within ``rtol`` of ``exact``.

    Golub–Kahan bidiagonalization in float64 with full reorthogonalization; the largest
    singular value of the bidiagonal matrix after k steps (2k products) is the best estimate
    any method has from those products.
    """
    a = matrix.astype(np.float64)
    m, n = a.shape
    v = np.random.default_rng(0).standard_normal(n)
    v /= np.linalg.norm(v)
    us, vs, alphas, betas = [], [v], [], []
    u = np.zeros(m)
    for k in range(1, min(limit, m, n) + 1):
        u = a @ vs[-1] - (betas[-1] * u if betas else 0.0)
        for basis in (us, us):  # twice: full reorthogonalization
            if basis:
                stacked = np.array(basis)
                u -= stacked.T @ (stacked @ u)
        alpha = np.linalg.norm(u)
        u /= alpha
        us.append(u)
        alphas.append(alpha)
        bidiagonal = np.diag(alphas) + np.diag(betas, 1)
        if abs(exact - scipy.linalg.svdvals(bidiagonal)[0]) <= rtol * exact:
            return 2 * k - 1
        w = a.T @ u - alpha * vs[-1]
        for basis in (vs, vs):
            stacked = np.array(basis)
            w -= stacked.T @ (stacked @ w)
        beta = np.linalg.norm(w)
        betas.append(beta)
        vs.append(w / beta)
    return -1


def measure(
    matrix: np.ndarray, repeats: int, slow_repeats: int
) -> tuple[list[Measurement], lipnorm.SigmaInterval, float]:
    """Every method on ``matrix``; also the certified interval and its median time."""
    import torch

    power_counts = []

    def run_power(seed: int) -> float:
        sigma, count = power_iteration(matrix, seed)
        power_counts.append(count)
        return sigma

    fast = median_times(
        {
            "lipnorm": lambda r: lipnorm.estimate_sigma(matrix, rtol=RTOL, seed=r),
            "arpack default": lambda r: arpack(matrix, 0, r),
            "arpack 1e-6": lambda r: arpack(matrix, RTOL, r),
            "power": run_power,
        },
        repeats,
    )
    _, state = lipnorm.estimate_sigma(matrix, rtol=RTOL, seed=0, return_state=True)
    results = []
    for key, method, matvecs, note in (
        ("lipnorm", "lipnorm estimate_sigma (rtol 1e-6)", state.matvecs, state.method),
        ("arpack default", "scipy svds k=1, ARPACK, default tol", arpack_matvecs(matrix, 0), ""),
        ("arpack 1e-6", "scipy svds k=1, ARPACK, tol=1e-6", arpack_matvecs(matrix, RTOL), ""),
        ("power", "power iteration, stop on Δσ ≤ 1e-6 σ", power_counts[0], ""),
    ):
        seconds, sigma = fast[key]
        passes = state.passes if key == "lipnorm" else matvecs
        results.append(Measurement(method, sigma, seconds, matvecs, note, passes))

    seconds, sigma = median_time(lambda r: np.linalg.norm(matrix, 2), slow_repeats)
    results.append(Measurement("np.linalg.norm(W, 2) (full SVD)", sigma, seconds))
    tensor = torch.from_numpy(matrix)
    seconds, sigma = median_time(lambda r: torch.linalg.matrix_norm(tensor, 2).item(), slow_repeats)
    results.append(Measurement("torch.linalg.matrix_norm(W, 2) (full SVD)", sigma, seconds))

    bounds_seconds, _ = median_time(lambda r: lipnorm.sigma_bounds(matrix).upper, slow_repeats)
    interval = lipnorm.sigma_bounds(matrix)
    return results, interval, bounds_seconds


def measure_cuda(matrix: np.ndarray, repeats: int, slow_repeats: int) -> list[Measurement]:
    """lipnorm and torch's full SVD on a CUDA copy of ``matrix``.

    Each timed call ends by reading sigma on the host, which waits for the GPU; one
    untimed call of each first sets up the CUDA context and kernels.
    """
    import torch

    weight = torch.asarray(matrix, device="cuda")
    float(lipnorm.estimate_sigma(weight, rtol=RTOL, seed=0))
    torch.linalg.matrix_norm(weight, 2).item()
    seconds, sigma = median_time(lambda r: float(lipnorm.estimate_sigma(weight, rtol=RTOL, seed=r)), repeats)
    _, state = lipnorm.estimate_sigma(weight, rtol=RTOL, seed=0, return_state=True)
    results = [Measurement("lipnorm estimate_sigma (rtol 1e-6, cuda)", sigma, seconds, state.matvecs, state.method)]
    seconds, sigma = median_time(lambda r: torch.linalg.matrix_norm(weight, 2).item(), slow_repeats)
    results.append(Measurement("torch.linalg.matrix_norm(W, 2) (full SVD, cuda)", sigma, seconds))
    return results


def fused_block_products(matrix: np.ndarray, block: np.ndarray) -> np.ndarray:
    """``Wᵀ W X`` in one pass over W, a block of rows at a time (as
    ``lipnorm.operators.fused_normal_products`` does for one vector), for ``X`` of any width."""
    rows = max(1, lipnorm.operators.FUSED_CHUNK_BYTES // (matrix.shape[1] * matrix.itemsize))
    normal = np.zeros(block.shape, dtype=matrix.dtype)
    for start in range(0, matrix.shape[0], rows):
        chunk = matrix[start:start + rows]
        normal += chunk.T @ (chunk @ block)
    return normal


def product_costs(matrix: np.ndarray, widths=(1, 2, 4, 8, 16), repeats: int = 20) -> list[str]:
    """Table rows: median times of ``W @ X`` then ``Wᵀ @ (W X)`` (two passes) and of the fused
    ``Wᵀ W X`` (one pass), for ``X`` with each number of columns."""
    rows = []
    single = None
    for width in widths:
        block = np.ones((matrix.shape[1], width) if width > 1 else matrix.shape[1], dtype=matrix.dtype)
        if width == 1:
            fused = lambda r: float(lipnorm.operators.fused_normal_products(matrix, block)[1][0])  # noqa: E731
        else:
            fused = lambda r: float(fused_block_products(matrix, block).ravel()[0])  # noqa: E731
        times = median_times({"two": lambda r: float((matrix.T @ (matrix @ block)).ravel()[0]),
                              "fused": fused}, repeats)
        two, one = times["two"][0], times["fused"][0]
        single = one if single is None else single
        rows.append(f"| {width} | {_seconds(two)} | {_seconds(one)} | {_seconds(one / width)} | "
                    f"{one / single:.1f}× |")
    return rows


def stack_benchmarks(only: list[str], repeats: int) -> tuple[list[str], list[str]]:
    """The stack benchmarks' sections and summary rows."""
    sections, summary = [], []
    rng = np.random.default_rng(1)
    if _kept("stack 1024×64×64 (NumPy)", only):
        stack = rng.standard_normal((1024, 64, 64), dtype=np.float32)
        runs = median_times({
            "batched": lambda r: float(lipnorm.estimate_sigma(stack, batched=True)[0]),
            "loop": lambda r: float([lipnorm.estimate_sigma(matrix) for matrix in stack][0]),
            "svd": lambda r: float(np.linalg.norm(stack, 2, axis=(1, 2))[0]),
        }, repeats)
        sections += _stack_section("stack 1024×64×64 (NumPy)", stack, stack, runs, repeats, {
            "loop": "Python loop of estimate_sigma", "svd": "np.linalg.norm(W, 2, axis=(1, 2)) (batched SVD)"})
        summary.append(_stack_summary_row("1024 × 64×64, float32, NumPy", stack, runs, "loop",
                                          "Python loop of estimate_sigma", 10))
    if _kept("stack 32×1024×1024 (torch)", only):
        import torch

        stack = rng.standard_normal((32, 1024, 1024), dtype=np.float32)
        tensor = torch.from_numpy(stack)
        runs = median_times({
            "batched": lambda r: float(lipnorm.estimate_sigma(tensor, batched=True)[0]),
            "torch": lambda r: float(torch.linalg.matrix_norm(tensor, ord=2)[0]),
        }, max(1, repeats // 2))
        sections += _stack_section("stack 32×1024×1024 (torch)", stack, tensor, runs, max(1, repeats // 2),
                                   {"torch": "torch.linalg.matrix_norm(W, ord=2) (batched SVD)"})
        summary.append(_stack_summary_row("32 × 1024×1024, float32, torch", stack, runs, "torch",
                                          "torch.linalg.matrix_norm(W, ord=2)", 5))
    return sections, summary


def memory_order_section(repeats: int) -> list[str]:
    """A wide float32 matrix (a Llama down_proj's shape) stored C-ordered, next to a
    C-ordered copy of its transpose: the same sigma and the same kind of products; lipnorm
    picks the side its fused products read in memory order (``iterates_on_left``)."""
    rng = np.random.default_rng(2)
    wide = rng.standard_normal((2048, 5632), dtype=np.float32)
    tall = np.ascontiguousarray(wide.T)
    runs = median_times({
        "wide": lambda r: float(lipnorm.estimate_sigma(wide)),
        "tall": lambda r: float(lipnorm.estimate_sigma(tall)),
    }, repeats)
    lines = [
        "## Memory order: Gaussian 2048×5632, C-ordered, and its transpose",
        "",
        f"Medians over {repeats} runs taking turns; both arrays C-ordered (row-major), the tall "
        "one a copy of the wide one's transpose.",
        "",
        "| matrix | time | vs the tall copy | passes over W | side iterated |",
        "|---|---:|---:|---:|---|",
    ]
    for key, matrix in (("wide", wide), ("tall", tall)):
        _, state = lipnorm.estimate_sigma(matrix, return_state=True)
        left = lipnorm.operators.as_operator(matrix).iterates_on_left()
        lines.append(f"| {'×'.join(map(str, matrix.shape))} | {_seconds(runs[key][0])} | "
                     f"{runs[key][0] / runs['tall'][0]:.2f}× | {state.passes} | "
                     f"{'W Wᵀ' if left else 'Wᵀ W'} |")
    return lines + [""]


def _stack_section(name: str, stack: np.ndarray, weight, runs: dict, repeats: int, labels: dict) -> list[str]:
    """A stack's table: lipnorm batched next to the incumbents, errors of every slice, bounds."""
    exact = np.linalg.norm(stack.astype(np.float64), 2, axis=(1, 2))
    ours, state = lipnorm.estimate_sigma(weight, batched=True, return_state=True)
    ours = np.asarray(ours, dtype=np.float64)
    seconds = runs["batched"][0]
    start = time.perf_counter()
    lower, upper = lipnorm.sigma_bounds(weight, batched=True, state=state)
    bounds_seconds = time.perf_counter() - start
    contained = bool(np.all((lower <= exact) & (exact <= upper)))
    lines = [
        f"## {name}",
        "",
        f"Medians over {repeats} runs taking turns. Error: the largest over the slices of "
        "|σ − σ_SVD| / σ_SVD (float64 SVD of each slice).",
        "",
        "| method | time | lipnorm's speed-up | max rel. error |",
        "|---|---:|---:|---:|",
        f"| lipnorm estimate_sigma(W, batched=True) | {_seconds(seconds)} | 1.0× | "
        f"{np.max(np.abs(ours - exact) / exact):.1e} |",
    ]
    for key, label in labels.items():
        lines.append(f"| {label} | {_seconds(runs[key][0])} | {runs[key][0] / seconds:.1f}× | — |")
    iterations = state.iterations
    lines += [
        "",
        f"Iterations per matrix (each a product with W and one with Wᵀ): median "
        f"{np.median(iterations):.0f}, max {iterations.max()}; batched products: "
        f"{state.passes // 2 if state.passes else 0} steps × 2 (stacks are not fused); every "
        f"matrix converged: {'yes' if np.all(state.converged) else 'NO'}.",
        f"`sigma_bounds(W, batched=True, state=state)`: {_seconds(bounds_seconds)}, largest "
        f"upper/lower − 1 = {np.max(upper / lower - 1):.1e}, every interval contains its "
        f"slice's SVD value: {'yes' if contained else 'NO'}.",
        "",
    ]
    return lines


def _stack_summary_row(label: str, stack: np.ndarray, runs: dict, key: str, incumbent: str, target: float) -> str:
    ratio = runs[key][0] / runs["batched"][0]
    return f"| {label} | {incumbent} | {ratio:.1f}× | ≥ {target:g}× | {'met' if ratio >= target else 'not met'} |"


def versions() -> str:
    names = ["lipnorm", "numpy", "scipy", "torch", "array-api-compat"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} {lipnorm.__version__ if name == 'lipnorm' else '?'}")
    return ", ".join(found)


def blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown"
    pools = threadpool_info()
    return "; ".join(f"{p['internal_api']} {p.get('version') or ''} ({p['num_threads']} threads)" for p in pools)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the fast methods")
    parser.add_argument("--slow-repeats", type=int, default=3, help="repeats of full SVDs and bounds")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--only", action="append", default=[],
                        help="keep the matrices (and sections) whose name holds this text; repeatable")
    parser.add_argument("--output", type=Path, help="default: benchmarks/results/bench_sigma[_cuda].md")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    output = args.output or (CUDA_RESULTS if cuda else RESULTS)
    if cuda:
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda needs torch with a CUDA device")

    lines = [
        f"# σ_max of dense float32 matrices{' on CUDA' if cuda else ''}: lipnorm vs "
        f"{'the full SVD' if cuda else 'ARPACK, full SVD, power iteration'}",
        "",
        f"Written by `{'PYTHONPATH=. ' if not cuda else ''}.venv/bin/python benchmarks/bench_sigma.py"
        f"{' --device cuda' if cuda else ''}{''.join(f' --only {text!r}' for text in args.only)}"
        f"{f' --output {args.output}' if args.output else ''}` (rerun it as is on a quiet machine) on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        f"Machine: {os.cpu_count()} CPUs, {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}{', ' + _gpu_name() if cuda else ''}.",
        f"Versions: {versions()}. BLAS: {blas_info()}.",
        f"Times are medians over {args.repeats} runs ({args.slow_repeats} for full SVDs and bounds), "
        "all methods in one process on the same matrix; lipnorm, ARPACK and power iteration "
        "take turns within each repeat. Error: relative to "
        "scipy.linalg.svdvals of the same matrix in float64. Speed-up: time of the method / time "
        "of lipnorm estimate_sigma. Matvecs: products with W or Wᵀ (for ARPACK counted through a "
        "LinearOperator in a separate run). Krylov minimum: see the module docstring; "
        "lipnorm's target is at most 1.3× it.",
        "",
    ]
    load_before = os.getloadavg()
    summary = []
    matrices = {name: m for name, m in benchmark_matrices().items() if _kept(name, args.only)}
    for name, matrix in matrices.items():
        print(f"{name}: reference SVD...", file=sys.stderr, flush=True)
        exact = float(scipy.linalg.svdvals(matrix.astype(np.float64))[0])
        minimum = krylov_minimum(matrix, exact)
        print(f"{name}: measuring...", file=sys.stderr, flush=True)
        if cuda:
            results = measure_cuda(matrix, args.repeats, args.slow_repeats)
        else:
            results, interval, bounds_seconds = measure(matrix, args.repeats, args.slow_repeats)
        ours = results[0]
        lines += [
            f"## {name}",
            "",
            f"σ (float64 SVD) = {exact:.9g}. Krylov minimum for 1e-6: {minimum} matvecs.",
            "",
            "| method | σ | rel. error | time | speed-up of lipnorm | matvecs | passes over W |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for result in results:
            error = abs(result.sigma - exact) / exact
            speedup = result.seconds / ours.seconds
            method = result.method + (f" ({result.note})" if result.note else "")
            lines.append(
                f"| {method} | {result.sigma:.9g} | {error:.1e} | {_seconds(result.seconds)} | "
                f"{speedup:.2f}× | {result.matvecs if result.matvecs is not None else '—'} | "
                f"{result.passes if result.passes is not None else '—'} |"
            )
        lines.append("")
        if not cuda:
            contains = interval.lower <= exact <= interval.upper
            lines += [
                f"`lipnorm.sigma_bounds`: [{interval.lower:.9g}, {interval.upper:.9g}] "
                f"({interval.method}), upper/lower = 1 + {interval.upper / interval.lower - 1:.1e}, "
                f"{_seconds(bounds_seconds)}, contains the SVD value: {'yes' if contains else 'NO'}.",
                "",
            ]
        summary.append(_summary_row(name, exact, minimum, results, cuda))
        print("\n".join(lines[-12:]), file=sys.stderr, flush=True)
    stack_summary: list[str] = []
    if not cuda:
        stack_sections, stack_summary = stack_benchmarks(args.only, args.repeats)
        lines += stack_sections
    if not cuda and _kept("memory order 2048×5632", args.only):
        lines += memory_order_section(args.repeats)
    if not cuda and "Gaussian 4096×4096" in matrices:
        lines += [
            "## Products with several vectors (Gaussian 4096×4096)",
            "",
            "A block Krylov method multiplies W by b vectors per pass over the matrix. Median of "
            "20 products, taking turns: `Wᵀ @ (W @ X)` (two passes) and `Wᵀ W X` fused in one "
            "pass a block of rows at a time (lipnorm's product for b = 1), X with b columns:",
            "",
            "| b | two passes | fused, one pass | fused, per vector | fused vs b = 1 |",
            "|---:|---:|---:|---:|---:|",
            *product_costs(matrices["Gaussian 4096×4096"]),
            "",
        ]
    load_after = os.getloadavg()
    lines[6:6] = [
        f"Load average (1 min) of the machine, which other jobs shared: {load_before[0]:.1f} at the "
        f"start, {load_after[0]:.1f} at the end; ratios between methods are more reliable than "
        "absolute times, product counts more than either.",
    ]
    stack_table = [
        "Stacks (`batched=True`), speed-up of lipnorm over the incumbent in the same run:", "",
        "| stack | incumbent | lipnorm's speed-up | target | |", "|---|---|---:|---:|---|", *stack_summary, "",
    ] if stack_summary else []
    lines[8:8] = ["## Summary", "", *_summary_header(cuda), *summary, "", *stack_table]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines) + "\n")
    print(f"wrote {output}", file=sys.stderr)
    return 0


def _kept(name: str, only: list[str]) -> bool:
    """Whether ``--only`` keeps a matrix or section: no ``--only``, or one of them in its name."""
    return not only or any(text in name for text in only)


def _summary_header(cuda: bool) -> list[str]:
    if cuda:
        return [
            "| matrix | lipnorm error | lipnorm vs full SVD (cuda) | matvecs: lipnorm / Krylov minimum |",
            "|---|---:|---:|---:|",
        ]
    return [
        "| matrix | lipnorm error | ARPACK error | lipnorm vs ARPACK | lipnorm vs full SVD "
        "| matvecs: lipnorm / ARPACK / Krylov minimum | lipnorm / minimum "
        "| passes over W: lipnorm / Golub–Kahan with the same products / ARPACK |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]


def _summary_row(name: str, exact: float, minimum: int, results: list[Measurement], cuda: bool) -> str:
    """One matrix's line of the summary table."""
    ours = results[0]
    by_name = {r.method: r for r in results}
    error = abs(ours.sigma - exact) / exact
    if cuda:
        svd = by_name["torch.linalg.matrix_norm(W, 2) (full SVD, cuda)"]
        return (
            f"| {name} | {error:.1e} | {svd.seconds / ours.seconds:.0f}× | "
            f"{ours.matvecs} / {minimum} ({ours.matvecs / minimum:.2f}×) |"
        )
    arpack_default = by_name["scipy svds k=1, ARPACK, default tol"]
    svd = by_name["np.linalg.norm(W, 2) (full SVD)"]
    return (
        f"| {name} | {error:.1e} | {abs(arpack_default.sigma - exact) / exact:.1e} | "
        f"{arpack_default.seconds / ours.seconds:.2f}× | {svd.seconds / ours.seconds:.0f}× | "
        f"{ours.matvecs} / {arpack_default.matvecs} / {minimum} | {ours.matvecs / minimum:.2f}× | "
        f"{ours.passes} / {ours.matvecs} / {arpack_default.matvecs} |"
    )


def _gpu_name() -> str:
    import torch

    return f"GPU {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"


def _seconds(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


if __name__ == "__main__":
    sys.exit(main())
