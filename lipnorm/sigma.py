"""``estimate_sigma`` and ``sigma_bounds``: the largest singular value of any weight.

``estimate_sigma`` is fast and stays in the input's library, dtype and device;
``sigma_bounds`` is certified: it returns an interval that provably contains
sigma_max, float rounding included (see :mod:`lipnorm.certificates`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any

import numpy as np

from lipnorm import krylov
from lipnorm._xp import array_namespace, device_of, library_name, to_numpy
from lipnorm.certificates import SigmaInterval, certified_stack_bounds, gram_iteration_bounds
from lipnorm.operators import (
    DaskOperator,
    DenseOperator,
    LinearOperator,
    as_operator,
    dense_from_products,
    matrix_view,
)

__all__ = [
    "ConvergenceWarning",
    "SigmaInterval",
    "SigmaState",
    "certified_stack_bounds",
    "estimate_sigma",
    "sigma_bounds",
]

METHODS = ("auto", "power", "lanczos", "svd")
#: ``method="auto"`` uses an exact SVD when the smaller side is at most this.
AUTO_SVD_LIMIT = 32
#: Largest operator (smaller side) ``sigma_bounds`` densifies through matvecs.
DENSIFY_LIMIT = 4096


class ConvergenceWarning(UserWarning):
    """An iterative estimate stopped at ``max_iter`` before reaching ``rtol``."""


@dataclasses.dataclass
class SigmaState:
    """Warm-start state of :func:`estimate_sigma`, in the weight's own namespace.

    Pass it back as ``state=`` to start the next call from the last singular
    vectors (as spectral normalization does between training steps).

    Attributes
    ----------
    u : array, shape (m,), or None
        Unit left singular vector estimate (None from ``method="svd"``, which
        computes no vectors; such a state starts the next call from a random vector).
    v : array, shape (n,), or None
        Unit right singular vector estimate (None from ``method="svd"``).
    sigma : float
        The estimate.
    residual : float
        ``||A^H u - sigma v||``; the estimate is within ``residual / sqrt(2)``
        of a singular value.
    error : float
        The estimate of ``sigma_max - sigma`` the iteration stopped on (see ``rtol`` in
        :func:`estimate_sigma`): about ``residual**2 / (4 gap)`` where Lanczos from a
        random start resolved the gap to the next singular value, else ``residual``;
        0 when the result is exact.
    converged : bool
        Whether ``error <= rtol * sigma`` was reached. ``False`` comes with a
        :class:`ConvergenceWarning`.
    iterations : int
        Iterations of the method (each one ``matvec`` and one ``rmatvec``).
    matvecs : int
        Matrix-vector products used.
    method : str
        The method that ran (``"power"``, ``"lanczos"`` or ``"svd"``).
    """

    u: Any
    v: Any
    sigma: float
    residual: float
    error: float
    converged: bool
    iterations: int
    matvecs: int
    method: str


def _output_dtype(xp: Any, dtype: Any, working: Any) -> Any:
    """The real dtype sigma is returned in: the input's real float dtype, else the working
    one (complex64 and complex128 working dtypes give float32 and float64)."""
    if xp.isdtype(dtype, "real floating"):
        return dtype
    if working == xp.complex64:
        return xp.float32
    if working == xp.complex128:
        return xp.float64
    return working


def _check_options(method: str, rtol: float, max_iter: int | None) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not (isinstance(rtol, (int, float)) and math.isfinite(rtol) and rtol > 0):
        raise ValueError(f"rtol must be a positive finite number, got {rtol!r}")
    if max_iter is not None and (not isinstance(max_iter, int) or max_iter < 1):
        raise ValueError(f"max_iter must be a positive integer or None, got {max_iter!r}")


def _start_vector(operator: LinearOperator, state: SigmaState | None, seed: Any) -> tuple[Any, bool]:
    """The unit start vector and whether it is random: the state's ``v``, else a random one."""
    n = operator.shape[1]
    if state is None:
        return krylov.random_vector(operator, n, seed), True
    if not isinstance(state, SigmaState):
        raise TypeError(f"state must be a SigmaState from estimate_sigma, got {type(state).__name__}")
    if state.v is None:  # from method="svd", which computes no vectors
        return krylov.random_vector(operator, n, seed), True
    if array_namespace(state.v) is not operator.xp:
        raise TypeError(
            f"the state holds {library_name(state.v)} arrays but the weight needs "
            f"{operator.xp.__name__} vectors; mixed array libraries in one call"
        )
    if device_of(state.v) != operator.device:
        raise ValueError(
            f"the state's vectors are on device {device_of(state.v)} but the weight is on "
            f"{operator.device}; move the state's u and v to the weight's device (lipnorm "
            "moves nothing between devices), or start without a state"
        )
    if tuple(state.v.shape) != (n,):
        raise ValueError(
            f"the state's v has shape {tuple(state.v.shape)} but the operator needs ({n},); "
            "was the state made for another weight?"
        )
    v = operator.xp.astype(state.v, operator.dtype)
    norm = krylov.vector_norm(operator.xp, v)
    if norm == 0.0:
        return krylov.random_vector(operator, n, seed), True
    return v / norm, False


