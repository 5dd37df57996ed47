"""Iterative estimates of the largest singular value: power iteration and Lanczos.

Both methods work on any :class:`lipnorm.operators.LinearOperator` and keep every
vector in the operator's namespace, dtype and device; only scalars (norms, the
small bidiagonal matrix) come to the host, to decide when to stop.

Both stop on an error estimate of the Ritz value ``sigma`` with its vectors
``u, v`` (``A v = sigma u``, residual ``r = A^H u - sigma v``); ``[u; v] / sqrt(2)``
is then an approximate eigenvector of the augmented Hermitian matrix
``[[0, A], [A^H, 0]]``, whose eigenvalues are ``+-sigma_i``, with Rayleigh quotient
``sigma`` and residual ``||r|| / sqrt(2)``.

* The residual rule (power iteration; Lanczos from a warm start, or while the gap is
  not resolved): some singular value lies within ``||r|| / sqrt(2)`` of ``sigma``
  (Weyl), so ``||r|| <= rtol * sigma`` bounds the error by ``rtol`` relative to the
  singular value the iteration converged to, which for a random (or warm) start is
  the largest unless the top values form a cluster a few ``rtol`` wide.
* The gap rule (Lanczos): ``sigma**2`` is the Rayleigh quotient of ``v`` for
  ``A^H A``, with residual ``sigma ||r||``. If no singular value but sigma_max lies
  above ``sigma_2 < sigma``, Kato-Temple's bound for ``A^H A`` gives
  ``sigma_max - sigma <= sigma ||r||^2 / (2 (sigma - sigma_2) (sigma + sigma_2))``,
  about ``||r||^2 / (4 (sigma - sigma_2))``. Lanczos takes the gap from its own
  Ritz values ``theta_1 >= theta_2`` with residuals ``||r_1||, ||r_2||``:
  ``g = theta_1 - theta_2 - max(||r_1||, ||r_2||)`` (the gap less what both may still
  move, as PROPACK does), ``sigma_2 <= theta_1 - g`` and ``sigma_2 >= theta_2``
  (interlacing), and stops when ``sigma ||r_1||^2 / (2 g (sigma + theta_2)) <= rtol * sigma``.
  The gap counts as resolved only once ``g`` exceeds ``||r_2||`` (``theta_2`` has
  settled: from a warm start, or early on, it may still be far from the value it
  will converge to) and :data:`GAP_RESIDUALS` times ``||r_1||`` (on a cluster,
  ``theta_2`` may have found a lower member while the members next to sigma_max,
  within a few residuals of ``sigma``, are not yet resolved). Until then the
  residual rule decides; the gap rule alone decides for relative gaps above about
  ``4 GAP_RESIDUALS**2 rtol``. The gap rule must hold at two steps in a row: a
  singular value the Krylov space had not yet resolved shows up as a jump of
  ``theta_2``, which closes the gap. The error of the top Ritz value falls like
  ``||r||^2 / g``, so the residual rule alone would run on until the error is orders
  of magnitude below ``rtol``.

The gap rule is as good as its gap: a singular value the Krylov space has not
yet separated from sigma_max (a few residuals below it, on a repeated or clustered
top, it merges into the top Ritz vector instead of showing as ``theta_2``) is
invisible to it, and the estimate then falls short of the error by up to that
value's distance to sigma_max; no rule built on the Ritz values of one Krylov
space can tell. A warm start close to one singular vector makes that likely for
the values clustered with it, so Lanczos uses the gap rule only from a random
start (``random_start=True``). Unlike a rule on the change of sigma between
steps, neither rule stops early on clustered spectra (Gaussian matrices), where
sigma creeps.

References
----------
.. [1] G. Golub and W. Kahan, "Calculating the singular values and pseudo-inverse
   of a matrix", SIAM J. Numer. Anal. 2(2), 1965 (bidiagonalization).
.. [2] Y. Saad, *Numerical Methods for Large Eigenvalue Problems*, 2nd ed., SIAM
   2011, §4.3 (residual bounds) and §6.3 (Lanczos with reorthogonalization).
.. [3] B. N. Parlett, *The Symmetric Eigenvalue Problem*, SIAM 1998, §10.5
   (Kato-Temple: error bounds from the residual and the gap).
.. [4] R. M. Larsen, "Lanczos bidiagonalization with partial reorthogonalization",
   DAIMI PB-357, 1998 (PROPACK; its refined error bounds from the Ritz values' gaps).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import scipy.linalg

from lipnorm.operators import LinearOperator, to_numpy_dtype

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
#: The gap rule needs the gap to the second Ritz value to be this many top residuals wide.
GAP_RESIDUALS = 10.0


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
    error : float
        The estimate of ``sigma_max - sigma`` the method stopped on (see the module
        docstring): the gap rule's bound where the gap was resolved, else the residual.
    converged : bool
        Whether ``error <= rtol * sigma`` was reached (or the Krylov space
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
    error: float
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
    (seedable with ``seed``), converts them to the operator's dtype on the host and
    copies them to its device (once: a device without double precision never sees
    a float64 array).
    """
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(length)
    if operator.xp.isdtype(operator.dtype, "complex floating"):
        values = values + 1j * rng.standard_normal(length)
    values /= np.linalg.norm(values)
    return _on_device(values, operator)


