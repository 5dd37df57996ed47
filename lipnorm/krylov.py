"""Iterative estimates of the largest singular value: power iteration and Lanczos.

Both methods work on any :class:`lipnorm.operators.LinearOperator`, a single one or
a stack of matrices iterated together (:class:`lipnorm.operators.DenseStack`), and
keep every vector in the operator's namespace, dtype and device; only scalars
(norms, the small tridiagonal matrices) come to the host, once a step for the
whole stack, to decide when to stop. Each matrix stops on its own ``rtol`` and
leaves the batch when it has converged.

Both iterate on the normal operator ``A^H A``: one call of
:meth:`~lipnorm.operators.LinearOperator.products` gives ``A x`` and ``A^H A x``,
which a NumPy matrix computes in one pass over its entries (a pass is what a
product with a large matrix costs). Lanczos on ``A^H A`` from ``v`` builds the same
Krylov space as Golub-Kahan bidiagonalization from ``v``, and its tridiagonal
``T_k`` is Golub-Kahan's ``B_k^H B_k``: the Ritz values are the squares of the same
singular values. Every quantity is scaled by a power of four fixed at the first
step (exact), so that ``A^H A`` stays inside the dtype's range.

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

from lipnorm._xp import device_of, to_numpy
from lipnorm.operators import LinearOperator, to_numpy_dtype

__all__ = [
    "IterationResult",
    "ScaleError",
    "StackResult",
    "lanczos",
    "lanczos_stack",
    "power_iteration",
    "power_stack",
    "random_vector",
    "random_vectors",
    "column_of",
    "unit_rows",
    "scaled_by_power_of_two",
    "times_power_of_two",
    "vector_norm",
]

#: Largest Krylov basis kept before Lanczos restarts from its best Ritz vector.
MAX_BASIS = 256
#: The gap rule needs the gap to the second Ritz value to be this many top residuals wide.
GAP_RESIDUALS = 10.0
#: Up to this many matrices at a step, their Ritz pairs come from LAPACK's MRRR one by one
#: (O(k) each); more come from one batched dense eigendecomposition.
_MRRR_COUNT = 4
#: The first step at which a matrix of a large batch has its Ritz pairs computed.
_FIRST_CHECK = 4
#: Cost model of a check (:func:`_check_interval`): flops of a dense ``eigh`` of a k x k
#: matrix per ``k**3``, and the fixed cost of one (a LAPACK call and its share of the batch's
#: Python), in flops.
_EIGH_FLOPS = 40
_CHECK_OVERHEAD_FLOPS = 10_000
#: Finished matrices leave the batch once the unfinished ones are at most this share of it.
_COMPACT_SHARE = 0.75
#: ... and the batch holds at least this many entries (a smaller one costs little to carry).
_COMPACT_ENTRIES = 1 << 18
#: Columns of the Lanczos basis held at first; the capacity doubles as the basis grows.
_FIRST_CAPACITY = 8
#: The first product's norm must lie in [2**-e, 2**e], e by precision (single, double):
#: then ``A^H A`` and the squares in its norms stay inside the dtype's normal range.
_RANGE_EXPONENTS = (40, 480)


class ScaleError(ValueError):
    """The operator's products are too small or too large for the working dtype.

    Raised on the first product, before anything is computed from it: products
    near the dtype's underflow threshold lose their digits (subnormal numbers),
    products near its overflow threshold overflow, and either would make the
    iteration converge to a wrong value. :func:`lipnorm.estimate_sigma` scales a
    matrix by a power of two (exactly) and runs again.

    Attributes
    ----------
    slots : numpy.ndarray
        The matrices of the stack whose products are out of range.
    """

    def __init__(self, message: str, slots: np.ndarray | None = None) -> None:
        super().__init__(message)
        self.slots = np.zeros(0, dtype=np.int64) if slots is None else slots


@dataclasses.dataclass
class IterationResult:
    """What an iterative method found for one operator.

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


@dataclasses.dataclass
class StackResult:
    """What an iterative method found for each matrix of a stack (``count`` of them).

    Attributes
    ----------
    sigma, residual, error : numpy.ndarray, float64, shape (count,)
        As in :class:`IterationResult`, per matrix.
    converged : numpy.ndarray, bool, shape (count,)
    iterations : numpy.ndarray, int64, shape (count,)
        Steps each matrix took (each one product with ``A`` and one with ``A^H``).
    u : array, shape (count, m)
    v : array, shape (count, n)
        Unit Ritz vectors, in the operator's namespace and device.
    passes : int
        Calls of the operator's ``products`` over the steps (batched over the stack).
    """

    sigma: np.ndarray
    residual: np.ndarray
    error: np.ndarray
    converged: np.ndarray
    iterations: np.ndarray
    u: Any
    v: Any
    passes: int = 0

    @property
    def matvecs(self) -> np.ndarray:
        """Products with ``A`` or ``A^H`` per matrix (two per step)."""
        return 2 * self.iterations


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