def _dense(operator: LinearOperator) -> Any:
    """The operator's matrix: its ``to_dense()``, else its products with the basis vectors
    of its smaller side (at most :data:`DENSIFY_LIMIT` of them)."""
    try:
        return operator.to_dense()
    except NotImplementedError:
        if min(operator.shape) > DENSIFY_LIMIT:
            raise ValueError(
                f"the operator of shape {operator.shape} has no dense form (to_dense) and is "
                "too large to densify from its products; give it a to_dense() or "
                "sigma_bounds() method"
            ) from None
    return dense_from_products(operator)


def _svd_state(operator: LinearOperator) -> SigmaState:
    dense = _dense(operator)
    xp = operator.xp
    svdvals = getattr(getattr(xp, "linalg", None), "svdvals", None)
    if svdvals is not None:
        sigma = float(xp.max(svdvals(dense)))
    else:
        sigma = float(np.linalg.svd(to_numpy(dense), compute_uv=False)[0])
    return SigmaState(None, None, sigma, 0.0, 0.0, True, 0, 0, "svd")


def _auto_method(operator: LinearOperator, rtol: float, state: SigmaState | None) -> str:
    """``"svd"`` where it is cheap or where ``rtol`` asks for near machine precision."""
    side = min(operator.shape)
    dense = isinstance(operator, DenseOperator) and not isinstance(operator, DaskOperator)
    if dense and state is None and (side <= AUTO_SVD_LIMIT or (rtol < 1e-10 and side <= 1024)):
        return "svd"
    return "lanczos"