def _on_device(values: np.ndarray, operator: LinearOperator) -> Any:
    """Host ``values`` in the operator's dtype (cast on the host), copied to its device."""
    host = np.asarray(values, dtype=to_numpy_dtype(operator.dtype))
    return operator.xp.asarray(host, device=operator.device)


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
        Stop when the residual is at most ``rtol * sigma`` (the residual rule).
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
            return IterationResult(0.0, u, v, 0.0, 0.0, True, iteration, 2 * iteration - 1)
        u = u / first
        w = operator.rmatvec(u)
        sigma = _check_finite(vector_norm(xp, w))
        residual = vector_norm(xp, w - first * v)
        v = w / sigma
        if residual <= rtol * sigma:
            return IterationResult(sigma, u, v, residual, residual, True, iteration, 2 * iteration)
    return IterationResult(sigma, u, v, residual, residual, False, max_iter, 2 * max_iter)


def _orthogonalize(xp: Any, x: Any, basis: list[Any], complex_dtype: bool) -> Any:
    """Remove from ``x`` its components along the orthonormal ``basis`` (twice, CGS2)."""
    if not basis:
        return x
    stacked = xp.stack(basis)
    conjugated = xp.conj(stacked) if complex_dtype else stacked
    for _ in range(2):
        x = x - xp.matmul(xp.matmul(conjugated, x), stacked)
    return x


