"""``lipnorm demo``: what lipnorm computes, side by side with the exact answer.

The demo is a list of sections, :data:`SECTIONS`, run in order by :func:`run_demo`. A
section is a title and a function that prints to a ``rich`` console; a new feature adds
its section to the list.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg

import lipnorm

__all__ = ["SECTIONS", "DemoSection", "run_demo", "sigma_matrices"]


@dataclass(frozen=True)
class DemoSection:
    """One part of the demo.

    Attributes
    ----------
    title : str
        Heading printed above the section.
    run : callable
        ``run(console)`` prints the section to a ``rich.console.Console``.
    """

    title: str
    run: Callable[[Any], None]


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
    decaying = (left * 0.97 ** np.arange(n)) @ right.T
    return {
        "Gaussian 2048×2048 (clustered top)": rng.standard_normal((2048, 2048), dtype=np.float32),
        "Gaussian 4096×256 (tall)": rng.standard_normal((4096, 256), dtype=np.float32),
        "decaying spectrum 1024×1024": decaying,
        "rank 5, 1000×800": (
            rng.standard_normal((1000, 5), dtype=np.float32)
            @ rng.standard_normal((5, 800), dtype=np.float32)
        ),
    }


def _sigma_section(console: Any) -> None:
    from rich.table import Table

    table = Table(show_lines=False)
    for column in (
        "matrix", "dtype", "SVD σ (float64)", "SVD time", "lipnorm σ", "rel. error",
        "time", "matvecs", "certified interval", "upper/lower", "SVD inside",
    ):
        table.add_column(column, justify="left" if column in ("matrix", "dtype") else "right")
    for name, matrix in sigma_matrices().items():
        start = time.perf_counter()
        exact = float(scipy.linalg.svdvals(matrix.astype(np.float64))[0])
        svd_seconds = time.perf_counter() - start

        start = time.perf_counter()
        sigma, state = lipnorm.estimate_sigma(matrix, return_state=True)
        sigma = float(sigma)
        sigma_seconds = time.perf_counter() - start
        interval = lipnorm.sigma_bounds(matrix)

        inside = interval.lower <= exact <= interval.upper
        table.add_row(
            name, str(matrix.dtype), f"{exact:.9g}", f"{svd_seconds:.2f} s",
            f"{sigma:.9g}", f"{abs(sigma - exact) / exact:.1e}", f"{sigma_seconds * 1e3:.0f} ms",
            str(getattr(state, "matvecs", "?")),
            f"[{interval.lower:.9g}, {interval.upper:.9g}]",
            f"{interval.upper / interval.lower:.6f}",
            "[green]yes" if inside else "[red]NO",
        )
    console.print(table)
    console.print(
        "lipnorm σ: estimate_sigma(W) with its default rtol=1e-6. certified interval: "
        "sigma_bounds(W), which contains the exact σ with float rounding accounted for. "
        "matvecs: products with W and Wᵀ."
    )


SECTIONS: list[DemoSection] = [
    DemoSection("σ_max of weight matrices: lipnorm next to the SVD", _sigma_section),
]


def run_demo(console: Any) -> None:
    """Print every section of :data:`SECTIONS` to ``console`` (a ``rich.console.Console``)."""
    for section in SECTIONS:
        console.rule(section.title)
        section.run(console)
