r"""Gram iteration on a stack of matrices: certified upper and lower bounds on each σ₁.

For a matrix :math:`G_0` and :math:`G_{t+1} = G_t^H G_t`, :math:`\sigma_1(G_0)^{2^t} =
\sigma_1(G_t) \le \|G_t\|_F`, and :math:`\|G_t\|_F \le \sqrt{r}\,\sigma_1(G_t)` for rank
:math:`r`, so :math:`\|G_t\|_F^{2^{-t}}` converges to :math:`\sigma_1` from above and
:math:`(\|G_t\|_F / \sqrt r)^{2^{-t}}` from below (Delattre et al. 2023).

Floating point: each step divides by an exact power of two (no rounding) and the
product's rounding error :math:`E_t` satisfies :math:`\|E_t\|_2 \le c_k \|\hat G_t\|_F^2`
with :math:`c_k = 2\gamma_{k+2}` (complex dot products of length :math:`k`, Higham §3.6).
With :math:`s_t = \sigma_1(\hat G_t)` of the *computed* matrices and scale :math:`f_t`,
Weyl's inequality gives :math:`f_t s_{t+1} - e_t \le s_t^2 \le f_t s_{t+1} + e_t`;
the bounds on :math:`s_T` from the last Frobenius norm are carried back to :math:`s_0`.

References
----------
B. Delattre, Q. Barthélemy, A. Araujo, A. Allauzen, "Efficient Bound of Lipschitz Constant
for Convolutional Layers by Gram Iteration", ICML 2023.
"""

from __future__ import annotations

import numpy as np

from lipnorm.conv.spectrum import _U, gamma

__all__ = ["gram_iteration_bounds"]


def _frobenius_bounds(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds on the Frobenius norm of each matrix of a stack."""
    count = g.shape[-1] * g.shape[-2]
    frob = np.sqrt(np.sum(g.real**2 + g.imag**2, axis=(-2, -1)))
    margin = gamma(2 * count + 4)
    return frob * (1 - margin), frob * (1 + margin)


def gram_iteration_bounds(blocks: np.ndarray, steps: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Certified bounds on the largest singular value of each matrix of a stack.

    Parameters
    ----------
    blocks : ndarray, complex128 or float64, shape (..., p, q)
    steps : int
        Number of Gram steps ``T``; the upper bound's overestimate is at most a factor
        ``r ** (1 / 2 ** (T + 1))``.

    Returns
    -------
    lower, upper : ndarray, float64, shape (...)
        ``lower <= sigma_1(blocks[i]) <= upper`` for every matrix, rounding included.

    Examples
    --------
    >>> import numpy as np
    >>> lo, hi = gram_iteration_bounds(np.diag([3.0, 1.0])[None], steps=6)
    >>> bool(lo[0] <= 3.0 <= hi[0])
    True
    """
    g = np.asarray(blocks)
    if g.shape[-2] < g.shape[-1]:  # sigma_1(B) = sigma_1(B^H): work on the taller side
        g = np.conj(np.swapaxes(g, -1, -2))
    rank = min(g.shape[-2:])
    scales, errors = [], []
    for _ in range(steps):
        k = g.shape[-2]
        _, frob_hi = _frobenius_bounds(g)
        product = np.conj(np.swapaxes(g, -1, -2)) @ g
        errors.append(2 * gamma(k + 2) * frob_hi**2 * (1 + 4 * _U))
        _, scale_ref = _frobenius_bounds(product)
        exponent = np.where(scale_ref > 0, np.round(np.log2(np.where(scale_ref > 0, scale_ref, 1.0))), 0.0)
        scale = np.exp2(exponent)  # exact powers of two
        scales.append(scale)
        g = product / scale[..., None, None]
    frob_lo, frob_hi = _frobenius_bounds(g)
    upper, lower = frob_hi, frob_lo / np.sqrt(rank)
    for scale, err in zip(reversed(scales), reversed(errors)):
        upper = np.sqrt(scale * upper + err)
        lower = np.sqrt(np.maximum(scale * lower - err, 0.0))
    slack = 16 * _U * (steps + 2)
    return lower * (1 - slack), upper * (1 + slack)