def lanczos(
    operator: LinearOperator, v: Any, *, rtol: float, max_iter: int, random_start: bool = False
) -> IterationResult:
    """Golub-Kahan-Lanczos bidiagonalization with full reorthogonalization.

    Builds ``A V_k = U_k B_k`` with ``B_k`` upper bidiagonal; the largest singular
    value of ``B_k`` is the estimate, and ``beta_k |p_k|`` (``p`` its left singular
    vector) is the exact residual of the Ritz pair. The same for the second singular
    value gives the gap, so the stopping rule (the gap rule of the module docstring
    from a random start, the residual rule while the gap is not resolved or from any
    other start) costs no extra product, and the two top singular triplets of ``B_k``
    cost O(k) a step. The basis is restarted
    from the best Ritz vector after :data:`MAX_BASIS` steps. When the Krylov space
    becomes invariant (a rank-deficient matrix, or the whole space is spanned) the
    result is exact.

    Parameters
    ----------
    operator : LinearOperator
    v : array, shape (n,)
        Unit start vector in the operator's namespace.
    rtol : float
        Stop when the error estimate is at most ``rtol * sigma``.
    max_iter : int
        Iterations allowed (each is one ``matvec`` and one ``rmatvec``).
    random_start : bool
        Whether ``v`` is a random vector, which has a component along every singular
        vector: then the gap rule may stop. A warm start (a vector close to a singular
        vector) hides the singular values near it from the first Krylov spaces, so the
        gap its Ritz values show may not exist: only the residual rule stops then.

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
    sigma = 0.0
    while True:
        left: list[Any] = []
        right: list[Any] = [v]
        alphas: list[float] = []
        betas: list[float] = []
        gap_rule_held = False  # at the previous step of this Krylov space
        while True:
            iterations += 1
            p = operator.matvec(right[-1])
            if left:
                p = _orthogonalize(xp, p - betas[-1] * left[-1], left, complex_dtype)
            alpha = _product_norm(xp, p, operator.dtype, first=iterations == 1)
            if not alphas and alpha == 0.0:
                # A v = 0 for a random start: A is the zero operator.
                return IterationResult(0.0, p, v, 0.0, 0.0, True, iterations, 2 * iterations - 1)
            if alphas and alpha <= negligible * sigma:
                # A V_k lies in span(U_k): the singular values of [B_k | beta_k e_k] are exact.
                return _exact_result(operator, alphas, betas, left, right, iterations, 2 * iterations - 1)
            left.append(p / alpha)
            alphas.append(alpha)
            r = _orthogonalize(
                xp, operator.rmatvec(left[-1]) - alpha * right[-1], right, complex_dtype
            )
            beta = _check_finite(vector_norm(xp, r))
            betas.append(beta)
            ritz = _top_ritz(alphas, betas)
            sigma = ritz.sigma
            if len(alphas) >= m and beta > negligible * sigma:
                # U_k spans the whole range: A = U_k [B_k | beta_k e_k] V_{k+1}^H exactly.
                right.append(r / beta)
                return _exact_result(operator, alphas, betas, left, right, iterations, 2 * iterations)
            error = ritz.error if random_start else ritz.residual
            gap_rule_holds = random_start and ritz.error <= rtol * sigma
            converged = (
                ritz.residual <= rtol * sigma
                or (gap_rule_holds and gap_rule_held)
                or beta <= negligible * sigma
                or len(alphas) >= n
            )
            gap_rule_held = gap_rule_holds
            if converged or len(alphas) >= basis_limit or iterations >= max_iter:
                break
            right.append(r / beta)
        u_ritz = _combine(xp, ritz.left, left, operator)
        v_ritz = _combine(xp, ritz.right, right, operator)
        if converged or iterations >= max_iter:
            return IterationResult(
                sigma, u_ritz, v_ritz, ritz.residual, error, converged, iterations, 2 * iterations
            )
        v = v_ritz / vector_norm(xp, v_ritz)


@dataclasses.dataclass
class _RitzEstimate:
    """The top Ritz value of ``B_k`` with its residual, error estimate and coefficients."""

    sigma: float
    residual: float
    error: float
    left: np.ndarray  # coefficients of the left Ritz vector in U_k
    right: np.ndarray  # coefficients of the right Ritz vector in V_k


def _top_ritz(alphas: list[float], betas: list[float]) -> _RitzEstimate:
    """The top Ritz value of ``B_k`` (``alphas`` on its diagonal, ``betas[:-1]`` above it).

    The two largest singular values ``theta_i`` of ``B_k`` and their right vectors ``q``
    are the top eigenpairs of the tridiagonal ``B_k^T B_k`` (scaled by the largest
    alpha so that squaring cannot overflow): LAPACK's MRRR (``stemr``) computes them
    in O(k), a dense SVD of ``B_k`` costs O(k^3). The left vectors
    are ``p = B_k q / theta``; the residuals ``beta_k |p_k| = beta_k alpha_k |q_k| / theta``.
    Squaring loses nothing the top two values need: their relative accuracy stays
    near the machine epsilon.
    """
    k = len(alphas)
    if k == 1:  # B_1 = [alpha_1]: its vectors are [1], its residual beta_1
        return _RitzEstimate(alphas[0], betas[0], betas[0], np.ones(1), np.ones(1))
    scale = max(alphas)
    diagonal = np.asarray(alphas) / scale
    above = np.asarray(betas[: k - 1]) / scale
    gram_diagonal = diagonal**2
    gram_diagonal[1:] += above**2
    gram_beside = diagonal[:-1] * above
    found, values, vectors, info = scipy.linalg.lapack.dstemr(
        gram_diagonal, np.append(gram_beside, 0.0), 2, 0.0, 0.0, k - 1, k
    )
    if info or found != 2:  # LAPACK did not converge: the dense SVD instead
        return _ritz_from_svd(alphas, betas)
    values, vectors = values[1::-1], vectors[:, 1::-1]  # descending
    thetas = np.sqrt(np.maximum(values, 0.0)) * scale
    right = vectors[:, 0]
    left = diagonal * right
    left[:-1] += above * right[1:]
    residuals = [
        betas[-1] * (alphas[-1] / theta) * abs(vectors[-1, i]) if theta > 0 else betas[-1]
        for i, theta in enumerate(thetas)
    ]
    return _RitzEstimate(
        float(thetas[0]),
        residuals[0],
        _error_estimate(thetas, residuals),
        left / np.linalg.norm(left),
        right / np.linalg.norm(right),
    )


def _ritz_from_svd(alphas: list[float], betas: list[float]) -> _RitzEstimate:
    """What :func:`_top_ritz` computes, from a dense SVD of ``B_k`` (O(k^3))."""
    k = len(alphas)
    left, values, right_t = np.linalg.svd(_augmented_bidiagonal(alphas, betas)[:, :k])
    residuals = [abs(betas[-1] * left[-1, i]) for i in range(2)]
    return _RitzEstimate(
        float(values[0]), residuals[0], _error_estimate(values, residuals), left[:, 0], right_t[0]
    )


def _error_estimate(values: np.ndarray, residuals: list[float]) -> float:
    """Estimate of ``sigma_max - theta_1`` from the top Ritz values and their residuals.

    The gap rule's bound ``theta_1 r_1^2 / (2 g (theta_1 + theta_2))`` with
    ``g = theta_1 - theta_2 - max(r_1, r_2)`` where that gap exceeds ``r_2`` and
    :data:`GAP_RESIDUALS` times ``r_1`` (see the module docstring), else ``r_1`` (the
    residual rule).
    """
    top = residuals[0]
    if len(values) < 2:
        return top
    first, second = float(values[0]), float(values[1])
    gap = first - second - max(residuals)
    if gap <= max(GAP_RESIDUALS * top, residuals[1]):
        return top
    return top * (top / gap) * (first / (2.0 * (first + second)))


def _exact_result(
    operator: LinearOperator,
    alphas: list[float],
    betas: list[float],
    left: list[Any],
    right: list[Any],
    iterations: int,
    matvecs: int,
) -> IterationResult:
    """The exact top triplet once the Krylov space is invariant (``A V_k`` in span(U_k),
    or U_k spans the range), from the k x (k+1) matrix ``[B_k | beta_k e_k]``;
    ``right`` holds ``V_{k+1}``."""
    sigma, left_coef, right_coef = _top_triplet(_augmented_bidiagonal(alphas, betas))
    xp = operator.xp
    return IterationResult(
        sigma,
        _combine(xp, left_coef, left, operator),
        _combine(xp, right_coef, right, operator),
        0.0,
        0.0,
        True,
        iterations,
        matvecs,
    )


def _augmented_bidiagonal(alphas: list[float], betas: list[float]) -> np.ndarray:
    """``[B_k | beta_k e_k]`` (k x (k+1)): ``alphas`` on the diagonal, ``betas`` above it."""
    k = len(alphas)
    matrix = np.zeros((k, k + 1))
    matrix[np.arange(k), np.arange(k)] = alphas
    matrix[np.arange(k), np.arange(1, k + 1)] = betas
    return matrix


def _top_triplet(matrix: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Largest singular value of a small host matrix with its left and right vectors."""
    left, values, right_t = np.linalg.svd(matrix)
    return float(values[0]), left[:, 0], right_t[0, :]


def _combine(xp: Any, coefficients: Any, vectors: list[Any], operator: LinearOperator) -> Any:
    """``sum_i coefficients[i] * vectors[i]`` in the operator's namespace."""
    return xp.matmul(_on_device(coefficients, operator), xp.stack(vectors))