def estimate_sigma(
    weight: Any,
    *,
    method: str = "auto",
    rtol: float = 1e-6,
    max_iter: int | None = None,
    dim: int | None = None,
    state: SigmaState | None = None,
    return_state: bool = False,
    seed: Any = None,
) -> Any:
    """Estimate the largest singular value (spectral norm) of ``weight``.

    Parameters
    ----------
    weight : array or linear operator
        A NumPy, CuPy, PyTorch, TensorFlow, JAX, Dask or any array-API array;
        1-D (its 2-norm), 2-D, or N-D with ``dim``. Or a linear operator: a
        lipnorm operator (e.g. :func:`lipnorm.conv_operator`), a SciPy sparse
        matrix or ``LinearOperator``, or any object with ``shape``, ``dtype``,
        ``matvec`` and ``rmatvec``.
    method : {"auto", "power", "lanczos", "svd"}
        ``"lanczos"``: Golub-Kahan-Lanczos bidiagonalization with full
        reorthogonalization (few products even on clustered spectra);
        ``"power"``: power iteration; ``"svd"``: exact singular values (small
        matrices; a reference); ``"auto"``: ``"svd"`` for dense matrices whose
        smaller side is at most 32 (or 1024 when ``rtol < 1e-10``), else ``"lanczos"``.
    rtol : float
        Relative accuracy of sigma: the iteration stops when its estimate of the
        error ``sigma_max - sigma`` is at most ``rtol * sigma`` (``state.error``).
        Lanczos from a random start estimates it by about ``residual**2 / (4 gap)``,
        the gap to the next singular value taken from its own Ritz values
        (Kato-Temple): the result is then within ``rtol`` of sigma_max when that
        gap is real. It is not when singular values the Krylov space has not yet
        separated from sigma_max lie closer to it than the next Ritz value: a
        repeated or clustered top with further values a few residuals below can
        stop it early, by up to about that distance. Otherwise (gap not
        resolved, a warm start ``state=``, ``method="power"``) the rule is
        ``residual <= rtol * sigma``, which bounds the distance to *a* singular
        value of ``W`` by ``rtol * sigma``: to sigma_max or to one of the values
        clustered with it (see :mod:`lipnorm.krylov`). Either way sigma never
        exceeds sigma_max (up to rounding), and in single precision the products'
        own rounding (about ``sqrt(n)`` units of the last place) limits what
        ``rtol`` can deliver. A :class:`ConvergenceWarning` says when ``max_iter``
        ran out first. Only :func:`sigma_bounds` certifies.
    max_iter : int, optional
        Iterations allowed (one iteration is one product with ``A`` and one
        with ``A^H``). Default: 10000 for power iteration, 2000 for Lanczos.
    dim : int, optional
        For N-D arrays, the axis kept as rows (the rest is flattened), as in
        ``torch.nn.utils.spectral_norm``.
    state : SigmaState, optional
        Warm start from an earlier call on the same (or a slowly changing) weight.
        A weight that maps the state's vector to zero (pruned along it) is
        estimated again from a random vector.
    return_state : bool
        Also return the :class:`SigmaState`.
    seed : int or numpy.random.Generator, optional
        Seed of the random start vector (drawn with NumPy, moved to the weight's device).

    Returns
    -------
    sigma : array, shape ()
        0-d array of the weight's library, real dtype (float16/bfloat16 inputs
        are computed in float32 and returned in their own dtype) and device.
    state : SigmaState
        Only with ``return_state=True``.

    Raises
    ------
    TypeError
        Non-numeric or boolean dtype, arrays of different libraries, not an array.
    ValueError
        NaN/Inf entries, an empty or 0-d array, N-D without ``dim``, bad options;
        a torch tensor on the meta device (no values); a ``state`` on another device
        than the weight;
        a sigma beyond the range of the dtype it is returned in; an operator
        (not an array, which is scaled by a power of two instead) whose products
        are too small or too large for its dtype
        (:class:`lipnorm.krylov.ScaleError`).

    Warns
    -----
    ConvergenceWarning
        When ``max_iter`` is reached before the error estimate is at most
        ``rtol * sigma`` (``state.converged`` is then False).

    Examples
    --------
    >>> import numpy as np, lipnorm
    >>> W = np.diag([3.0, 2.0, 1.0])
    >>> float(lipnorm.estimate_sigma(W))
    3.0
    """
    _check_options(method, rtol, max_iter)
    operator = as_operator(weight, dim=dim)
    if method == "auto":
        method = _auto_method(operator, rtol, state)
    if method == "svd":
        result = _svd_state(operator)
    else:
        start, random_start = _start_vector(operator, state, seed)
        limit = max_iter if max_iter is not None else (2000 if method == "lanczos" else 10000)
        found = _iterate(_runner(method, random_start), operator, start, rtol=rtol, max_iter=limit)
        if found.sigma == 0.0 and not random_start:
            # W v = 0 for the warm start (e.g. W pruned along it): not evidence that W = 0.
            cold = krylov.random_vector(operator, operator.shape[1], seed)
            retry = _iterate(_runner(method, True), operator, cold, rtol=rtol, max_iter=limit)
            found = dataclasses.replace(
                retry,
                iterations=found.iterations + retry.iterations,
                matvecs=found.matvecs + retry.matvecs,
            )
        result = SigmaState(
            found.u,
            found.v,
            found.sigma,
            found.residual,
            found.error,
            found.converged,
            found.iterations,
            found.matvecs,
            method,
        )
        if not found.converged:
            warnings.warn(
                f"{method} stopped after {found.iterations} iterations with relative error "
                f"estimate {found.error / max(found.sigma, 1e-300):.2e} > rtol={rtol:g}; "
                "raise max_iter, use method='lanczos', or loosen rtol",
                ConvergenceWarning,
                stacklevel=2,
            )
    sigma = _as_output(operator, weight, result.sigma)
    return (sigma, result) if return_state else sigma


def _runner(method: str, random_start: bool) -> Any:
    """The iteration of ``method`` (``"lanczos"`` or ``"power"``) as ``run(operator, v, *,
    rtol, max_iter)``; Lanczos uses its gap rule only from a random start."""
    if method == "power":
        return krylov.power_iteration
    return functools.partial(krylov.lanczos, random_start=random_start)


def _iterate(run: Any, operator: LinearOperator, start: Any, *, rtol: float, max_iter: int
             ) -> krylov.IterationResult:
    """``run`` (a method of :mod:`lipnorm.krylov`) on the operator, scaled if need be.

    A matrix whose products are out of its dtype's accurate range
    (:class:`lipnorm.krylov.ScaleError`: entries near the subnormal or overflow
    thresholds), or whose products all vanished, is multiplied by the power of two
    that brings its largest entry into [0.5, 1), which is exact, and run again;
    sigma and the residual are scaled back (``inf`` past the float range).
    Other operators cannot be scaled: for them the error is raised.
    """
    dense = isinstance(operator, DenseOperator)
    try:
        with np.errstate(over="ignore"):  # an overflowing first product raises ScaleError
            found = run(operator, start, rtol=rtol, max_iter=max_iter)
    except krylov.ScaleError:
        if not dense:
            raise
    else:
        if found.sigma != 0.0 or not dense:
            return found
    xp = operator.xp
    largest = float(xp.max(xp.abs(operator.matrix)))
    if largest == 0.0:
        return found  # the zero matrix (a ScaleError needs a nonzero product)
    exponent = math.frexp(largest)[1]
    scaled = type(operator)(krylov.scaled_by_power_of_two(operator.matrix, -exponent), xp)
    found = run(scaled, start, rtol=rtol, max_iter=max_iter)
    return dataclasses.replace(
        found,
        sigma=krylov.times_power_of_two(found.sigma, exponent),
        residual=krylov.times_power_of_two(found.residual, exponent),
        error=krylov.times_power_of_two(found.error, exponent),
    )