def random_vectors(operator: LinearOperator, count: int, length: int, seed: Any) -> Any:
    """``count`` unit Gaussian start vectors from NumPy's ``Generator``, on the operator's device.

    The array API has no random numbers, so lipnorm draws them with NumPy
    (seedable with ``seed``), converts them to the operator's dtype on the host and
    copies them to its device (once: a device without double precision never sees
    a float64 array). Row ``i`` takes the draws after those of rows ``< i`` (real
    parts, then imaginary parts), so row 0 is :func:`random_vector`'s vector.

    Returns
    -------
    array, shape (count, length)
    """
    rng = np.random.default_rng(seed)
    complex_dtype = operator.xp.isdtype(operator.dtype, "complex floating")
    if complex_dtype:
        parts = rng.standard_normal((count, 2, length))
        values = parts[:, 0] + 1j * parts[:, 1]
    else:
        values = rng.standard_normal((count, length))
    values /= np.linalg.norm(values, axis=1, keepdims=True)
    return _on_device(values, operator)


def random_vector(operator: LinearOperator, length: int, seed: Any) -> Any:
    """A unit Gaussian start vector: :func:`random_vectors` with one row, as a 1-D array."""
    return operator.xp.reshape(random_vectors(operator, 1, length, seed), (length,))


def _on_device(values: np.ndarray, operator: LinearOperator) -> Any:
    """Host ``values`` in the operator's dtype (cast on the host), copied to its device."""
    host = np.asarray(values, dtype=to_numpy_dtype(operator.dtype))
    return operator.xp.asarray(host, device=operator.device)


def column_of(values: np.ndarray, operator: LinearOperator) -> Any:
    """Real host ``values`` (one per matrix) as a ``(count, 1)`` array of the operator's dtype
    on its device, to scale rows of vectors (TensorFlow multiplies no complex by real)."""
    host = np.asarray(values, dtype=to_numpy_dtype(operator.dtype)).reshape(-1, 1)
    return operator.xp.asarray(host, device=operator.device)


def _like_vectors(xp: Any, x: Any, operator: LinearOperator) -> Any:
    """A real device array (norms) in the operator's dtype, to multiply its vectors."""
    return x if x.dtype == operator.dtype else xp.astype(x, operator.dtype)


def _on_real(xp: Any, values: np.ndarray, operator: LinearOperator) -> Any:
    """Real host ``values`` (one per matrix) on the device, in the operator's real dtype."""
    return xp.asarray(np.asarray(values, dtype=_real_numpy_dtype(operator)), device=operator.device)


def _real_numpy_dtype(operator: LinearOperator) -> type:
    return np.float32 if _epsilon(operator.xp, operator.dtype) == 2.0**-23 else np.float64


def _epsilon(xp: Any, dtype: Any) -> float:
    """Machine epsilon of the working dtype (single or double precision)."""
    single = dtype == xp.float32 or dtype == xp.complex64
    return 2.0**-23 if single else 2.0**-52


def _host(xp: Any, *arrays: Any) -> np.ndarray:
    """Device arrays of one shape brought to the host in one transfer, as float64 rows."""
    return np.asarray(to_numpy(xp.stack(arrays)), dtype=np.float64)


def _row_norms(xp: Any, x: Any) -> Any:
    """The Euclidean norm of each row of ``x`` (count, length), on the device."""
    return xp.linalg.vector_norm(x, axis=-1)


