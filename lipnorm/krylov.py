"""Iterative estimates of the largest singular value: power iteration and Lanczos.

Both methods work on any :class:`lipnorm.operators.LinearOperator` and keep every
vector in the operator's namespace, dtype and device; only scalars (norms, the
small bidiagonal matrix) come to the host, to decide when to stop.

Both stop on the residual of the Ritz pair ``(sigma, u, v)``: with
``A v = sigma u`` and ``r = A^H u - sigma v``, the augmented Hermitian matrix
``[[0, A], [A^H, 0]]`` has an eigenvalue within ``||r|| / sqrt(2)`` of ``sigma``
(Bauer-Fike / Weyl for Hermitian matrices). Stopping when ``||r|| <= rtol * sigma``
therefore bounds the error by ``rtol`` relative to the singular value the
iteration converged to, which for a random (or warm) start is the largest.
Unlike a rule on the change of sigma between steps, this rule does not stop
early on clustered spectra (Gaussian matrices), where sigma creeps.

References
----------
.. [1] G. Golub and W. Kahan, "Calculating the singular values and pseudo-inverse
   of a matrix", SIAM J. Numer. Anal. 2(2), 1965 (bidiagonalization).
.. [2] Y. Saad, *Numerical Methods for Large Eigenvalue Problems*, 2nd ed., SIAM
   2011, §4.3 (residual bounds) and §6.3 (Lanczos with reorthogonalization).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from lipnorm.operators import LinearOperator

__all__ = ["IterationResult", "lanczos", "power_iteration", "random_vector", "vector_norm"]

#: Largest Krylov basis kept before Lanczos restarts from its best Ritz vector.
MAX_BASIS = 256


@dataclasses.dataclass
class IterationResult:
    """What an iterative method found.

    Attributes
    ----------
    sigma : float
        The estimate (a Ritz value: never above the true sigma_max, up to rounding).
    u, v : array
        Unit left and right Ritz vectors, in the operator's namespace.
    residual : float
        ``||A^H u - sigma v||``.
    converged : bool
        Whether ``residual <= rtol * sigma`` was reached (or the Krylov space
        became invariant, which makes the result exact).
    iterations : int
        Iterations run (one iteration = one ``matvec`` and one ``rmatvec``).
    matvecs : int
        Matrix-vector products used (``matvec`` plus ``rmatvec``).
    """

    sigma: float
    u: Any
    v: Any
    residual: float
    converged: bool
    iterations: int
    matvecs: int


def vector_norm(xp: Any, x: Any) -> float:
    """Euclidean norm of a vector as a Python float, safe from overflow and underflow.

    The plain norm squares entries, which overflows above ~1e19 and loses all
    digits below ~1e-19 in float32; in that case the vector is scaled by its
    largest magnitude first.
    """
    norm = float(xp.linalg.vector_norm(x))
    if math.isfinite(norm) and norm > 1e-15:
        return norm
    largest = float(xp.max(xp.abs(x)))
    if largest == 0.0:
        return 0.0
    if not math.isfinite(largest):
        raise ValueError(
            "the operator produced NaN or Inf in a matrix-vector product; "
            "check the weights or the operator's matvec"
        )
    return largest * float(xp.linalg.vector_norm(x / largest))


def random_vector(operator: LinearOperator, length: int, seed: Any) -> Any:
    """A unit Gaussian start vector from NumPy's ``Generator``, moved to the operator's device.

    The array API has no random numbers, so lipnorm draws them with NumPy
    (seedable with ``seed``) and converts them to the operator's dtype and device.
    """
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(length)
    xp = operator.xp
    if xp.isdtype(operator.dtype, "complex floating"):
        values = values + 1j * rng.standard_normal(length)
    values /= np.linalg.norm(values)
    host = xp.asarray(values, device=operator.device) if operator.device is not None else None
    if host is None:
        host = xp.asarray(values)
    return xp.astype(host, operator.dtype)


def _epsilon(xp: Any, dtype: Any) -> float:
    """Machine epsilon of the working dtype (single or double precision)."""
    single = dtype == xp.float32 or dtype == xp.complex64
    return 2.0**-23 if single else 2.0**-52


def _check_finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(
            "the operator produced NaN or Inf in a matrix-vector product; "
            "check the weights or the operator's matvec"
        )
    return value


def power_iteration(
    operator: LinearOperator, v: Any, *, rtol: float, max_iter: int
) -> IterationResult:
    """Power iteration on ``A^H A`` from the unit vector ``v``.

    Parameters
    ----------
    operator : LinearOperator
    v : array, shape (n,)
        Unit start vector in the operator's namespace.
    rtol : float
        Stop when the residual is at most ``rtol * sigma``.
    max_iter : int
        Iterations allowed.

    Returns
    -------
    IterationResult
    """
    xp = operator.xp
    sigma, residual, u = 0.0, math.inf, None
    for iteration in range(1, max_iter + 1):
        u = operator.matvec(v)
        first = _check_finite(vector_norm(xp, u))
        if first == 0.0:
            return IterationResult(0.0, u, v, 0.0, True, iteration, 2 * iteration - 1)
        u = u / first
        w = operator.rmatvec(u)
        sigma = _check_finite(vector_norm(xp, w))
        residual = vector_norm(xp, w - first * v)
        v = w / sigma
        if residual <= rtol * sigma:
            return IterationResult(sigma, u, v, residual, True, iteration, 2 * iteration)
    return IterationResult(sigma, u, v, residual, False, max_iter, 2 * max_iter)


def _orthogonalize(xp: Any, x: Any, basis: list[Any], complex_dtype: bool) -> Any:
    """Remove from ``x`` its components along the orthonormal ``basis`` (twice, CGS2)."""
    if not basis:
        return x
    stacked = xp.stack(basis)
    conjugated = xp.conj(stacked) if complex_dtype else stacked
    for _ in range(2):
        x = x - xp.matmul(xp.matmul(conjugated, x), stacked)
    return x


def lanczos(operator: LinearOperator, v: Any, *, rtol: float, max_iter: int) -> IterationResult:
    """Golub-Kahan-Lanczos bidiagonalization with full reorthogonalization.

    Builds ``A V_k = U_k B_k`` with ``B_k`` upper bidiagonal; the largest singular
    value of ``B_k`` is the estimate, and ``beta_k |p_k|`` (``p`` the top left
    singular vector of ``B_k``) is the exact residual of the Ritz pair, so the
    stopping rule costs no extra product. The basis is restarted from the best
    Ritz vector after :data:`MAX_BASIS` steps. When the Krylov space becomes
    invariant (a rank-deficient matrix, or the whole space is spanned) the
    result is exact.

    Parameters
    ----------
    operator : LinearOperator
    v : array, shape (n,)
        Unit start vector in the operator's namespace.
    rtol : float
        Stop when the residual is at most ``rtol * sigma``.
    max_iter : int
        Iterations allowed (each is one ``matvec`` and one ``rmatvec``).

    Returns
    -------
    IterationResult
    """
    xp = operator.xp
    complex_dtype = bool(xp.isdtype(operator.dtype, "complex floating"))
    negligible = 10 * _epsilon(xp, operator.dtype)
    m, n = operator.shape
    basis_limit = max(1, min(m, n, MAX_BASIS))
    iterations = 0
    while True:
        left: list[Any] = []
        right: list[Any] = [v]
        alphas: list[float] = []
        betas: list[float] = []
        sigma = 0.0
        while True:
            iterations += 1
            p = operator.matvec(right[-1])
            if left:
                p = _orthogonalize(xp, p - betas[-1] * left[-1], left, complex_dtype)
            alpha = _check_finite(vector_norm(xp, p))
            if not alphas and alpha == 0.0:
                # A v = 0 for a random start: A is the zero operator.
                return IterationResult(0.0, p, v, 0.0, True, iterations, 2 * iterations - 1)
            if alphas and alpha <= negligible * sigma:
                # A V_k lies in span(U_k): the singular values of [B_k | beta_k e_k] are exact.
                sigma, left_coef, right_coef = _top_triplet(_bidiagonal(alphas, betas, True))
                return IterationResult(
                    sigma,
                    _combine(xp, left_coef, left, operator),
                    _combine(xp, right_coef, right, operator),
                    0.0,
                    True,
                    iterations,
                    2 * iterations - 1,
                )
            left.append(p / alpha)
            alphas.append(alpha)
            r = _orthogonalize(
                xp, operator.rmatvec(left[-1]) - alpha * right[-1], right, complex_dtype
            )
            beta = _check_finite(vector_norm(xp, r))
            betas.append(beta)
            sigma, left_coef, right_coef = _top_triplet(_bidiagonal(alphas, betas, False))
            residual = abs(beta * left_coef[-1])
            if len(alphas) >= m and beta > negligible * sigma:
                # U_k spans the whole range: A = U_k [B_k | beta_k e_k] V_{k+1}^H exactly.
                right.append(r / beta)
                sigma, left_coef, right_coef = _top_triplet(_bidiagonal(alphas, betas, True))
                residual = 0.0
            converged = (
                residual <= rtol * sigma or beta <= negligible * sigma or len(alphas) >= n
            )
            if converged or len(alphas) >= basis_limit or iterations >= max_iter:
                break
            right.append(r / beta)
        u_ritz = _combine(xp, left_coef, left, operator)
        v_ritz = _combine(xp, right_coef, right, operator)
        if converged or iterations >= max_iter:
            return IterationResult(
                sigma, u_ritz, v_ritz, residual, converged, iterations, 2 * iterations
            )
        v = v_ritz / vector_norm(xp, v_ritz)


def _bidiagonal(alphas: list[float], betas: list[float], rectangular: bool) -> np.ndarray:
    """``B_k`` (k x k), or ``[B_k | beta_k e_k]`` (k x (k+1)) when ``rectangular``."""
    k = len(alphas)
    matrix = np.zeros((k, k + 1 if rectangular else k))
    matrix[np.arange(k), np.arange(k)] = alphas
    couplings = k if rectangular else k - 1
    matrix[np.arange(couplings), np.arange(1, couplings + 1)] = betas[:couplings]
    return matrix


def _top_triplet(matrix: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Largest singular value of a small host matrix with its left and right vectors."""
    left, values, right_t = np.linalg.svd(matrix)
    return float(values[0]), left[:, 0], right_t[0, :]


def _combine(xp: Any, coefficients: Any, vectors: list[Any], operator: LinearOperator) -> Any:
    """``sum_i coefficients[i] * vectors[i]`` in the operator's namespace."""
    weights = xp.asarray(coefficients, device=operator.device)
    weights = xp.astype(weights, operator.dtype)
    return xp.matmul(weights, xp.stack(vectors))
