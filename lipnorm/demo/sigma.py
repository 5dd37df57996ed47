"""Demo section: σ_max of weight matrices, lipnorm's estimate and certified interval next to the SVD."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg

import lipnorm
from lipnorm.demo.report import format_seconds, new_table

__all__ = ["sigma_matrices", "sigma_section"]


def sigma_matrices(seed: int = 0) -> dict[str, np.ndarray]:
    """The matrices of the σ section, by name: typical weights and a hard case each.

    Parameters
    ----------
    seed : int
        Seed of the NumPy generator that draws them.

    Returns
    -------
    dict of str to ndarray
        A square Gaussian float32 matrix (its top singular values are clustered, the hard
        case for power iteration), a tall Gaussian float32 one, a float64 matrix with a
        geometrically decaying spectrum, and a rank-5 float32 one.
    """
    rng = np.random.default_rng(seed)
    n = 1024
    left, _ = np.linalg.qr(rng.standard_normal((n, n)))
    right, _ = np.linalg.qr(rng.standard_normal((n, n)))
    decaying = (left * (3.7 * 0.97 ** np.arange(n))) @ right.T
    return {
        "Gaussian 2048² f32": rng.standard_normal((2048, 2048), dtype=np.float32),
        "Gaussian 4096×256 f32": rng.standard_normal((4096, 256), dtype=np.float32),
        "decaying 1024² f64": decaying,
        "rank 5 1000×800 f32": (
            rng.standard_normal((1000, 5), dtype=np.float32)
            @ rng.standard_normal((5, 800), dtype=np.float32)
        ),
    }


def sigma_section(console: Any, output_dir: Path) -> None:
    """Print estimates and certified intervals of :func:`sigma_matrices` next to the SVD."""
    estimates = new_table(
        "estimate_sigma(W) next to the SVD",
        ("matrix", "SVD σ", "SVD time", "lipnorm σ", "rel. err", "time", "matvecs"),
    )
    bounds = new_table(
        "sigma_bounds(W): certified interval",
        ("matrix", "lower", "upper", "upper/lower−1", "time", "SVD inside"),
    )
    for name, matrix in sigma_matrices().items():
        start = time.perf_counter()
        exact = float(scipy.linalg.svdvals(matrix.astype(np.float64))[0])
        svd_seconds = time.perf_counter() - start

        start = time.perf_counter()
        sigma, state = lipnorm.estimate_sigma(matrix, return_state=True, seed=0)
        sigma = float(sigma)
        sigma_seconds = time.perf_counter() - start

        start = time.perf_counter()
        interval = lipnorm.sigma_bounds(matrix)
        bounds_seconds = time.perf_counter() - start

        estimates.add_row(
            name, f"{exact:.8g}", format_seconds(svd_seconds), f"{sigma:.8g}",
            f"{abs(sigma - exact) / exact:.1e}", format_seconds(sigma_seconds), str(state.matvecs),
        )
        inside = interval.lower <= exact <= interval.upper
        bounds.add_row(
            name, f"{interval.lower:.9g}", f"{interval.upper:.9g}",
            f"{interval.upper / interval.lower - 1:.1e}", format_seconds(bounds_seconds),
            "[green]yes" if inside else "[red]NO",
        )
    console.print(estimates)
    console.print(
        "SVD: scipy.linalg.svdvals in float64. lipnorm: estimate_sigma(W), rtol=1e-6. "
        "matvecs: products with W and Wᵀ."
    )
    console.print(bounds)
    console.print(
        "The interval contains the exact σ, every float rounding error accounted for. An "
        "estimate (power iteration, Lanczos) is not a bound: in exact arithmetic it lies below σ."
    )
