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
from lipnorm.certificates import (
    SigmaInterval,
    certified_bounds_each,
    certified_stack_bounds,
    gram_iteration_bounds,
)
from lipnorm.operators import (
    DaskOperator,
    DaskStack,
    DenseOperator,
    DenseStack,
    LinearOperator,
    as_operator,
    dense_from_products,
    matrix_view,
    stack_operator,
)

__all__ = [
    "DEFAULT_SEED",
    "ConvergenceWarning",
    "SigmaInterval",
    "SigmaState",
    "certified_stack_bounds",
    "estimate_sigma",
    "sigma_bounds",
]

METHODS = ("auto", "power", "lanczos", "svd")
#: Stopping rules of Lanczos: the residual rule, or the gap rule (faster, less safe).
STOPPING_RULES = ("residual", "gap")
#: ``method="auto"`` uses an exact SVD when the smaller side is at most this.
AUTO_SVD_LIMIT = 32
#: Largest operator (smaller side) ``sigma_bounds`` densifies through matvecs.
DENSIFY_LIMIT = 4096
#: Largest entries (binary exponents, single and double precision) the iteration runs on
#: unscaled: within them the entries of ``W^H W`` and of the squares in norms stay in range.
SAFE_ENTRY_EXPONENTS = ((-40, 24), (-400, 400))
#: Seed of the random start vectors unless ``seed=`` says otherwise: the same input gives
#: the same sigma, bit for bit, on the same machine and library versions.
DEFAULT_SEED = 0


class ConvergenceWarning(UserWarning):
    """An iterative estimate stopped at ``max_iter`` before reaching ``rtol``."""


@dataclasses.dataclass
class SigmaState:
    """Warm-start state of :func:`estimate_sigma`, in the weight's own namespace.

    Pass it back as ``state=`` to start the next call from the last singular
    vectors (as spectral normalization does between training steps). From a call
    with ``batched=True`` it holds one warm start per matrix of the stack: the
    vectors have the stack's batch shape in front, the numbers are NumPy arrays of
    the batch shape.

    Attributes
    ----------
    u : array, shape (m,) or (*batch, m), or None
        Unit left singular vector estimate (None from ``method="svd"``, which
        computes no vectors; such a state starts the next call from a random vector).
    v : array, shape (n,) or (*batch, n), or None
        Unit right singular vector estimate (None from ``method="svd"``).
    sigma : float or numpy.ndarray of float64
        The estimate.
    residual : float or numpy.ndarray of float64
        ``||A^H u - sigma v||``; the estimate is within ``residual / sqrt(2)``
        of a singular value.
    error : float or numpy.ndarray of float64
        The estimate of ``sigma_max - sigma`` the iteration stopped on (see ``rtol`` in
        :func:`estimate_sigma`): about ``residual**2 / (4 gap)`` where Lanczos from a
        random start resolved the gap to the next singular value, else ``residual``;
        0 when the result is exact.
    converged : bool or numpy.ndarray of bool
        Whether ``error <= rtol * sigma`` was reached. ``False`` comes with a
        :class:`ConvergenceWarning`.
    iterations : int or numpy.ndarray of int64
        Iterations of the method (each one ``matvec`` and one ``rmatvec``).
    matvecs : int or numpy.ndarray of int64
        Matrix-vector products used.
    method : str
        The method that ran (``"power"``, ``"lanczos"`` or ``"svd"``).
    passes : int
        Batched products over the whole weight (each reads every matrix of the stack
        that has not converged yet; a NumPy matrix is read once for its product with
        ``A`` and ``A^H``, other libraries twice).
    """

    u: Any
    v: Any
    sigma: Any
    residual: Any
    error: Any
    converged: Any
    iterations: Any
    matvecs: Any
    method: str
    passes: int = 0


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