def _first_norms(forward: Any) -> np.ndarray:
    """Norms of the rows of the first products, computed on the host in double precision (no
    square underflows or overflows there, whatever the working dtype)."""
    host = to_numpy(forward)
    host = host.astype(np.complex128 if np.iscomplexobj(host) else np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.linalg.norm(host, axis=-1)


def _check_first_products(norms: np.ndarray, slots: np.ndarray, operator: LinearOperator) -> None:
    """Raise :class:`ScaleError` unless each first product's norm is 0 or in range.

    The range is ``[2**-e, 2**e]`` (:data:`_RANGE_EXPONENTS`): beyond it the products'
    entries, or those of ``A^H A``, come near the subnormal or overflow thresholds.
    """
    exponent = _RANGE_EXPONENTS[0 if _epsilon(operator.xp, operator.dtype) == 2.0**-23 else 1]
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(norms) | ((norms != 0.0) & ((norms < 2.0**-exponent) | (norms > 2.0**exponent)))
    if not np.any(bad):
        return
    if not np.all(np.isfinite(norms[bad])):
        message = (
            "the operator produced NaN or Inf in a matrix-vector product (its first): it "
            "holds NaN/Inf or is too large for its dtype; check the weights or the "
            "operator's matvec, or scale it down by a power of two"
        )
    else:
        worst = float(np.max(np.abs(np.log2(norms[bad]))))
        message = (
            f"the operator's products are of order 2**{worst:.0f}, outside [2**-{exponent}, "
            f"2**{exponent}] where its dtype keeps its precision; scale it by a power of two"
        )
    raise ScaleError(message, slots[bad])


def _check_finite(values: np.ndarray) -> None:
    if not np.all(np.isfinite(values)):
        raise ValueError(
            "the operator produced NaN or Inf in a matrix-vector product; "
            "check the weights or the operator's matvec"
        )


def _scales(norms: np.ndarray) -> np.ndarray:
    """Powers of four near ``norms**2`` (1 for a zero norm): what ``A^H A`` is divided by."""
    exponents = np.frexp(np.where(norms > 0, norms, 1.0))[1]
    return np.ldexp(1.0, 2 * exponents.astype(np.int64))


class _Outcome:
    """Results of the matrices of a stack as they finish, assembled in their order at the end."""

    def __init__(self, count: int) -> None:
        self.sigma = np.zeros(count)
        self.residual = np.zeros(count)
        self.error = np.zeros(count)
        self.converged = np.zeros(count, dtype=bool)
        self.iterations = np.zeros(count, dtype=np.int64)
        self._vectors: list[tuple[np.ndarray, Any, Any]] = []

    def record(self, slots, sigma, residual, error, converged, iterations, u, v) -> None:
        self.sigma[slots], self.residual[slots], self.error[slots] = sigma, residual, error
        self.converged[slots], self.iterations[slots] = converged, iterations
        self._vectors.append((slots, u, v))

    def result(self, xp: Any, device: Any, passes: int) -> StackResult:
        order = np.concatenate([slots for slots, _, _ in self._vectors])
        if len(self._vectors) == 1:
            u, v = self._vectors[0][1:]
        else:
            u = xp.concat([u for _, u, _ in self._vectors], axis=0)
            v = xp.concat([v for _, _, v in self._vectors], axis=0)
        if not np.array_equal(order, np.arange(order.size)):
            inverse = xp.asarray(np.argsort(order), device=device)
            u, v = xp.take(u, inverse, axis=0), xp.take(v, inverse, axis=0)
        return StackResult(self.sigma, self.residual, self.error, self.converged, self.iterations,
                           u, v, passes)


def _take(xp: Any, x: Any, positions: np.ndarray, device: Any) -> Any:
    """Rows ``positions`` (host integers) of a device array."""
    if np.array_equal(positions, np.arange(int(x.shape[0]))):
        return x
    return xp.take(x, xp.asarray(np.asarray(positions, dtype=np.int64), device=device), axis=0)


def unit_rows(xp: Any, x: Any, operator: LinearOperator) -> tuple[Any, np.ndarray]:
    """Each row of ``x`` (count, length) divided by its norm, and the norms (host): zero rows
    stay zero."""
    norms = _host(xp, _row_norms(xp, x))[0]
    return x * column_of(np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0), operator), norms


def power_stack(operator: LinearOperator, start: Any, *, rtol: Any, max_iter: int) -> StackResult:
    """Power iteration on ``A^H A`` for every matrix of the operator, from ``start``.

    Parameters
    ----------
    operator : LinearOperator
        ``count`` matrices of shape (m, n).
    start : array, shape (count, n)
        Unit start vectors in the operator's namespace.
    rtol : float or numpy.ndarray, shape (count,)
        Matrix ``i`` stops when its residual is at most ``rtol[i]`` times its sigma (the
        residual rule).
    max_iter : int
        Iterations allowed.

    Returns
    -------
    StackResult

    Raises
    ------
    ScaleError
        If a first product is out of the working dtype's accurate range.
    ValueError
        If a later product has NaN or Inf entries.
    """
    xp, device = operator.xp, operator.device
    rtol = np.broadcast_to(np.asarray(rtol, dtype=np.float64), (operator.count,)).copy()
    outcome = _Outcome(operator.count)
    slots = np.arange(operator.count)
    v = start
    passes = 0
    for step in range(1, max_iter + 1):
        forward, normal = operator.products(v)
        passes += 1
        if step == 1:
            _check_first_products(_first_norms(forward), slots, operator)
        first = _host(xp, _row_norms(xp, forward))[0]
        if step == 1:
            scales = _scales(first)
        # In units of the scale s: alpha = ||A v||^2 / s = v^H (A^H A / s) v.
        alpha = first**2 / scales
        normal = normal * column_of(1.0 / scales, operator)
        image = normal - column_of(alpha, operator) * v
        image_norm, residual_norm = _host(xp, _row_norms(xp, normal), _row_norms(xp, image))
        _check_finite(image_norm)
        root = np.sqrt(scales)
        scaled_first = first / root
        zero = scaled_first == 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            sigma = np.where(zero, 0.0, image_norm / scaled_first)
            residual = np.where(zero, 0.0, residual_norm / scaled_first)
        finished = (residual <= rtol * sigma) | (step == max_iter)
        inverse = np.where(image_norm > 0, 1.0 / np.where(image_norm > 0, image_norm, 1.0), 0.0)
        next_v = normal * column_of(inverse, operator)
        if np.any(finished):
            done = np.flatnonzero(finished)
            u = forward * column_of(np.where(zero, 0.0, 1.0 / np.where(zero, 1.0, first)), operator)
            next_or_start = next_v if not np.any(zero) else next_v + v * column_of(zero, operator)
            outcome.record(slots[done], (sigma * root)[done], (residual * root)[done],
                           (residual * root)[done], (residual <= rtol * sigma)[done], step,
                           _take(xp, u, done, device), _take(xp, next_or_start, done, device))
            keep = np.flatnonzero(~finished)
            if keep.size == 0:
                break
            slots, rtol, scales = slots[keep], rtol[keep], scales[keep]
            operator = operator.take(keep)
            next_v = _take(xp, next_v, keep, device)
        v = next_v
    return outcome.result(xp, device, passes)


