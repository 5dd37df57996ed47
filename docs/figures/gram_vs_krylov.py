"""Gram iteration converges to σ from above while Krylov (Lanczos) converges from below.

On a Gaussian 400×300 matrix: the certified upper bound of ``sigma_bounds(W,
method="gram", steps=k)`` for k = 1..8, and the Lanczos estimate after a given number of
products (``estimate_sigma(W, method="lanczos", max_iter=k)``), each as its relative
distance to σ_max from the float64 SVD. Writes docs/img/gram_vs_krylov.png.
"""

from __future__ import annotations

import warnings

import matplotlib.pyplot as plt
import numpy as np
import scipy.linalg

import lipnorm
from _style import save


def main() -> None:
    W = np.random.default_rng(0).standard_normal((400, 300))
    sigma = float(scipy.linalg.svdvals(W)[0])
    steps = range(1, 9)
    above = [lipnorm.sigma_bounds(W, method="gram", steps=k).upper / sigma - 1 for k in steps]
    iterations = range(1, 31)
    below = []
    for k in iterations:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lipnorm.ConvergenceWarning)
            estimate = float(lipnorm.estimate_sigma(W, method="lanczos", max_iter=k, seed=0))
        if estimate > sigma * (1 + 1e-12):
            raise AssertionError(f"a Lanczos estimate above sigma_max: {estimate} > {sigma}")
        below.append(max(1 - estimate / sigma, 1e-16))
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.4), sharey=True)
    left.semilogy(steps, above, "v-", color="tab:red")
    left.set_xlabel("Gram iteration steps k")
    left.set_ylabel("relative distance to σ_max")
    left.set_title("upper bound ‖G_k‖_F^(1/2^k), from above")
    right.semilogy(iterations, below, "^-", color="tab:blue")
    right.set_xlabel("Lanczos iterations")
    right.set_title("Lanczos estimate, from below")
    for ax in (left, right):
        ax.grid(True, which="major", alpha=0.3)
    save(fig, "gram_vs_krylov.png")


if __name__ == "__main__":
    main()
