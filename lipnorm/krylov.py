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

__all__ = [
    "IterationResult",
    "ScaleError",
    "lanczos",
    "power_iteration",
    "random_vector",
    "scaled_by_power_of_two",
    "times_power_of_two",
    "vector_norm",
]

#: Largest Krylov basis kept before Lanczos restarts from its best Ritz vector.
MAX_BASIS = 256


class ScaleError(ValueError):
    """The operator's products are too small or too large for the working dtype.

    Raised on the first product, before anything is computed from it: products
    near the dtype's underflow threshold lose their digits (subnormal numbers),
    products near its overflow threshold overflow, and either would make the
    iteration converge to a wrong value. :func:`lipnorm.estimate_sigma` scales a
    matrix by a power of two (exactly) and runs again.
    """


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
    with np.errstate(over="ignore", under="ignore"):  # handled below (NumPy warns otherwise)
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
    # Scale the largest entry into [0.5, 1) by an exact power of two.
    exponent = math.frexp(largest)[1]
    return times_power_of_two(float(xp.linalg.vector_norm(scaled_by_power_of_two(x, -exponent))), exponent)


def times_power_of_two(value: float, exponent: int) -> float:
    """``value * 2**exponent`` as a Python float, ``inf`` past the float range."""
    try:
        return math.ldexp(value, exponent)
    except OverflowError:
        return math.copysign(math.inf, value)


def scaled_by_power_of_two(x: Any, exponent: int) -> Any:
    """``x * 2**exponent``, exact unless entries leave the dtype's range.

    Multiplies in steps of at most ``2**60``, a factor every floating dtype from
    single precision up holds (``2**exponent`` itself may not, and ``1 / largest``
    of a subnormal overflows).
    """
    while exponent:
        step = max(-60, min(60, exponent))
        x = x * 2.0**step
        exponent -= step
    return x


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
    return xp.astype(xp.asarray(values, device=operator.device), operator.dtype)


def _epsilon(xp: Any, dtype: Any) -> float:
    """Machine epsilon of the working dtype (single or double precision)."""
    single = dtype == xp.float32 or dtype == xp.complex64
    return 2.0**-23 if single else 2.0**-52


def _product_norm(xp: Any, product: Any, dtype: Any, *, first: bool) -> float:
    """Norm of a product ``A v`` (``v`` a unit vector); the first one is checked for range.

    Raises
    ------
    ScaleError
        If the first product overflowed, or its norm is outside ``[2**-e, 2**e]``
        (``e`` = 64 in single precision, 900 in double): beyond it, the
        products' entries come near the subnormal or overflow thresholds. A zero
        norm is allowed (``v`` in the null space of ``A``).
    ValueError
        If a later product has NaN or Inf entries.
    """
    if not first:
        return _check_finite(vector_norm(xp, product))
    try:
        norm = vector_norm(xp, product)
    except ValueError:
        raise ScaleError(
            "the operator produced NaN or Inf in a matrix-vector product (its first): it "
            "holds NaN/Inf or is too large for its dtype; check the weights or the "
            "operator's matvec, or scale it down by a power of two"
        ) from None
    exponent = 64 if _epsilon(xp, dtype) == 2.0**-23 else 900
    if norm != 0.0 and not 2.0**-exponent <= norm <= 2.0**exponent:
        raise ScaleError(
            f"the operator's products are of order {norm:.1e}, outside [2**-{exponent}, "
            f"2**{exponent}] where its dtype keeps its precision; scale it by a power of two"
        )
    return norm


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

    Raises
    ------
    ScaleError
        If the first product is out of the working dtype's accurate range.
    ValueError
        If a later product has NaN or Inf entries.
    """
    xp = operator.xp
    sigma, residual, u = 0.0, math.inf, None
    for iteration in range(1, max_iter + 1):
        u = operator.matvec(v)
        first = _product_norm(xp, u, operator.dtype, first=iteration == 1)
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

    Raises
    ------
    ScaleError
        If the first product is out of the working dtype's accurate range.
    ValueError
        If a later product has NaN or Inf entries.
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
            alpha = _product_norm(xp, p, operator.dtype, first=iterations == 1)
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