def _as_output(operator: LinearOperator, weight: Any, value: float) -> Any:
    """``value`` as a 0-d array in the weight's namespace, real dtype and device.

    Raises
    ------
    ValueError
        If ``value`` is beyond the range of that dtype (it would become ``inf``).
    """
    xp = operator.xp
    input_dtype = weight.dtype if isinstance(operator, DenseOperator) else operator.dtype
    dtype = _output_dtype(xp, input_dtype, operator.dtype)
    largest = float(xp.finfo(dtype).max)
    if not value <= largest:
        raise ValueError(
            f"sigma ({value:.4g}) does not fit in {getattr(dtype, 'name', dtype)}, whose largest "
            f"value is {largest:.4g}; pass the weight in a wider dtype, or scaled down"
        )
    sigma = xp.asarray(value, dtype=dtype, device=operator.device)
    if isinstance(operator, DaskOperator):
        import dask.array

        return dask.array.from_array(sigma)
    return sigma


def sigma_bounds(
    weight: Any, *, dim: int | None = None, method: str = "cholesky", steps: int | None = None
) -> SigmaInterval:
    """Certified bounds ``lower <= sigma_max(weight) <= upper``, float rounding included.

    Parameters
    ----------
    weight : array or linear operator
        As for :func:`estimate_sigma`; integer arrays are bounded as the
        integers they hold (in float64 on the host), not as their compute
        dtype rounds them. An operator that defines its own
        ``sigma_bounds()`` (e.g. :func:`lipnorm.conv_operator`) is asked for it.
        Other operators are made dense through ``to_dense()`` or, when their
        smaller side is at most 4096, from their products with the basis vectors.
    dim : int, optional
        As for :func:`estimate_sigma`.
    method : {"cholesky", "gram"}
        ``"cholesky"``: the Cholesky certificate (tight: the interval is ~1e-6
        wide relative to sigma); ``"gram"``: Gram iteration with ``steps`` steps.
    steps : int, optional
        Gram-iteration steps (``method="gram"`` only; default 8).

    Returns
    -------
    SigmaInterval
        ``(lower, upper)`` as Python floats, unpackable as ``lo, hi = ...``.

    Raises
    ------
    TypeError, ValueError
        As for :func:`estimate_sigma`; also for an operator that has no dense
        form and is too large to densify, ``steps`` without ``method="gram"``,
        and ``dim``, ``method`` or ``steps`` for an operator with its own
        ``sigma_bounds()`` (pass them to that method instead).

    Examples
    --------
    >>> import numpy as np, lipnorm
    >>> lo, hi = lipnorm.sigma_bounds(np.diag([3.0, 2.0, 1.0]))
    >>> lo <= 3.0 <= hi and hi / lo < 1 + 1e-3
    True
    """
    if method not in ("cholesky", "gram"):
        raise ValueError(f"unknown method {method!r}; choose 'cholesky' or 'gram'")
    if steps is not None and method != "gram":
        raise ValueError(f"steps={steps} applies to method='gram' only (method={method!r})")
    own_bounds = getattr(weight, "sigma_bounds", None)
    if callable(own_bounds):
        if dim is not None or method != "cholesky" or steps is not None:
            raise ValueError(
                f"a {type(weight).__name__} certifies its own norm and takes no dim, method or "
                "steps here; pass its options to weight.sigma_bounds(...) instead"
            )
        return own_bounds()
    operator = as_operator(weight, dim=dim)
    if isinstance(operator, DenseOperator) and operator.xp.isdtype(weight.dtype, "integral"):
        # The compute dtype can round integers (float32 above 2**24): certify the host copy.
        dense = matrix_view(to_numpy(weight), dim=dim)[0]
    else:
        dense = _dense(operator)
    if method == "gram":
        return gram_iteration_bounds(dense) if steps is None else gram_iteration_bounds(dense, steps=steps)
    return certified_stack_bounds(dense)