def _check_options(method: str, rtol: Any, max_iter: int | None, batch_shape: tuple[int, ...] | None
                   ) -> np.ndarray:
    """Validate the options; return ``rtol`` as one value per matrix (flattened batch)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1):
        raise ValueError(f"max_iter must be a positive integer or None, got {max_iter!r}")
    if isinstance(rtol, (int, float)) and not isinstance(rtol, bool):
        values = np.asarray(float(rtol))
    elif batch_shape is not None and isinstance(rtol, (np.ndarray, list, tuple)):
        values = np.asarray(rtol, dtype=np.float64)
    else:
        raise ValueError(f"rtol must be a positive finite number, got {rtol!r}")
    if not (np.all(np.isfinite(values)) and np.all(values > 0)):
        raise ValueError(f"rtol must be a positive finite number, got {rtol!r}")
    shape = batch_shape or ()
    try:
        return np.broadcast_to(values, shape).reshape(-1).copy()
    except ValueError:
        raise ValueError(f"rtol of shape {values.shape} does not match the batch shape {shape}") from None


def _checked_state(state: Any, operator: LinearOperator, batch_shape: tuple[int, ...] | None) -> None:
    """Raise unless ``state`` is a SigmaState whose vectors fit the operator (and batch)."""
    if not isinstance(state, SigmaState):
        raise TypeError(f"state must be a SigmaState from estimate_sigma, got {type(state).__name__}")
    if state.v is None:  # from method="svd", which computes no vectors
        return
    for vector in (state.u, state.v):
        if array_namespace(vector) is not operator.xp:
            raise TypeError(
                f"the state holds {library_name(vector)} arrays but the weight needs "
                f"{operator.xp.__name__} vectors; mixed array libraries in one call"
            )
        if device_of(vector) != operator.device:
            raise ValueError(
                f"the state's vectors are on device {device_of(vector)} but the weight is on "
                f"{operator.device}; move the state's u and v to the weight's device (lipnorm "
                "moves nothing between devices), or start without a state"
            )
    prefix = tuple(batch_shape) if batch_shape is not None else ()
    m, n = operator.shape
    for name, vector, length in (("u", state.u, m), ("v", state.v, n)):
        if tuple(vector.shape) != prefix + (length,):
            raise ValueError(
                f"the state's {name} has shape {tuple(vector.shape)} but the "
                f"{'stack' if batch_shape is not None else 'operator'} needs {prefix + (length,)}; "
                "was the state made for another weight"
                + (" (or without batched=True)?" if batch_shape is not None else " (or a stack)?")
            )


def _start_vectors(operator: LinearOperator, state: SigmaState | None, seed: Any, left: bool
                   ) -> tuple[Any, np.ndarray]:
    """Unit start vectors, one per matrix, on the side the iteration runs on (the left side,
    of length m, when ``left``), and which of them are random.

    The state's vectors where it has them (a zero vector is replaced by a random one),
    else random ones drawn from ``seed``.
    """
    xp = operator.xp
    count = operator.count
    length = operator.shape[0] if left else operator.shape[1]
    if state is None or state.v is None:
        return krylov.random_vectors(operator, count, length, seed), np.ones(count, dtype=bool)
    warm = xp.reshape(xp.astype(state.u if left else state.v, operator.dtype), (count, length))
    starts, norms = krylov.unit_rows(xp, warm, operator)
    zero = norms == 0.0
    if np.any(zero):
        random = krylov.random_vectors(operator, count, length, seed)
        starts = starts + random * krylov.column_of(zero.astype(np.float64), operator)
    return starts, zero


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


def _svd_values(operator: LinearOperator) -> np.ndarray:
    """Exact sigma of each matrix (an SVD; stacks batched), on the host."""
    dense = _dense(operator) if operator.count == 1 else operator.to_dense()
    xp = operator.xp
    svdvals = getattr(getattr(xp, "linalg", None), "svdvals", None)
    if svdvals is not None:
        values = to_numpy(xp.max(svdvals(dense), axis=-1))
    else:
        values = np.max(np.linalg.svd(to_numpy(dense), compute_uv=False), axis=-1)
    return np.asarray(values, dtype=np.float64).reshape(operator.count)


def _auto_method(operator: LinearOperator, rtol: np.ndarray, state: SigmaState | None) -> str:
    """``"svd"`` where it is cheap or where ``rtol`` asks for near machine precision."""
    side = min(operator.shape)
    dense = isinstance(operator, (DenseOperator, DenseStack)) and not isinstance(
        operator, (DaskOperator, DaskStack))
    precise = bool(np.min(rtol) < 1e-10)
    if dense and state is None and (side <= AUTO_SVD_LIMIT or (precise and side <= 1024)):
        return "svd"
    return "lanczos"


def estimate_sigma(
    weight: Any,
    *,
    method: str = "auto",
    rtol: Any = 1e-6,
    max_iter: int | None = None,
    dim: int | None = None,
    batched: bool = False,
    state: SigmaState | None = None,
    return_state: bool = False,
    seed: Any = DEFAULT_SEED,
    stop: str = "residual",
) -> Any:
    """Estimate the largest singular value (spectral norm) of ``weight``.

    Parameters
    ----------
    weight : array or linear operator
        A NumPy, CuPy, PyTorch, TensorFlow, JAX, Dask or any array-API array;
        1-D (its 2-norm), 2-D, or N-D with ``dim``, or, with ``batched=True``,
        a stack of matrices of shape ``(..., m, n)``. Or a linear operator: a
        lipnorm operator (e.g. :func:`lipnorm.conv_operator`), a SciPy sparse
        matrix or ``LinearOperator``, or any object with ``shape``, ``dtype``,
        ``matvec`` and ``rmatvec``.
    method : {"auto", "power", "lanczos", "svd"}
        ``"lanczos"``: Lanczos on ``W^H W`` with full reorthogonalization (the
        Krylov space of Golub-Kahan bidiagonalization; few products even on
        clustered spectra); ``"power"``: power iteration; ``"svd"``: exact singular
        values (small matrices; a reference); ``"auto"``: ``"svd"`` for dense
        matrices whose smaller side is at most 32 (or 1024 when ``rtol < 1e-10``),
        else ``"lanczos"``.
    rtol : float, or array of shape ``W.shape[:-2]`` with ``batched=True``
        Relative accuracy of sigma, each matrix of a stack held to its own: the
        iteration stops when its estimate of the error ``sigma_max - sigma`` is at
        most ``rtol * sigma`` (``state.error``). With the default ``stop="residual"``
        that estimate is the residual ``||W^H u - sigma v||``, which bounds the
        distance from sigma to *a* singular value of ``W``: sigma_max, unless the top
        of the spectrum holds values within a few ``rtol`` of each other, or (rarely)
        the start vector was so nearly orthogonal to the top singular vector that the
        iteration converged to the next value first (see :mod:`lipnorm.krylov`).
        Sigma never exceeds sigma_max (up to rounding), and in single precision the
        products' own rounding (about ``sqrt(n)`` units of the last place) limits what
        ``rtol`` can deliver. A :class:`ConvergenceWarning` says when ``max_iter`` ran
        out first. Only :func:`sigma_bounds` certifies.
    max_iter : int, optional
        Iterations allowed (one iteration is one product with ``A`` and one
        with ``A^H``). Default: 10000 for power iteration, 2000 for Lanczos.
    dim : int, optional
        For N-D arrays, the axis kept as rows (the rest is flattened), as in
        ``torch.nn.utils.spectral_norm``. Not with ``batched=True``.
    batched : bool
        Read ``weight`` (an array of at least two axes) as a stack of matrices: the
        last two axes are the matrix, the leading ones the batch, as in
        ``torch.linalg.matrix_norm`` and the array API's ``linalg`` functions (MoE
        experts ``(E, d, f)``, per-head weights). The matrices are iterated together,
        one batched product per step for the whole stack; each stops on its own
        ``rtol`` and leaves the batch. A 3-D array without ``batched=True`` or
        ``dim`` is an error: lipnorm never guesses between a stack and a
        convolution kernel.
    state : SigmaState, optional
        Warm start from an earlier call on the same (or a slowly changing) weight,
        with the same ``batched``: one warm start per matrix of a stack.
        A matrix that maps its state's vector to zero (pruned along it) is
        estimated again from a random vector. A warm start is the old top singular
        vector: where the weight changed by more than a small part of the gap between
        its top two singular values, it may lie along the new second one, and the
        estimate is then within ``rtol`` of that value (what the residual rule promises).
    return_state : bool
        Also return the :class:`SigmaState`.
    seed : int, numpy.random.Generator or None
        Seed of the random start vectors (drawn with NumPy, moved to the weight's
        device). The default, :data:`DEFAULT_SEED`, makes every call on the same
        input return the same sigma, bit for bit; another seed chooses other
        starts, ``None`` fresh ones from the operating system.
    stop : {"residual", "gap"}
        Lanczos's stopping rule. ``"gap"`` also stops, from a random start, when the
        gap to the second Ritz value makes the error (about ``residual**2 / (4 gap)``,
        Kato-Temple) at most ``rtol * sigma``: 1.1-1.5x fewer products on Gaussian
        matrices, but when the start vector is nearly orthogonal to the top singular
        vector and the next singular value lies close below (Gaussian matrices' tops
        are clustered), it can stop on that next value, as far below sigma_max as the
        two are apart (one matrix in 1024 of 64 x 64 in ``benchmarks/bench_sigma.py``:
        1.5e-3 below for rtol 1e-6); also on a repeated or clustered top whose next
        values merge into the top Ritz vector. The residual rule needs that start
        vector to be far closer still to orthogonal before it stops early.

    Returns
    -------
    sigma : array, shape () or ``W.shape[:-2]`` with ``batched=True``
        Array of the weight's library, real dtype (float16/bfloat16 inputs are
        computed in float32 and returned in their own dtype) and device.
    state : SigmaState
        Only with ``return_state=True``.

    Raises
    ------
    TypeError
        Non-numeric or boolean dtype, arrays of different libraries, not an array,
        a linear operator with ``batched=True``.
    ValueError
        NaN/Inf entries (with ``batched=True``: naming the first matrix of the stack
        that has them), an empty or 0-d array, N-D without ``dim`` or ``batched``,
        ``dim`` with ``batched``, bad options; a torch tensor on the meta device (no
        values); a ``state`` on another device than the weight or of another shape;
        a sigma beyond the range of the dtype it is returned in; an operator
        (not an array, which is scaled by a power of two instead) whose products
        are too small or too large for its dtype
        (:class:`lipnorm.krylov.ScaleError`).

    Warns
    -----
    ConvergenceWarning
        When ``max_iter`` is reached before the error estimate is at most
        ``rtol * sigma`` (``state.converged`` is then False), naming the matrices of a
        stack it concerns.

    Examples
    --------
    >>> import numpy as np, lipnorm
    >>> W = np.diag([3.0, 2.0, 1.0])
    >>> float(lipnorm.estimate_sigma(W))
    3.0
    >>> experts = np.stack([np.eye(4), 2.0 * np.eye(4)])  # a stack of two 4 x 4 matrices
    >>> lipnorm.estimate_sigma(experts, batched=True).tolist()
    [1.0, 2.0]

    References
    ----------
    .. [1] G. Golub and W. Kahan, "Calculating the singular values and pseudo-inverse
       of a matrix", SIAM J. Numer. Anal. 2(2), 1965.
    .. [2] Y. Saad, *Numerical Methods for Large Eigenvalue Problems*, 2nd ed., SIAM
       2011, §6.3 (Lanczos with reorthogonalization).
    """
    operator, batch_shape = _operator_of(weight, dim, batched)
    rtol = _check_options(method, rtol, max_iter, batch_shape)
    if stop not in STOPPING_RULES:
        raise ValueError(f"unknown stop {stop!r}; choose one of {', '.join(STOPPING_RULES)}")
    if state is not None:
        _checked_state(state, operator, batch_shape)
    if method == "auto":
        method = _auto_method(operator, rtol, state)
    if method == "svd":
        values = _svd_values(operator)
        zeros = np.zeros(operator.count)
        found = krylov.StackResult(values, zeros, zeros.copy(), np.ones(operator.count, dtype=bool),
                                   np.zeros(operator.count, dtype=np.int64), None, None)
    else:
        limit = max_iter if max_iter is not None else (2000 if method == "lanczos" else 10000)
        found = _krylov_estimate(operator, method, rtol, limit, state, seed, gap_rule=stop == "gap")
        _warn_unconverged(found, method, rtol, batch_shape)
    sigma = _as_output(operator, weight, found.sigma, batch_shape)
    if not return_state:
        return sigma
    return sigma, _state_of(found, method, operator, batch_shape)


def _operator_of(weight: Any, dim: int | None, batched: bool) -> tuple[LinearOperator, tuple[int, ...] | None]:
    """The operator to estimate and, for a stack, its batch shape (None for one matrix)."""
    if not isinstance(batched, bool):
        raise TypeError(f"batched must be True or False, got {batched!r}")
    if not batched:
        return as_operator(weight, dim=dim), None
    if dim is not None:
        raise ValueError(
            f"dim={dim} flattens an N-D array into one matrix, batched=True reads it as a stack "
            "of matrices over its leading axes; pass one of them"
        )
    return stack_operator(weight)


def _state_of(found: krylov.StackResult, method: str, operator: LinearOperator,
              batch_shape: tuple[int, ...] | None) -> SigmaState:
    """The SigmaState of a result: Python numbers for one matrix, arrays of the batch shape
    for a stack."""
    m, n = operator.shape
    u, v = found.u, found.v
    if batch_shape is None:
        shape_of = lambda values: values.reshape(())[()].item()  # noqa: E731 - a Python number
        prefix: tuple[int, ...] = ()
    else:
        shape_of = lambda values: values.reshape(batch_shape)  # noqa: E731
        prefix = batch_shape
    if u is not None:
        u = operator.xp.reshape(u, prefix + (m,))
        v = operator.xp.reshape(v, prefix + (n,))
    iterations = found.iterations
    return SigmaState(u, v, shape_of(found.sigma), shape_of(found.residual), shape_of(found.error),
                      shape_of(found.converged), shape_of(iterations), shape_of(2 * iterations), method,
                      found.passes * operator.passes_per_product)


def _warn_unconverged(found: krylov.StackResult, method: str, rtol: np.ndarray,
                      batch_shape: tuple[int, ...] | None) -> None:
    if np.all(found.converged):
        return
    missed = np.flatnonzero(~found.converged)
    first = int(missed[0])
    relative = found.error[first] / max(found.sigma[first], 1e-300)
    if batch_shape is None:
        where = ""
    else:
        index = ", ".join(str(int(i)) for i in np.unravel_index(first, batch_shape))
        where = f" on {missed.size} of {found.sigma.size} matrices (the first: [{index}])"
    warnings.warn(
        f"{method} stopped after {int(found.iterations[first])} iterations{where} with relative "
        f"error estimate {relative:.2e} > rtol={rtol[first]:g}; raise max_iter, use "
        "method='lanczos', or loosen rtol",
        ConvergenceWarning,
        stacklevel=3,
    )


def _krylov_estimate(operator: LinearOperator, method: str, rtol: np.ndarray, limit: int,
                     state: SigmaState | None, seed: Any, *, gap_rule: bool) -> krylov.StackResult:
    """Lanczos or power iteration on every matrix, from the state or random starts (the
    gap rule, when asked for, from the random ones only).

    The iteration runs on the side :meth:`~lipnorm.operators.LinearOperator.iterates_on_left`
    chooses (the smaller one, or the one a NumPy matrix is read in memory order); a matrix whose warm
    start it maps to zero (not evidence that it is zero) runs again from a random start.
    """
    left = operator.iterates_on_left()
    krylov_operator = operator.adjoint() if left else operator
    starts, random_start = _start_vectors(operator, state, seed, left)
    found = _iterate(method, krylov_operator, starts, random_start & gap_rule, rtol, limit)
    again = np.flatnonzero((found.sigma == 0.0) & ~random_start)
    if again.size:
        xp = operator.xp
        sub = krylov_operator.take(again)
        cold = krylov.random_vectors(sub, again.size, krylov_operator.shape[1], seed)
        retry = _iterate(method, sub, cold, np.full(again.size, gap_rule), rtol[again], limit)
        found = _replaced(xp, operator.device, found, again, retry)
    if left:
        found = dataclasses.replace(found, u=found.v, v=found.u)
    return found


def _replaced(xp: Any, device: Any, found: krylov.StackResult, slots: np.ndarray,
              retry: krylov.StackResult) -> krylov.StackResult:
    """``found`` with the matrices ``slots`` replaced by ``retry`` (their iterations added)."""
    merged = dataclasses.replace(found, sigma=found.sigma.copy(), residual=found.residual.copy(),
                                 error=found.error.copy(), converged=found.converged.copy(),
                                 iterations=found.iterations.copy(), passes=found.passes + retry.passes)
    for name in ("sigma", "residual", "error", "converged"):
        getattr(merged, name)[slots] = getattr(retry, name)
    merged.iterations[slots] += retry.iterations
    rows = np.arange(found.sigma.size)
    rows[slots] = found.sigma.size + np.arange(slots.size)
    index = xp.asarray(rows, device=device)
    merged.u = xp.take(xp.concat([found.u, retry.u], axis=0), index, axis=0)
    merged.v = xp.take(xp.concat([found.v, retry.v], axis=0), index, axis=0)
    return merged


def _iterate(method: str, operator: LinearOperator, starts: Any, gap_rule: np.ndarray,
             rtol: np.ndarray, limit: int) -> krylov.StackResult:
    """The method of :mod:`lipnorm.krylov` on the operator, scaled if need be.

    A dense matrix whose largest entry lies outside :data:`SAFE_ENTRY_EXPONENTS` (where
    the products of ``W^H W`` could leave the dtype's range), whose products turn out of
    range all the same (:class:`lipnorm.krylov.ScaleError`), or whose products all
    vanished, is multiplied by the power of two that brings its largest entry into
    [0.5, 1), which is exact (each matrix of a stack by its own power); sigma and the
    residual are scaled back (``inf`` past the float range). Other operators cannot be
    scaled: for them the error is raised.
    """
    def run(target: LinearOperator) -> krylov.StackResult:
        with np.errstate(over="ignore", invalid="ignore"):  # out-of-range products raise ScaleError
            if method == "power":
                return krylov.power_stack(target, starts, rtol=rtol, max_iter=limit)
            return krylov.lanczos_stack(target, starts, rtol=rtol, max_iter=limit, random_start=gap_rule)

    largest = operator.largest
    if not isinstance(operator, (DenseOperator, DenseStack)) or largest is None:
        return run(operator)
    exponents = np.where(largest > 0, np.frexp(np.where(largest > 0, largest, 1.0))[1], 0)
    low, high = SAFE_ENTRY_EXPONENTS[0 if krylov._epsilon(operator.xp, operator.dtype) == 2.0**-23 else 1]
    outside = (largest > 0) & ((exponents < low) | (exponents > high))
    found = None
    if not np.any(outside):
        try:
            found = run(operator)
        except krylov.ScaleError:
            pass
        else:
            if not np.any((found.sigma == 0.0) & (largest > 0)):
                return found
    found = run(operator.scaled(-exponents))
    with np.errstate(over="ignore"):
        back = {name: np.ldexp(getattr(found, name), exponents) for name in ("sigma", "residual", "error")}
    return dataclasses.replace(found, **back)


def _as_output(operator: LinearOperator, weight: Any, values: np.ndarray,
               batch_shape: tuple[int, ...] | None) -> Any:
    """``values`` as an array of shape ``batch_shape`` (0-d for one matrix) in the weight's
    namespace, real dtype and device.

    Raises
    ------
    ValueError
        If a value is beyond the range of that dtype (it would become ``inf``).
    """
    xp = operator.xp
    dense = isinstance(operator, (DenseOperator, DenseStack))
    input_dtype = weight.dtype if dense else operator.dtype
    dtype = _output_dtype(xp, input_dtype, operator.dtype)
    largest = float(xp.finfo(dtype).max)
    beyond = np.flatnonzero(~(values <= largest))
    if beyond.size:
        raise ValueError(
            f"sigma ({values[beyond[0]]:.4g}) does not fit in {getattr(dtype, 'name', dtype)}, whose "
            f"largest value is {largest:.4g}; pass the weight in a wider dtype, or scaled down"
        )
    if batch_shape is None:
        sigma = xp.asarray(float(values[0]), dtype=dtype, device=operator.device)
    else:
        host = values.reshape(batch_shape).astype(np.float64 if dtype == xp.float64 else np.float32)
        sigma = xp.asarray(host, device=operator.device)
        if sigma.dtype != dtype:
            sigma = xp.astype(sigma, dtype)
    if isinstance(operator, (DaskOperator, DaskStack)):
        import dask.array

        return dask.array.from_array(sigma)
    return sigma


def sigma_bounds(
    weight: Any,
    *,
    dim: int | None = None,
    method: str = "cholesky",
    steps: int | None = None,
    batched: bool = False,
    state: SigmaState | None = None,
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
    batched : bool
        Read ``weight`` as a stack of matrices ``(..., m, n)`` (see
        :func:`estimate_sigma`) and bound each matrix.
    state : SigmaState, optional
        A state of :func:`estimate_sigma` on the same weight (same ``batched``), for
        ``method="cholesky"``: its estimates set where each certificate is tried and
        its vectors give the lower ends, so no eigenvalue problem is solved (the
        Gram matrix and one Cholesky factorization per matrix remain). The bounds hold
        whatever the state holds; a state far from the weight only costs the
        eigenvalue problem again. The upper end is then about ``sigma + 2 error``
        (the state's error estimate) instead of within rounding of sigma.

    Returns
    -------
    SigmaInterval
        ``(lower, upper)``, unpackable as ``lo, hi = ...``: Python floats, or, with
        ``batched=True``, two float64 NumPy arrays of shape ``W.shape[:-2]``, one
        interval per matrix.

    Raises
    ------
    TypeError, ValueError
        As for :func:`estimate_sigma`; also for an operator that has no dense
        form and is too large to densify, ``steps`` without ``method="gram"``,
        ``state`` with ``method="gram"``, and ``dim``, ``method``, ``steps`` or
        ``state`` for an operator with its own ``sigma_bounds()`` (pass them to that
        method instead).

    Examples
    --------
    >>> import numpy as np, lipnorm
    >>> lo, hi = lipnorm.sigma_bounds(np.diag([3.0, 2.0, 1.0]))
    >>> lo <= 3.0 <= hi and hi / lo < 1 + 1e-3
    True
    >>> lower, upper = lipnorm.sigma_bounds(np.stack([np.eye(2), 3.0 * np.eye(2)]), batched=True)
    >>> bool(np.all((lower <= [1.0, 3.0]) & ([1.0, 3.0] <= upper)))
    True
    """
    if method not in ("cholesky", "gram"):
        raise ValueError(f"unknown method {method!r}; choose 'cholesky' or 'gram'")
    if steps is not None and method != "gram":
        raise ValueError(f"steps={steps} applies to method='gram' only (method={method!r})")
    if state is not None and method != "cholesky":
        raise ValueError("state= sets where the Cholesky certificate is tried: method='cholesky' only")
    own_bounds = getattr(weight, "sigma_bounds", None)
    if callable(own_bounds) and not batched:
        if dim is not None or method != "cholesky" or steps is not None or state is not None:
            raise ValueError(
                f"a {type(weight).__name__} certifies its own norm and takes no dim, method, "
                "steps or state here; pass its options to weight.sigma_bounds(...) instead"
            )
        return own_bounds()
    operator, batch_shape = _operator_of(weight, dim, batched)
    if state is not None:
        _checked_state(state, operator, batch_shape)
    integral = isinstance(operator, (DenseOperator, DenseStack)) and operator.xp.isdtype(weight.dtype, "integral")
    if integral:
        # The compute dtype can round integers (float32 above 2**24): certify the host copy.
        host = to_numpy(weight)
        dense = host.reshape((-1,) + host.shape[-2:]) if batched else matrix_view(host, dim=dim)[0]
    elif batched:
        dense = operator.to_dense()
    else:
        dense = _dense(operator)
    if batched:
        lower, upper = _bounds_each(dense, method, steps, state)
        return SigmaInterval(lower.reshape(batch_shape), upper.reshape(batch_shape),
                             "Cholesky certificate per matrix (float64)" if method == "cholesky"
                             else "Gram iteration per matrix (float64)")
    if method == "gram":
        return gram_iteration_bounds(dense) if steps is None else gram_iteration_bounds(dense, steps=steps)
    if state is not None and state.v is not None:
        lower, upper = _bounds_each(dense, method, steps, state)
        return SigmaInterval(float(lower[0]), float(upper[0]), "Cholesky certificate (float64)")
    return certified_stack_bounds(dense)


def _bounds_each(dense: Any, method: str, steps: int | None, state: SigmaState | None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Certified ``(lower, upper)`` of each matrix of a stack (or of one matrix)."""
    if method == "gram":
        from lipnorm.certificates import gram_iteration_block_bounds

        return gram_iteration_block_bounds(dense) if steps is None else gram_iteration_block_bounds(dense, steps=steps)
    if state is None or state.v is None:
        return certified_bounds_each(dense)
    estimates = np.asarray(state.sigma, dtype=np.float64).reshape(-1)
    errors = np.asarray(state.error, dtype=np.float64).reshape(-1)
    count = estimates.size
    return certified_bounds_each(
        dense, estimates=estimates + 2.0 * errors,
        right_vectors=to_numpy(state.v).reshape(count, -1), left_vectors=to_numpy(state.u).reshape(count, -1),
    )