def _orthogonalize(xp: Any, x: Any, stacked: Any, conjugated: Any) -> Any:
    """Remove from each row of ``x`` (count, n) its components along that matrix's
    orthonormal basis ``stacked`` (count, k, n), twice (CGS2)."""
    count, k, n = (int(s) for s in stacked.shape)
    for _ in range(2):
        coefficients = xp.matmul(conjugated, xp.reshape(x, (count, n, 1)))
        x = x - xp.reshape(xp.matmul(xp.reshape(coefficients, (count, 1, k)), stacked), (count, n))
    return x


def _combine(xp: Any, coefficients: np.ndarray, stacked: Any, operator: LinearOperator) -> Any:
    """``sum_i coefficients[:, i] * stacked[:, i]`` per matrix: (count, k) x (count, k, n)."""
    count, k = coefficients.shape
    weights = _on_device(coefficients.reshape(count, 1, k), operator)
    return xp.reshape(xp.matmul(weights, stacked), (count, int(stacked.shape[2])))


def lanczos_stack(
    operator: LinearOperator, start: Any, *, rtol: Any, max_iter: int, random_start: Any = False
) -> StackResult:
    """Lanczos on ``A^H A`` with full reorthogonalization, for every matrix of the operator.

    All matrices advance together: one call of ``operator.products`` per step serves
    the stack, and one transfer brings the step's coefficients to the host. The top
    Ritz pairs of each tridiagonal ``T_k`` give the estimate ``sqrt(theta_1)``, the
    exact residual ``beta_k |s_k| / sqrt(theta_1)`` of its Ritz pair and, from the
    second pair, the gap; a matrix stops on the gap rule of the module docstring (from
    a random start), the residual rule (always), or when its Krylov space becomes
    invariant (a rank-deficient matrix, or the whole space is spanned: the result is
    then exact), and leaves the batch. The basis is restarted from the best Ritz
    vector after :data:`MAX_BASIS` steps.

    Parameters
    ----------
    operator : LinearOperator
        ``count`` matrices of shape (m, n) (a single operator: ``count`` = 1).
    start : array, shape (count, n)
        Unit start vectors in the operator's namespace.
    rtol : float or numpy.ndarray, shape (count,)
        Matrix ``i`` stops when its error estimate is at most ``rtol[i]`` times its sigma.
    max_iter : int
        Steps allowed (each is one ``matvec`` and one ``rmatvec`` per matrix).
    random_start : bool or numpy.ndarray of bool, shape (count,)
        Whether a start vector is random, which has a component along every singular
        vector: then the gap rule may stop it. A warm start (a vector close to a singular
        vector) hides the singular values near it from the first Krylov spaces, so the
        gap its Ritz values show may not exist: only the residual rule stops then.

    Returns
    -------
    StackResult

    Raises
    ------
    ScaleError
        If a first product is out of the working dtype's accurate range.
    ValueError
        If a later product has NaN or Inf entries.
    """
    xp, device = operator.xp, operator.device
    count = operator.count
    complex_dtype = bool(xp.isdtype(operator.dtype, "complex floating"))
    negligible = 10 * _epsilon(xp, operator.dtype)
    m, n = operator.shape
    # rank <= m: the Krylov space of A^H A from v becomes invariant after m + 1 steps at most
    basis_limit = max(1, min(n, m + 1, MAX_BASIS))
    outcome = _Outcome(count)
    batch = _Batch(np.arange(count), np.broadcast_to(np.asarray(rtol, dtype=np.float64), (count,)).copy(),
                   np.broadcast_to(np.asarray(random_start, dtype=bool), (count,)).copy())
    current = start
    step = passes = 0
    while True:
        # The basis q_1..q_k fills the first k columns of ``stacked`` (count, capacity, n),
        # zeros beyond: its shape changes only when the capacity doubles (JAX compiles each
        # new shape once), and the zero columns drop out of every product.
        capacity = min(_FIRST_CAPACITY, basis_limit)
        stacked = _placed(xp, current, xp.zeros((batch.size, capacity, n), dtype=operator.dtype, device=device), 0)
        previous = previous_beta = None
        images = []
        alphas = np.zeros((batch.size, basis_limit))  # the tridiagonal T_k of each matrix
        betas = np.zeros((batch.size, basis_limit))
        held = np.zeros(batch.size, dtype=bool)  # the gap rule held at the previous step
        k = 0
        while True:
            step += 1
            forward, normal = operator.products(current)
            passes += 1
            if batch.scales is None:
                first = _first_norms(forward)
                _check_first_products(first, batch.slots, operator)
                batch.scale(_scales(first), operator)
            alpha = _row_norms(xp, forward) ** 2 * batch.inverse_scales
            w = normal * batch.inverse_column - xp.reshape(_like_vectors(xp, alpha, operator), (batch.size, 1)) * current
            if previous is not None:
                w = w - previous_beta * previous
            conjugated = xp.conj(stacked) if complex_dtype else stacked
            w = _orthogonalize(xp, w, stacked, conjugated)
            alphas[:, k], betas[:, k] = _host(xp, alpha, _row_norms(xp, w))
            _check_finite(alphas[:, k])
            _check_finite(betas[:, k])
            images.append(forward)
            k += 1
            beta = betas[:, k - 1]
            due = _due_rows(k, step, batch, alphas[:, :k], beta, negligible,
                            every=k >= basis_limit or k >= n or step >= max_iter)
            if not np.any(due):
                previous, previous_beta = current, column_of(beta, operator)
                current = w * column_of(np.where(beta > 0, 1.0 / np.where(beta > 0, beta, 1.0), 0.0), operator)
                if k == int(stacked.shape[1]):
                    grown = min(2 * k, basis_limit)
                    stacked = xp.concat(
                        [stacked, xp.zeros((batch.size, grown - k, n), dtype=operator.dtype, device=device)], axis=1)
                stacked = _placed(xp, current, stacked, k)
                continue
            ritz, error = _RitzPairs.of_rows(alphas[:, :k], betas[:, :k], due)
            gap_rule_holds = batch.random_start & (error <= batch.rtol * ritz.sigma)
            converged = due & (
                (ritz.residual <= batch.rtol * ritz.sigma)
                | (gap_rule_holds & held)
                | (beta <= negligible * ritz.theta)
                | (k >= n)
            )
            held = gap_rule_holds
            batch.schedule(due & ~converged, step, ritz, _check_interval(k, m, n))
            finished = batch.live & (converged | (step >= max_iter))
            batch.live &= ~finished
            restart = bool(np.any(batch.live)) and k >= basis_limit
            padding = np.zeros((batch.size, int(stacked.shape[1]) - k))
            if np.any(finished):
                done = np.flatnonzero(finished)
                coefficients = np.concatenate([ritz.vectors, padding], axis=1)[done]
                v_done = _combine(xp, coefficients, _take(xp, stacked, done, device), operator)
                images_done = _take(xp, xp.stack(images, axis=1), done, device)
                u_done = unit_rows(xp, _combine(xp, ritz.vectors[done], images_done, operator), operator)[0]
                root = np.sqrt(batch.scales[done])
                outcome.record(
                    batch.slots[done], ritz.sigma[done] * root, ritz.residual[done] * root,
                    np.where(batch.random_start, error, ritz.residual)[done] * root, converged[done], step,
                    u_done, v_done,
                )
                if not np.any(batch.live):
                    return outcome.result(xp, device, passes)
            if not np.all(batch.live) and (restart or (
                    np.count_nonzero(batch.live) <= _COMPACT_SHARE * batch.size
                    and batch.size * m * n >= _COMPACT_ENTRIES)):
                # The finished matrices leave the batch. Until then their rows ride along: a
                # new batch size costs a copy of the stack (and JAX a compilation of each
                # operation), which pays only for many large matrices.
                keep = np.flatnonzero(batch.live)
                batch.keep(keep, operator)
                operator = operator.take(keep)
                held, beta, alphas, betas = held[keep], beta[keep], alphas[keep], betas[keep]
                ritz, padding = ritz.rows(keep), padding[keep]
                stacked, current, w = (_take(xp, x, keep, device) for x in (stacked, current, w))
                images = [_take(xp, image, keep, device) for image in images]
            if restart:
                coefficients = np.concatenate([ritz.vectors, padding], axis=1)
                current = unit_rows(xp, _combine(xp, coefficients, stacked, operator), operator)[0]
                break
            previous, previous_beta = current, column_of(beta, operator)
            inverse = np.where(beta > 0, 1.0 / np.where(beta > 0, beta, 1.0), 0.0)
            current = w * column_of(inverse, operator)
            if k == int(stacked.shape[1]):
                grown = min(2 * k, basis_limit)
                stacked = xp.concat(
                    [stacked, xp.zeros((batch.size, grown - k, n), dtype=operator.dtype, device=device)], axis=1)
            stacked = _placed(xp, current, stacked, k)


