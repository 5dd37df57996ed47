"""Power iteration against Lanczos on a clustered spectrum: error against matrix-vector products.

A Gaussian 1500×1500 matrix has its top singular values crowded together, the hard case
for power iteration. Each point is one call of ``lipnorm.estimate_sigma`` (power: a given
number of iterations; Lanczos: a given ``rtol``), placed at the products it used
(``state.matvecs``) and the relative error it reached against the float64 SVD. ARPACK
(``scipy.sparse.linalg.svds(k=1)``) is marked at the products it needed for its default
tolerance. Writes docs/img/power_vs_lanczos.png.
"""

from __future__ import annotations

import warnings

import matplotlib.pyplot as plt
import numpy as np
import scipy.linalg
import scipy.sparse.linalg

import lipnorm
from _style import save

N = 1500


def error_curve(W: np.ndarray, sigma: float, method: str, settings) -> tuple[list, list]:
    """(products, relative error) of one estimate per setting (max_iter or rtol)."""
    products, errors = [], []
    for setting in settings:
        options = {"max_iter": setting, "rtol": 1e-15} if method == "power" else {"rtol": setting}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lipnorm.ConvergenceWarning)
            estimate, state = lipnorm.estimate_sigma(W, method=method, return_state=True, seed=0,
                                                     **options)
        products.append(state.matvecs)
        errors.append(max(abs(float(estimate) - sigma) / sigma, 1e-16))
    return products, errors


def arpack_products(W: np.ndarray) -> tuple[int, float]:
    """Products (W x and Wᵀ y) ARPACK's svds(k=1) used, and the σ it returned."""
    count = [0]

    def counted(f):
        def apply(x):
            count[0] += 1
            return f(x)
        return apply

    operator = scipy.sparse.linalg.LinearOperator(
        W.shape, matvec=counted(lambda x: W @ x), rmatvec=counted(lambda y: W.T @ y), dtype=W.dtype,
    )
    value = scipy.sparse.linalg.svds(operator, k=1, return_singular_vectors=False,
                                     random_state=0)[0]
    return count[0], float(value)


def main() -> None:
    W = np.random.default_rng(0).standard_normal((N, N))
    sigma = float(scipy.linalg.svdvals(W)[0])
    power = error_curve(W, sigma, "power", [2, 5, 10, 20, 40, 80, 160, 320, 640])
    lanczos = error_curve(W, sigma, "lanczos", [1e-2, 1e-3, 1e-4, 1e-6, 1e-8, 1e-10, 1e-12])
    arpack, arpack_sigma = arpack_products(W)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.semilogy(*power, "o-", label="power iteration")
    ax.semilogy(*lanczos, "s-", label="Lanczos (lipnorm's default)")
    ax.axvline(arpack, color="gray", linestyle="--")
    ax.annotate(f"ARPACK svds(k=1): {arpack} products,\nrelative error "
                f"{max(abs(arpack_sigma - sigma) / sigma, 1e-16):.0e}",
                (arpack, 1e-9), xytext=(8, 0), textcoords="offset points", fontsize=8)
    ax.set_xlabel("matrix-vector products (W x and Wᵀ y)")
    ax.set_ylabel("relative error of σ")
    ax.set_title(f"Gaussian {N}×{N}: a clustered top of the spectrum")
    ax.legend(loc="upper right")
    save(fig, "power_vs_lanczos.png")


if __name__ == "__main__":
    main()