def _due_rows(k: int, step: int, batch: "_Batch", alphas: np.ndarray, beta: np.ndarray,
              negligible: float, *, every: bool) -> np.ndarray:
    """Which matrices of the batch get their Ritz pairs computed and the stopping rules
    tried at this step (a boolean mask).

    All of them at every step for a few matrices, or where the gap rule may stop (it must
    hold at two steps in a row), or when ``every`` (a restart, or the last step allowed).
    Many matrices at once (a stack of small ones, where the batched eigendecomposition of
    their tridiagonals can cost more than the step's products) are checked when their
    turn has come (:meth:`_Batch.schedule`), and at any step where their coupling ``beta``
    is negligible (an invariant Krylov space, which must stop now). Skipping a check only
    delays a stop: a matrix is never stopped but by the rules of the module docstring.
    """
    if every or batch.size <= _MRRR_COUNT or np.any(batch.random_start):
        return batch.live.copy()
    invariant = beta <= negligible * np.max(alphas, axis=1)
    return batch.live & (invariant | (batch.due <= step))


def _check_interval(k: int, m: int, n: int) -> int:
    """Steps between two checks of a matrix that the cost rule allows: the dense
    eigendecomposition of its ``k x k`` tridiagonal (:data:`_EIGH_FLOPS` ``k**3`` and
    :data:`_CHECK_OVERHEAD_FLOPS`) against one step of its products and
    reorthogonalization (``4 m n + 4 k n``). At least one; one for large matrices, where a
    check costs little next to a step (and a step skipped past convergence much)."""
    check = _EIGH_FLOPS * k**3 + _CHECK_OVERHEAD_FLOPS
    return max(1, int(check // (4 * m * n + 4 * k * n)))


@dataclasses.dataclass
class _Batch:
    """What Lanczos keeps per matrix of the batch, on the host and as device scale factors."""

    slots: np.ndarray  # the matrix of the stack each row stands for
    rtol: np.ndarray
    random_start: np.ndarray
    live: np.ndarray | None = None  # not finished yet
    scales: np.ndarray | None = None  # powers of four A^H A is divided by
    inverse_scales: Any = None  # 1 / scales on the device, real dtype
    inverse_column: Any = None  # 1 / scales on the device, (size, 1), the vectors' dtype
    due: np.ndarray | None = None  # the step of the next check (see _due_rows)
    checked: np.ndarray | None = None  # the step of the last check (0: none yet)
    checked_log: np.ndarray | None = None  # log(residual / (rtol sigma)) at the last check

    def __post_init__(self) -> None:
        self.live = np.ones(self.slots.size, dtype=bool)
        self.due = np.full(self.slots.size, _FIRST_CHECK)
        self.checked = np.zeros(self.slots.size, dtype=np.int64)
        self.checked_log = np.zeros(self.slots.size)

    def schedule(self, rows: np.ndarray, step: int, ritz: "_RitzPairs", interval: int) -> None:
        """Set when the matrices ``rows`` (checked at ``step``, not converged) are checked
        next: where the relative residual fell since their last check, at the step its
        linear (in the logarithm) extrapolation reaches ``rtol``; else ``interval`` ahead.
        Never more than twice ``interval`` nor a quarter of the steps so far ahead: a
        check skipped costs at most that share of extra steps."""
        if not np.any(rows):
            return
        with np.errstate(divide="ignore", invalid="ignore"):
            distance = np.log(ritz.residual[rows] / (self.rtol[rows] * ritz.sigma[rows]))
        distance = np.where(np.isfinite(distance), distance, np.inf)
        previous, since = self.checked_log[rows], step - self.checked[rows]
        falling = (self.checked[rows] > 0) & (distance < previous) & np.isfinite(distance)
        with np.errstate(divide="ignore", invalid="ignore"):
            needed = np.where(falling, np.ceil(distance * since / np.where(falling, previous - distance, 1.0)),
                              interval)
        ahead = min(2 * interval, max(2, step // 4))
        self.due[rows] = step + np.clip(needed, 1, ahead).astype(np.int64)
        self.checked[rows], self.checked_log[rows] = step, distance

    @property
    def size(self) -> int:
        return self.slots.size

    def scale(self, scales: np.ndarray, operator: LinearOperator) -> None:
        self.scales = scales
        self.inverse_scales = _on_real(operator.xp, 1.0 / scales, operator)
        self.inverse_column = column_of(1.0 / scales, operator)

    def keep(self, positions: np.ndarray, operator: LinearOperator) -> None:
        self.slots, self.rtol = self.slots[positions], self.rtol[positions]
        self.random_start, self.live = self.random_start[positions], self.live[positions]
        self.due, self.checked = self.due[positions], self.checked[positions]
        self.checked_log = self.checked_log[positions]
        self.scale(self.scales[positions], operator)


def _placed(xp: Any, vectors: Any, stacked: Any, column: int) -> Any:
    """``stacked`` (count, capacity, n) with ``vectors`` (count, n) in column ``column``:
    written in place where the library allows it (``stacked`` is the caller's own array),
    else a new array (JAX and TensorFlow arrays are immutable)."""
    try:
        stacked[:, column, :] = vectors
        return stacked
    except (TypeError, ValueError, NotImplementedError):
        pass
    count, capacity, n = (int(s) for s in stacked.shape)
    mask = np.zeros((1, capacity, 1), dtype=bool)
    mask[0, column, 0] = True
    where = xp.asarray(mask, device=device_of(stacked))
    return xp.where(where, xp.reshape(vectors, (count, 1, n)), stacked)


@dataclasses.dataclass
class _RitzPairs:
    """The top two Ritz pairs of each tridiagonal ``T_k`` of a step, in singular-value terms.

    ``theta`` are the top eigenvalues of ``T_k`` (squared singular values), ``sigma`` and
    ``second`` their square roots, ``residual`` and ``second_residual`` the residuals
    ``beta_k |s_k| / sigma`` of the singular triplets, ``vectors`` the top eigenvector of
    each ``T_k`` (the coefficients of the Ritz vector in the basis).
    """

    theta: np.ndarray
    sigma: np.ndarray
    second: np.ndarray
    residual: np.ndarray
    second_residual: np.ndarray
    vectors: np.ndarray

    @classmethod
    def of(cls, alphas: np.ndarray, betas: np.ndarray) -> "_RitzPairs":
        """From the diagonals ``alphas`` (count, k) and ``betas`` (count, k) of a step:
        ``betas[:, :k-1]`` beside the diagonal, ``betas[:, k-1]`` the next coupling."""
        values, vectors = _top_eigenpairs(alphas, betas[:, :-1])
        theta = np.maximum(values, 0.0)
        singular = np.sqrt(theta)
        couplings = betas[:, -1:] * np.abs(vectors[:, -1, :])
        residuals = np.where(singular > 0, couplings / np.where(singular > 0, singular, 1.0), couplings)
        return cls(theta[:, 0], singular[:, 0], singular[:, 1], residuals[:, 0], residuals[:, 1],
                   vectors[:, :, 0])

    @classmethod
    def of_rows(cls, alphas: np.ndarray, betas: np.ndarray, rows: np.ndarray
                ) -> tuple["_RitzPairs", np.ndarray]:
        """The pairs (as :meth:`of`) and :meth:`error` of the matrices ``rows`` (a mask), in
        arrays of the whole batch: the other matrices get zero values and vectors and
        infinite residuals and errors (no rule stops them)."""
        if np.all(rows):
            pairs = cls.of(alphas, betas)
            return pairs, pairs.error()
        count, k = alphas.shape
        checked = cls.of(alphas[rows], betas[rows])
        full = cls(np.zeros(count), np.zeros(count), np.zeros(count), np.full(count, np.inf),
                   np.full(count, np.inf), np.zeros((count, k)))
        for field in dataclasses.fields(cls):
            getattr(full, field.name)[rows] = getattr(checked, field.name)
        error = np.full(count, np.inf)
        error[rows] = checked.error()
        return full, error

    def rows(self, keep: np.ndarray) -> "_RitzPairs":
        """The pairs of the matrices ``keep``."""
        return _RitzPairs(*(getattr(self, field.name)[keep] for field in dataclasses.fields(self)))

    def error(self) -> np.ndarray:
        """Estimate of ``sigma_max - sigma`` per matrix: the gap rule's bound
        ``sigma r_1^2 / (2 g (sigma + sigma_2))`` with ``g = sigma - sigma_2 - max(r_1, r_2)``
        where that gap exceeds ``r_2`` and :data:`GAP_RESIDUALS` times ``r_1`` (see the
        module docstring), else ``r_1`` (the residual rule)."""
        top, second = self.residual, self.second_residual
        gap = self.sigma - self.second - np.maximum(top, second)
        resolved = np.isfinite(self.second) & (gap > np.maximum(GAP_RESIDUALS * top, second))
        gap = np.where(resolved, gap, 1.0)
        total = np.where(resolved, self.sigma + self.second, 1.0)
        return np.where(resolved, top * (top / gap) * (self.sigma / (2.0 * total)), top)


def _top_eigenpairs(diagonal: np.ndarray, beside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two largest eigenvalues (descending) and their unit eigenvectors of symmetric
    tridiagonal matrices (``diagonal`` (count, k), ``beside`` (count, k-1)).

    Returns ``values`` (count, 2) and ``vectors`` (count, k, 2); a 1 x 1 matrix has second
    value ``-inf`` and a zero second vector. Each matrix is scaled by its largest diagonal
    entry first. Few matrices: LAPACK's MRRR (``stemr``), O(k) each; many: one batched dense
    ``eigh``, which costs less than a call per matrix.
    """
    count, k = diagonal.shape
    if k == 1:
        values = np.stack([diagonal[:, 0], np.full(count, -np.inf)], axis=1)
        vectors = np.zeros((count, 1, 2))
        vectors[:, 0, 0] = 1.0
        return values, vectors
    scale = np.max(np.abs(diagonal), axis=1)
    scale = np.where(scale > 0, scale, 1.0)
    diagonal = diagonal / scale[:, None]
    beside = beside / scale[:, None]
    values = np.empty((count, 2))
    vectors = np.empty((count, k, 2))
    if count <= _MRRR_COUNT:
        for i in range(count):
            values[i], vectors[i] = _mrrr_top_two(diagonal[i], beside[i])
    else:
        dense = np.zeros((count, k, k))
        index = np.arange(k)
        dense[:, index, index] = diagonal
        dense[:, index[:-1], index[1:]] = beside
        dense[:, index[1:], index[:-1]] = beside
        all_values, all_vectors = np.linalg.eigh(dense)
        values[:] = all_values[:, :-3:-1]
        vectors[:] = all_vectors[:, :, :-3:-1]
    return values * scale[:, None], vectors


def _mrrr_top_two(diagonal: np.ndarray, beside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The top two eigenpairs of one symmetric tridiagonal matrix, descending (LAPACK's
    ``stemr``; a dense ``eigh`` should it not converge)."""
    k = diagonal.size
    found, values, vectors, info = scipy.linalg.lapack.dstemr(
        diagonal, np.append(beside, 0.0), 2, 0.0, 0.0, k - 1, k
    )
    if info == 0 and found == 2:
        return values[1::-1], vectors[:, 1::-1]
    all_values, all_vectors = np.linalg.eigh(np.diag(diagonal) + np.diag(beside, 1) + np.diag(beside, -1))
    return all_values[:-3:-1], all_vectors[:, :-3:-1]


def _single(run: Any, operator: LinearOperator, v: Any, **options: Any) -> IterationResult:
    """A method of this module on one operator from the 1-D start ``v``."""
    xp = operator.xp
    m, n = operator.shape
    found = run(operator, xp.reshape(v, (1, n)), **options)
    iterations = int(found.iterations[0])
    return IterationResult(
        float(found.sigma[0]), xp.reshape(found.u, (m,)), xp.reshape(found.v, (n,)),
        float(found.residual[0]), float(found.error[0]), bool(found.converged[0]),
        iterations, 2 * iterations,
    )


def power_iteration(operator: LinearOperator, v: Any, *, rtol: float, max_iter: int) -> IterationResult:
    """Power iteration on ``A^H A`` from the unit vector ``v`` (:func:`power_stack` for one
    operator); stops when the residual is at most ``rtol * sigma`` (the residual rule).

    Parameters
    ----------
    operator : LinearOperator
    v : array, shape (n,)
        Unit start vector in the operator's namespace.
    rtol : float
    max_iter : int

    Returns
    -------
    IterationResult
    """
    return _single(power_stack, operator, v, rtol=rtol, max_iter=max_iter)


def lanczos(
    operator: LinearOperator, v: Any, *, rtol: float, max_iter: int, random_start: bool = False
) -> IterationResult:
    """Lanczos on ``A^H A`` from the unit vector ``v`` (:func:`lanczos_stack` for one operator).

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
        Whether ``v`` is random (the gap rule may stop it), see :func:`lanczos_stack`.

    Returns
    -------
    IterationResult
    """
    return _single(lanczos_stack, operator, v, rtol=rtol, max_iter=max_iter, random_start=random_start)
