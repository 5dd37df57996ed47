"""Certified bounds on the largest singular value, float rounding included.

Every certificate here is computed on the host in float64 (complex128 for
complex input), whatever library the matrix came from: the rounding-error
bounds below are the standard ones for IEEE double arithmetic with a
conventional (non-Strassen) BLAS/LAPACK, which NumPy provides on every
platform. A GPU matrix is copied to host memory for this; estimates
(:func:`lipnorm.estimate_sigma`) never are.

Upper bound: the Cholesky certificate
    ``sigma_max(A)^2 <= t`` iff ``t I - A^H A`` is positive semidefinite. Pick
    ``t`` a little above the square of a good estimate and factor
    ``B = fl(t I - fl(A^H A))``. If floating-point Cholesky succeeds,
    ``R^H R = B + E`` with ``|E| <= gamma_{d+1} |R^H| |R|`` (Higham, *Accuracy
    and Stability of Numerical Algorithms*, 2nd ed., Thm 10.3), so
    ``lambda_min(B) >= -gamma_{d+1} ||R||_F^2``. Adding the error of forming
    ``A^H A`` (``<= gamma_k ||A||_F^2``, Higham §3.5) and of the diagonal
    subtraction gives ``sigma_max^2 <= t + delta``, evaluated with upward
    rounding. One factorization, about ``d^3/3`` flops after the Gram product.
Upper bound: Gram iteration (:func:`gram_iteration_bounds`)
    ``G_0 = A``, ``G_{j+1} = G_j^H G_j`` rescaled by powers of two (exact), so
    ``sigma_max(A) <= ||G_J||_F^{1/2^J}``; the rounding of every product is
    carried back through the recursion (Delattre et al., ICML 2023).
Lower bound
    ``||A x|| / ||x||`` for the best available singular vector ``x``, with the
    rounding of the product (``<= gamma_k ||A||_F ||x||``) subtracted.

``gamma_j = j u / (1 - j u)``, ``u = 2^-53``; every constant is doubled for
complex arithmetic and once more as a safety factor.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator

import numpy as np

from lipnorm._parallel import parallel_map
from lipnorm._xp import array_namespace, to_numpy
from lipnorm.krylov import lanczos, lanczos_stack, random_vector, random_vectors
from lipnorm.operators import DenseOperator, DenseStack

__all__ = [
    "GramStackCertificate",
    "SigmaInterval",
    "block_grams",
    "certified_bounds_each",
    "certified_stack_bounds",
    "certify_gram_chunks",
    "certify_gram_stack",
    "certify_stack",
    "certify_positive_semidefinite",
    "certify_shifted_cholesky",
    "cholesky_rounding_bound",
    "gram_formation_error",
    "gram_iteration_block_bounds",
    "gram_iteration_bounds",
    "scaling_slack",
]

_UNIT_ROUNDOFF = 2.0**-53
_SMALLEST_SUBNORMAL = 2.0**-1074
#: Blocks up to this size get their exact estimate from a dense eigen-decomposition, larger
#: ones from Lanczos.
_DENSE_ESTIMATE_LIMIT = 256
#: Matrices at least this large are Cholesky-factored one at a time, smaller ones in batches.
_SINGLE_FACTOR_MIN_DIMENSION = 32
#: Gram matrices at least this large are formed by BLAS rank-k updates, one at a time.
_RANK_UPDATE_MIN_DIMENSION = 32
_RANKING_LANCZOS_STEPS = 16
#: A stack larger than this in float64 is certified (per matrix) a piece at a time.
_PIECE_BYTES = 64 << 20
_TINY = np.finfo(np.float64).tiny


@dataclasses.dataclass(frozen=True)
class SigmaInterval:
    """A certified interval ``lower <= sigma_max <= upper``, or one per matrix of a stack.

    Unpacks as ``lower, upper = interval``.

    Attributes
    ----------
    lower, upper : float, or numpy.ndarray of float64 (one per matrix of a stack)
        The certified ends (float rounding accounted for).
    method : str
        How the ends were obtained.
    """

    lower: Any
    upper: Any
    method: str

    def __post_init__(self) -> None:
        # Plain Python floats, whatever arithmetic (NumPy scalars included) produced them;
        # float64 arrays for a stack.
        for name in ("lower", "upper"):
            value = getattr(self, name)
            stack = isinstance(value, np.ndarray)  # (0-d for a stack of batch shape ())
            value = np.asarray(value, dtype=np.float64) if stack else float(value)
            object.__setattr__(self, name, value)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.lower, self.upper))

    @property
    def ratio(self) -> Any:
        """``upper / lower`` (``inf`` when ``lower`` is 0 and ``upper`` is not; 1 for 0, 0)."""
        lower, upper = np.asarray(self.lower), np.asarray(self.upper)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(upper == 0.0, 1.0, np.where(lower > 0, upper / np.where(lower > 0, lower, 1.0), math.inf))
        return float(ratio) if ratio.ndim == 0 else ratio


def _gamma(count: float, complex_dtype: bool) -> float:
    """Higham's gamma_count with lipnorm's safety factors (see the module docstring)."""
    value = count * _UNIT_ROUNDOFF / (1.0 - count * _UNIT_ROUNDOFF)
    return value * (4.0 if complex_dtype else 2.0)


def _up(x, ulps: int = 4):
    """``x`` (a float or an array) rounded up by ``ulps`` units in the last place."""
    for _ in range(ulps):
        x = np.nextafter(x, np.inf)
    return x


def _down(x, ulps: int = 4):
    """``x`` (a float or an array) rounded down by ``ulps`` ulps, and at least 0."""
    for _ in range(ulps):
        x = np.nextafter(x, -np.inf)
    return np.maximum(x, 0.0)


@dataclasses.dataclass
class _HostStack:
    """A stack of matrices on the host in float64/complex128, scaled by a power of two."""

    blocks: np.ndarray | None  # (batch, p, q), float64/complex128, scaled; None: see ``source``
    scale: Any  # original = blocks / scale, scale a power of two (float, or one per block)
    absolute_slack: Any  # sigma slack from subnormal rounding in the scaling (likewise)
    complex_dtype: bool
    source: np.ndarray | None = None  # (batch, p, q) as given, widened and scaled by pieces

    @classmethod
    def from_any(cls, blocks: Any, *, each: bool = False, pieces: bool = False) -> "_HostStack":
        """The blocks in float64/complex128, scaled by one power of two (``each``: one per
        block, the power that brings its own largest entry to about 1). With ``pieces``, a
        stack larger than :data:`_PIECE_BYTES` in float64 is kept as given and widened a
        piece at a time (:meth:`pieces`)."""
        host = to_numpy(blocks)
        if host.ndim < 2:
            raise ValueError(f"expected a stack of matrices (..., p, q), got shape {host.shape}")
        if host.size == 0:
            raise ValueError(f"the stack of matrices is empty (shape {host.shape})")
        complex_dtype = np.iscomplexobj(host)
        wide = np.complex128 if complex_dtype else np.float64
        if not (np.issubdtype(host.dtype, np.floating) or complex_dtype):
            host = host.astype(wide)  # integers: their exact values (float64 holds them up to 2**53)
        host = host.reshape((-1,) + host.shape[-2:])
        # Checked and measured in the input's own dtype (exact), with no temporary copy of a
        # real stack: the one float64 copy made below is the scaled one.
        if not np.all(np.isfinite(host)):
            raise ValueError("the matrices have NaN or Inf entries; sigma is undefined")
        axes = (1, 2) if each else None
        if complex_dtype:
            largest = np.max(np.abs(host), axis=axes).astype(np.float64)
            if not np.all(np.isfinite(largest)):  # a modulus beyond complex64's range
                largest = np.max(np.abs(host.astype(np.complex128)), axis=axes)
        else:
            largest = np.maximum(np.max(host, axis=axes), -np.min(host, axis=axes)).astype(np.float64)
        # 2**1022 is about the largest power of two a float holds: a matrix of subnormals
        # is scaled by it, which brings its largest entry to at least 2**-52. Zero: scale 1.
        exponent = np.where(largest > 0, np.maximum(np.frexp(np.where(largest > 0, largest, 1.0))[1], -1022), 0)
        scale = np.ldexp(1.0, -exponent)
        slack = scaling_slack(scale, *host.shape[-2:])
        if not each:
            return cls(np.multiply(host, float(scale), dtype=wide), float(scale), float(slack), complex_dtype)
        if pieces and host.size * np.dtype(wide).itemsize > _PIECE_BYTES:
            return cls(None, scale, slack, complex_dtype, source=host)
        return cls(np.multiply(host, scale[:, None, None], dtype=wide), scale, slack, complex_dtype)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple((self.blocks if self.blocks is not None else self.source).shape)

    def pieces(self) -> Iterator[np.ndarray]:
        """The scaled float64/complex128 stack in pieces along its longer side (rows when
        ``p >= q``, else columns), each at most about :data:`_PIECE_BYTES`; the whole stack
        when it is held widened."""
        if self.blocks is not None:
            yield self.blocks
            return
        count, p, q = self.shape
        wide = np.complex128 if self.complex_dtype else np.float64
        scale = np.asarray(self.scale)[:, None, None]
        per_line = count * min(p, q) * np.dtype(wide).itemsize
        step = max(1, _PIECE_BYTES // per_line)
        for start in range(0, max(p, q), step):
            part = self.source[:, start:start + step] if p >= q else self.source[:, :, start:start + step]
            yield np.multiply(part, scale, dtype=wide)

    def unscale_upper(self, value: float) -> float:
        return _up(value / self.scale + self.absolute_slack)

    def unscale_lower(self, value: float) -> float:
        return _down(value / self.scale - self.absolute_slack)


def scaling_slack(scale: Any, rows: int, columns: int) -> Any:
    """The sigma a ``rows x columns`` matrix can lose to subnormal rounding when multiplied by
    the power of two ``scale``: each entry moves by at most one subnormal step (none when
    ``scale >= 1``), so the matrix by at most ``sqrt(rows columns)`` steps, doubled for
    safety; in the original units (divided by ``scale``).

    Parameters
    ----------
    scale : float or ndarray, float64, shape (batch,)
        Powers of two.
    rows, columns : int
        The matrix shape.

    Returns
    -------
    float or ndarray, float64, shape (batch,)
    """
    return np.where(scale < 1.0, math.sqrt(2 * rows * columns) * _SMALLEST_SUBNORMAL / scale, 0.0)


def block_grams(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The smaller Gram matrix of each block, with a bound on its formation error.

    Parameters
    ----------
    blocks : ndarray, float64 or complex128, shape (batch, p, q)
        On the host, scaled so that no product of entries overflows.

    Returns
    -------
    gram : ndarray, shape (batch, min(p, q), min(p, q))
        ``A^H A`` or ``A A^H``, whichever is smaller; its inner length is ``max(p, q)``.
    formation_error : ndarray, float64, shape (batch,)
        Bound on the spectral norm of each computed Gram matrix's error,
        ``gamma_{max(p, q) + 2} ||A||_F^2`` (Higham §3.5), for :func:`certify_gram_chunks`
        (which adds the underflow of the products).
    """
    p, q = blocks.shape[-2:]
    complex_dtype = bool(np.iscomplexobj(blocks))
    return _grams(blocks, p >= q), gram_formation_error(_frobenius_squares(blocks), inner=max(p, q),
                                                        complex_dtype=complex_dtype)


def _grams(blocks: np.ndarray, right: bool) -> np.ndarray:
    """``A^H A`` (``right``) or ``A A^H`` of each block of a host stack (batch, p, q)."""
    p, q = blocks.shape[-2:]
    if min(p, q) >= _RANK_UPDATE_MIN_DIMENSION:
        return _rank_update_grams(blocks, right)
    adjoint = np.conj(np.swapaxes(blocks, -1, -2))
    return adjoint @ blocks if right else blocks @ adjoint


def _frobenius_squares(blocks: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    """An upper bound on ``||A||_F^2`` of each block of a host stack (batch, p, q), rounding
    included (no temporary copy of the stack). With ``shape``, ``blocks`` is a piece of
    matrices of that shape, and the sums of the pieces' values are bounded by the bound's
    factor for the whole (a sum of ``p q`` squares in any order)."""
    p, q = shape or blocks.shape[-2:]
    complex_dtype = bool(np.iscomplexobj(blocks))
    squares = (np.einsum("...ij,...ij->...", blocks.real, blocks.real)
               + (np.einsum("...ij,...ij->...", blocks.imag, blocks.imag) if complex_dtype else 0.0))
    return squares if shape else squares * (1.0 + _gamma(p * q + 2, complex_dtype))


def gram_formation_error(frobenius_squares: Any, *, inner: int, complex_dtype: bool = False) -> Any:
    """Bound on the spectral norm of ``fl(A^H A) - A^H A`` (or of ``A A^H``), any summation order.

    Each entry is a dot product of ``inner`` terms, within ``gamma_inner`` of the exact one
    relative to the dot product of the magnitudes, so the error's norm is at most
    ``gamma_{inner + 2} ||A||_F^2`` (Higham §3.5), the ``+ 2`` covering the products' rounding.
    Underflow is not included (the Cholesky certificate adds it, see
    :func:`cholesky_rounding_bound`).

    Parameters
    ----------
    frobenius_squares : float or ndarray, float64, shape (batch,)
        Upper bounds of ``||A||_F^2`` (their own rounding already included).
    inner : int
        Inner length of the products, ``max(p, q)`` for the smaller Gram matrix.
    complex_dtype : bool
        Whether the arithmetic is complex (doubles the constant).

    Returns
    -------
    float or ndarray, float64, shape (batch,)
    """
    return _gamma(inner + 2, complex_dtype) * frobenius_squares


def cholesky_rounding_bound(factor_squares: Any, gram_diagonal: Any, shift: Any, formation_error: Any, *,
                            dimension: int, inner: int, complex_dtype: bool = False) -> Any:
    """The rounding term ``delta`` of the Cholesky certificate (see the module docstring).

    Where a conventional (non-Strassen) floating-point Cholesky factorization of
    ``fl(shift I - G)`` succeeded with a factor ``R`` (the computed Hermitian ``G`` within
    ``formation_error`` of the exact ``G_exact``), ``lambda_max(G_exact) <= shift + delta``
    with ``delta = gamma_{d+1} ||R||_F^2 + formation_error + 2u (shift + max|G_ii|)
    + d * inner * 2^-1074`` (Higham, Thm 10.3; the last term bounds underflow in the Gram
    products). The one formula of every Cholesky certificate in lipnorm, on the host
    (:func:`certify_gram_chunks`) or on the weights' device
    (:mod:`lipnorm.backends._torch_stack_certificate`).

    Parameters
    ----------
    factor_squares : float or ndarray, float64, shape (batch,)
        ``||R||_F^2`` as computed in float64 (the rounding of that sum is added here).
    gram_diagonal : float or ndarray, float64, shape (batch,)
        ``max_i |G_ii|`` of each computed matrix.
    shift : float or ndarray, float64, shape (batch,)
        The shifts ``t`` the factorizations were of.
    formation_error : float or ndarray, float64, shape (batch,)
        Bound on the spectral norm of ``G - G_exact`` (:func:`gram_formation_error`).
    dimension : int
        ``d``, the size of each matrix.
    inner : int
        Inner length of the products that formed ``G``.
    complex_dtype : bool
        Whether the arithmetic is complex (doubles the constants).

    Returns
    -------
    float or ndarray, float64, shape (batch,)
        ``delta``, rounded up (NaN or Inf where ``factor_squares`` is: the caller rejects those).
    """
    factor_squares = np.asarray(factor_squares, dtype=np.float64) * (1.0 + _gamma(dimension * dimension + 2,
                                                                                    complex_dtype))
    delta = (_gamma(dimension + 1, complex_dtype) * factor_squares
             + formation_error
             + 2 * _UNIT_ROUNDOFF * (shift + gram_diagonal)
             + dimension * inner * _SMALLEST_SUBNORMAL)
    return _up(delta * (1.0 + 1e-6))


def _rank_update_grams(blocks: np.ndarray, right: bool) -> np.ndarray:
    """``A^H A`` (``right``) or ``A A^H`` of each block by BLAS's Hermitian (symmetric)
    rank-k update.

    Half the products of a general matrix product, the same dot products (so the same
    rounding bound); the upper triangle is filled from the lower one, exactly.
    """
    from scipy.linalg import blas

    p, q = blocks.shape[-2:]
    complex_dtype = bool(np.iscomplexobj(blocks))
    update = blas.zherk if complex_dtype else blas.dsyrk
    side = q if right else p
    gram = np.empty(blocks.shape[:-2] + (side, side), dtype=blocks.dtype)
    flat_blocks = blocks.reshape((-1, p, q))
    flat_gram = gram.reshape((-1, side, side))
    strict_upper = np.triu_indices(side, 1)
    for block, out in zip(flat_blocks, flat_gram):
        # BLAS reads Fortran order: a C-ordered block is passed as its transpose X = Aᵀ (a
        # view, where A itself would be copied). Aᴴ A is conj(X Xᴴ) (trans=0), A Aᴴ is
        # conj(Xᴴ X) (trans=2 complex, 1 real).
        view = block.T if block.flags.c_contiguous else block
        transposed = view is not block
        want_outer = right == transposed  # the product asked of BLAS is X Xᴴ
        lower = update(1.0, view, lower=1, trans=0 if want_outer else (2 if complex_dtype else 1))
        out[...] = np.conj(lower) if complex_dtype and transposed else lower
        out[strict_upper] = np.conj(out.T[strict_upper])
    return gram


def _certified_lowers(stack: _HostStack, vectors: np.ndarray, right: bool) -> np.ndarray:
    """Certified ``||A x|| / ||x||`` (or ``||A^H y|| / ||y||``) of every block, one vector each.

    ``vectors`` has shape (batch, q) (``right``) or (batch, p); a zero vector gives 0.
    """
    count, p, q = stack.shape
    rows, inner = (p, q) if right else (q, p)
    vectors = np.asarray(vectors, dtype=np.complex128 if stack.complex_dtype else np.float64)
    parts, squares = [], np.zeros(count)
    for piece in stack.pieces():  # along the longer side: the side of the products, here
        blocks = piece if right else np.conj(np.swapaxes(piece, -1, -2))
        parts.append((blocks @ vectors[:, :, None])[:, :, 0])
        squares += _frobenius_squares(piece, (p, q))
    products = np.concatenate(parts, axis=1)
    frobenius = np.sqrt(squares * (1.0 + _gamma(p * q + 2, stack.complex_dtype)))
    x_norms = np.linalg.norm(vectors, axis=1) * (1 + _gamma(inner + 2, stack.complex_dtype))
    image_norms = np.linalg.norm(products, axis=1) * (1 - _gamma(rows + 2, stack.complex_dtype))
    errors = _gamma(inner + 2, stack.complex_dtype) * frobenius * x_norms
    with np.errstate(divide="ignore", invalid="ignore"):
        quotients = _down(np.maximum(image_norms - errors, 0.0) / np.where(x_norms > 0, x_norms, 1.0))
    return np.where(x_norms > 0, stack.unscale_lower(quotients), 0.0)


def _exact_top_values(gram: np.ndarray) -> np.ndarray:
    """Largest eigenvalue of each Hermitian matrix of a stack (dense or Lanczos, by size)."""
    if gram.shape[-1] <= _DENSE_ESTIMATE_LIMIT:
        return np.linalg.eigvalsh(gram)[..., -1]
    return np.array([_top_eigenpair(matrix)[0] for matrix in gram])


def _top_eigenpair(matrix: np.ndarray) -> tuple[float, np.ndarray]:
    """Largest eigenvalue of one Hermitian matrix and its unit eigenvector."""
    if matrix.shape[-1] <= _DENSE_ESTIMATE_LIMIT:
        values, vectors = np.linalg.eigh(matrix)
        return float(values[-1]), vectors[:, -1]
    operator = DenseOperator(matrix, array_namespace(matrix))
    start = random_vector(operator, matrix.shape[-1], seed=0)
    result = lanczos(operator, start, rtol=1e-12, max_iter=2000)
    # sigma of a Hermitian positive semidefinite matrix is its largest eigenvalue
    return float(result.sigma), np.asarray(result.v)


def _ranking_estimates(gram: np.ndarray) -> np.ndarray:
    """Largest Ritz value of each Hermitian matrix after a few batched Lanczos steps.

    ``d / 32`` steps (4 to :data:`_RANKING_LANCZOS_STEPS`: a small share of the ``d^3 / 3``
    of the Cholesky certificate, whose failures cost more on large matrices) with full
    reorthogonalization, all matrices at once. A Ritz value never exceeds the largest
    eigenvalue (up to rounding), and on the dense tops of Gram matrices it gets much
    closer than as many power steps. Only ranks the matrices.
    """
    count, dimension = gram.shape[0], gram.shape[-1]
    steps = min(dimension, max(4, min(dimension // 32, _RANKING_LANCZOS_STEPS)))
    rng = np.random.default_rng(0)
    q = rng.standard_normal((count, dimension))
    if np.iscomplexobj(gram):
        q = q + 1j * rng.standard_normal((count, dimension))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    basis = np.zeros((count, steps, dimension), dtype=q.dtype)
    tridiagonal = np.zeros((count, steps, steps))
    for step in range(steps):
        basis[:, step] = q
        w = (gram @ q[:, :, None])[:, :, 0]
        tridiagonal[:, step, step] = np.real(np.sum(np.conj(q) * w, axis=1))
        for _ in range(2):  # full reorthogonalization, twice
            w -= np.einsum("bk,bkd->bd", np.einsum("bkd,bd->bk", np.conj(basis[:, : step + 1]), w),
                           basis[:, : step + 1])
        norm = np.linalg.norm(w, axis=1)
        if step + 1 < steps:
            tridiagonal[:, step, step + 1] = tridiagonal[:, step + 1, step] = norm
        invariant = norm <= 1e-13 * np.abs(tridiagonal[:, 0, 0]) + np.finfo(np.float64).tiny
        q = w / np.where(invariant, 1.0, norm)[:, None]
        q[invariant] = 0.0
    return np.linalg.eigvalsh(tridiagonal)[:, -1]


@dataclasses.dataclass
class GramStackCertificate:
    """What :func:`certify_gram_chunks` proved and the estimates it used.

    Attributes
    ----------
    upper_squared : float
        Certified upper bound on the largest eigenvalue over the exact stack.
    estimates : ndarray, float64, shape (batch,)
        Estimate of each matrix's largest eigenvalue: exact (up to rounding) for the
        ranked top and for every matrix whose first certificate failed, a lower estimate
        (the largest Ritz value of a few Lanczos steps) for the others. Ranks the
        matrices; not a bound.
    best : int
        Index of the largest estimate.
    vector : ndarray or None
        Top eigenvector of matrix ``best`` when it was computed on the way, else None.
    """

    upper_squared: float
    estimates: np.ndarray
    best: int
    vector: np.ndarray | None = None


def certify_gram_stack(
    gram: np.ndarray, formation_error: Any, *, complex_dtype: bool, inner: int, floor: float = 0.0
) -> GramStackCertificate:
    """Certified upper bound on the largest eigenvalue over a stack of Hermitian matrices.

    The matrices are computed approximations of positive semidefinite ones (Gram matrices,
    a convolution's Gram symbol); only their lower triangles are read. One chunk of
    :func:`certify_gram_chunks`, which describes the certificate.

    Parameters
    ----------
    gram : ndarray, float64 or complex128, shape (batch, d, d)
        The computed matrices (scaled so that no entry overflows).
    formation_error : float or ndarray, shape (batch,)
        Bound on the spectral norm of the difference between each computed matrix and
        the exact one it stands for.
    complex_dtype, inner, floor
        As for :func:`certify_gram_chunks`.

    Returns
    -------
    GramStackCertificate
    """
    return certify_gram_chunks(lambda _: (gram, formation_error), 1, complex_dtype=complex_dtype,
                               inner=inner, floor=floor)


def certify_gram_chunks(
    chunk: Callable[[int], tuple[np.ndarray, Any]],
    count: int,
    *,
    complex_dtype: bool,
    inner: int,
    floor: float = 0.0,
    keep: bool = True,
) -> GramStackCertificate:
    """Certified upper bound on the largest eigenvalue over a stack given in chunks.

    Every matrix is certified at one shared threshold ``t``, a little above the exact
    largest eigenvalue of the matrix that a few Lanczos steps rank highest over all
    chunks, by the Cholesky certificate of the module docstring. A matrix whose
    factorization fails gets an exact eigenvalue and is certified again at a threshold
    above it (the failure was either a misranked matrix or rounding at a margin too
    small, which then grows 16-fold); only the failed ones of a chunk are factored again,
    so a well-ranked stack costs one factorization per matrix.

    The chunks run in threads (:func:`lipnorm._parallel.parallel_map`) twice: once to
    rank their matrices, once to certify them at the shared threshold.

    Parameters
    ----------
    chunk : callable
        ``chunk(i)`` for ``i < count`` returns the computed matrices of chunk ``i``
        (ndarray, float64 or complex128, shape (batch_i, d, d), scaled so that no entry
        overflows; Hermitian, approximating positive semidefinite ones) and a bound on
        the spectral norm of each one's difference from the exact matrix it stands for
        (float or ndarray of shape (batch_i,)).
    count : int
        Number of chunks.
    complex_dtype : bool
        Whether the arithmetic that formed the matrices was complex (sets the rounding
        constants).
    inner : int
        Inner length of the products that formed the matrices (bounds subnormal underflow).
    floor : float
        Where the threshold starts at the least (e.g. the square of a caller's estimate of
        the maximum); the exact top eigenvalue is skipped when the ranking stays below it.
    keep : bool
        Hold every chunk's matrices from the ranking to the certificates; False calls
        ``chunk`` again instead (memory for one chunk per thread).

    Returns
    -------
    GramStackCertificate
        Its estimates and ``best`` index the chunks' matrices in order, one after the other.
    """

    def rank(index: int):
        gram, error = chunk(index)
        return _ranking_estimates(gram), ((gram, error) if keep else None)

    ranked = parallel_map(rank, range(count))
    held = [matrices for _, matrices in ranked]
    estimates = [ranking for ranking, _ in ranked]
    del ranked

    def matrices_of(index: int):
        return held[index] if keep else chunk(index)

    starts = np.cumsum([0] + [ranking.size for ranking in estimates])
    ranking = np.concatenate(estimates)
    best = int(np.argmax(ranking))
    vector = None
    if ranking[best] >= floor:
        best_chunk = int(np.searchsorted(starts, best, side="right")) - 1
        top, vector = _top_eigenpair(matrices_of(best_chunk)[0][best - starts[best_chunk]])
        estimates[best_chunk][best - starts[best_chunk]] = top
    threshold = max(float(np.max(np.concatenate(estimates))), floor, np.finfo(np.float64).tiny)

    def certify(index: int):
        gram, error = matrices_of(index)
        return _certify_above(gram, error, estimates[index], threshold, inner, complex_dtype)

    results = parallel_map(certify, range(count))
    estimates = np.concatenate([chunk_estimates for _, chunk_estimates in results])
    final_best = int(np.argmax(estimates))
    return GramStackCertificate(
        upper_squared=_up(max(float(np.max(upper)) for upper, _ in results)),
        estimates=estimates,
        best=final_best,
        vector=vector if final_best == best else None,
    )


def _certify_above(
    gram: np.ndarray, formation_error: Any, estimates: np.ndarray, threshold: Any, inner: int,
    complex_dtype: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Cholesky certificates of a stack of matrices, each starting at its ``threshold``.

    A matrix whose factorization fails gets its exact top eigenvalue: if it lies above
    the matrix's threshold, the threshold rises to it; else the failure was rounding at
    this margin, which grows 16-fold. A matrix never certified below a margin of 1 gets
    its Frobenius norm.

    Parameters
    ----------
    gram : ndarray, shape (batch, d, d)
    formation_error : float or ndarray, shape (batch,)
    estimates : ndarray, shape (batch,)
        Estimates of the top eigenvalues (ranking only).
    threshold : float or ndarray, shape (batch,)
        Where each matrix's certificate is first tried (a shared one, or one per matrix).
    inner : int
    complex_dtype : bool

    Returns
    -------
    upper_squared : ndarray, float64, shape (batch,)
        Certified bound on the largest eigenvalue of each exact matrix.
    estimates : ndarray, float64, shape (batch,)
        A copy of ``estimates`` (clipped at 0) with the exact eigenvalues of the matrices
        whose first certificate failed.
    """
    count, dimension = gram.shape[0], gram.shape[-1]
    errors = np.broadcast_to(np.asarray(formation_error, dtype=np.float64), (count,))
    estimates = np.maximum(estimates, 0.0)
    thresholds = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (count,)).copy()
    margins = np.full(count, 16 * dimension * _UNIT_ROUNDOFF)
    certified = np.full(count, np.inf)
    pending = np.arange(count)
    while pending.size:
        levels = _up(thresholds[pending] * (1.0 + margins[pending]))
        matrices = gram if pending.size == count else gram[pending]
        deltas = _cholesky_deltas(matrices, levels, errors[pending], inner, complex_dtype)
        passed = np.isfinite(deltas)
        certified[pending[passed]] = _up(levels[passed] + deltas[passed])
        pending = pending[~passed]
        if pending.size:
            exact = _exact_top_values(gram[pending])
            estimates[pending] = np.maximum(exact, 0.0)
            higher = exact > thresholds[pending]
            thresholds[pending[higher]] = exact[higher]
            margins[pending[~higher]] *= 16.0  # the failures are rounding at this margin
            pending = pending[margins[pending] < 1.0]
    failed = np.flatnonzero(~np.isfinite(certified))
    if failed.size:  # not certifiable by Cholesky: fall back to the Frobenius norm
        squares = np.sum(np.abs(gram[failed]) ** 2, axis=(-2, -1))
        squares *= 1.0 + _gamma(dimension * dimension + 2, complex_dtype)
        certified[failed] = _up(np.sqrt(squares) * (1.0 + 4 * _UNIT_ROUNDOFF) + errors[failed])
    return certified, estimates


def certified_bounds_each(
    blocks: Any,
    *,
    estimates: np.ndarray | None = None,
    right_vectors: np.ndarray | None = None,
    left_vectors: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Certified ``lower[i] <= sigma_max(blocks[i]) <= upper[i]`` for every matrix of a stack.

    Each matrix is scaled by its own power of two and certified by the Cholesky
    certificate of the module docstring at its own threshold: a little above the
    square of ``estimates[i]`` when given, else above its exact top eigenvalue (a dense
    eigendecomposition of its Gram matrix up to 256, Lanczos above). The lower end is
    the certified ``||A x|| / ||x||`` of the given vectors, else of the top eigenvector.

    Parameters
    ----------
    blocks : array, shape (..., p, q)
        Real or complex matrices of any supported library, flattened to (batch, p, q).
    estimates : ndarray, shape (batch,), optional
        Estimates of each sigma_max that are at or a little above it (e.g. an estimate
        plus twice its error estimate): the certificate is tried there first, and the
        eigenvalue problem is solved only for the matrices where it fails.
    right_vectors, left_vectors : ndarray, shapes (batch, q) and (batch, p), optional
        Approximate top right and left singular vectors (with ``estimates``): the lower
        ends come from the right ones when ``p >= q``, else from the left ones.

    Returns
    -------
    lower, upper : ndarray, float64, shape (batch,)
        Zero matrices get ``0, 0``.

    Raises
    ------
    ValueError
        For NaN/Inf entries or an empty stack.

    Examples
    --------
    >>> import numpy as np
    >>> lower, upper = certified_bounds_each(np.stack([np.diag([3.0, 1.0]), np.eye(2)]))
    >>> bool(lower[0] <= 3.0 <= upper[0] and lower[1] <= 1.0 <= upper[1])
    True
    """
    stack = _HostStack.from_any(blocks, each=True, pieces=True)
    count, p, q = stack.shape
    right = p >= q
    gram, formation_error, zero = _pieced_grams(stack, right)
    vectors = right_vectors if right else left_vectors
    if estimates is None or vectors is None:
        thresholds, vectors = _top_eigenpairs_each(gram)
    else:
        thresholds = (np.asarray(estimates, dtype=np.float64).reshape(count) * stack.scale) ** 2
        vectors = np.asarray(vectors).reshape(count, min(p, q))
    upper_squared, _ = _certify_above(gram, formation_error, thresholds, np.maximum(thresholds, _TINY),
                                      max(p, q), stack.complex_dtype)
    upper = np.where(zero, 0.0, stack.unscale_upper(_up(np.sqrt(upper_squared))))
    lower = np.where(zero, 0.0, _certified_lowers(stack, vectors, right))
    return lower, np.maximum(upper, lower)


def _pieced_grams(stack: _HostStack, right: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The smaller Gram matrix of each block (``A^H A`` when ``right``), summed over the
    stack's :meth:`~_HostStack.pieces`, its formation error (as :func:`block_grams`: each
    entry is one dot product of length ``max(p, q)``, whatever order its terms are added in)
    and which blocks are zero."""
    count, p, q = stack.shape
    gram, squares, nonzero = None, np.zeros(count), np.zeros(count, dtype=bool)
    for piece in stack.pieces():
        part = _grams(piece, right)
        gram = part if gram is None else np.add(gram, part, out=gram)
        squares += _frobenius_squares(piece, (p, q))
        nonzero |= np.any(piece, axis=(1, 2))
    squares *= 1.0 + _gamma(p * q + 2, stack.complex_dtype)
    return gram, gram_formation_error(squares, inner=max(p, q), complex_dtype=stack.complex_dtype), ~nonzero


def _top_eigenpairs_each(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The largest eigenvalue and a unit eigenvector of each Hermitian matrix of a stack:
    dense up to :data:`_DENSE_ESTIMATE_LIMIT`, else Lanczos on the whole stack at once."""
    if gram.shape[-1] <= _DENSE_ESTIMATE_LIMIT:
        values, vectors = np.linalg.eigh(gram)
        return values[:, -1], vectors[:, :, -1]
    operator = DenseStack(gram, array_namespace(gram))
    start = random_vectors(operator, gram.shape[0], gram.shape[-1], seed=0)
    result = lanczos_stack(operator, start, rtol=1e-12, max_iter=2000, random_start=True)
    # sigma of a Hermitian positive semidefinite matrix is its largest eigenvalue
    return result.sigma, np.asarray(result.v)


def certified_stack_bounds(blocks: Any, *, estimate: float | None = None) -> SigmaInterval:
    """Certified interval for ``max_i sigma_max(blocks[i])`` over a stack of matrices.

    Parameters
    ----------
    blocks : array, shape (..., p, q)
        Real or complex matrices of any supported library (e.g. the per-frequency
        blocks of a convolution). A single matrix is a stack of one.
    estimate : float, optional
        A good estimate of the maximum (e.g. from Lanczos); computed here when
        not given.

    Returns
    -------
    SigmaInterval
        ``lower <= max_i sigma_max(blocks[i]) <= upper``, computed in float64 with
        every rounding error bounded (see the module docstring). The interval is
        typically 1e-12 to 1e-8 wide relative to sigma (wider for larger blocks).

    Raises
    ------
    ValueError
        For NaN/Inf entries or an empty stack.

    Examples
    --------
    >>> import numpy as np
    >>> lower, upper = certified_stack_bounds(np.diag([3.0, 1.0]))
    >>> lower <= 3.0 <= upper
    True
    """
    return certify_stack(blocks, estimate=estimate)[0]


def certify_stack(blocks: Any, *, estimate: float | None = None) -> tuple[SigmaInterval, np.ndarray]:
    """:func:`certified_stack_bounds`, with the per-block estimates it used.

    Parameters
    ----------
    blocks : array, shape (..., p, q)
    estimate : float, optional
        As for :func:`certified_stack_bounds`.

    Returns
    -------
    interval : SigmaInterval
        ``lower <= max_i sigma_max(blocks[i]) <= upper``.
    estimates : ndarray, float64, shape (batch,)
        An estimate of ``sigma_max`` of each block of the stack flattened to
        ``(batch, p, q)`` (exact up to rounding for the blocks near the maximum, a lower
        estimate for the others): which block is largest, not a bound.
    """
    stack = _HostStack.from_any(blocks)
    if not np.any(stack.blocks):
        return SigmaInterval(0.0, 0.0, "zero matrix"), np.zeros(stack.blocks.shape[0])
    gram, formation_error = block_grams(stack.blocks)
    p, q = stack.blocks.shape[-2:]
    floor = (float(estimate) * stack.scale) ** 2 if estimate is not None else 0.0
    certificate = certify_gram_stack(gram, formation_error, complex_dtype=stack.complex_dtype,
                                     inner=max(p, q), floor=floor)
    vector = certificate.vector
    if vector is None:
        _, vector = _top_eigenpair(gram[certificate.best])
    best = certificate.best
    lower = float(_certified_lowers(dataclasses.replace(stack, blocks=stack.blocks[best:best + 1]),
                                    vector[None], right=p >= q)[0])
    upper = stack.unscale_upper(_up(math.sqrt(certificate.upper_squared)))
    estimates = np.sqrt(certificate.estimates) / stack.scale
    return SigmaInterval(lower, upper, "Cholesky certificate (float64)"), estimates


def _cholesky_deltas(
    gram: np.ndarray, threshold: float, formation_error: np.ndarray, inner: int, complex_dtype: bool
) -> np.ndarray:
    """Per matrix, ``delta`` with ``lambda_max <= threshold + delta``, or ``inf`` where
    ``threshold I - gram`` was not numerically positive definite (the threshold is too low).
    ``threshold`` is one float or one per matrix.

    ``formation_error`` bounds how far each computed matrix is from the exact one.
    """
    dimension = gram.shape[-1]
    threshold = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (gram.shape[0],))
    ok, factor_squares = _shifted_cholesky_squares(gram, threshold)
    diagonal = np.arange(dimension)
    gram_diagonal = np.max(np.abs(gram[..., diagonal, diagonal]), axis=-1)
    delta = cholesky_rounding_bound(factor_squares, gram_diagonal, threshold, formation_error,
                                    dimension=dimension, inner=inner, complex_dtype=complex_dtype)
    return np.where(ok, delta, np.inf)


def _shifted_cholesky_squares(gram: np.ndarray, threshold: Any) -> tuple[np.ndarray, np.ndarray]:
    """Cholesky-factor ``fl(threshold I - G)`` for each Hermitian ``G`` (lower triangle read),
    ``threshold`` one float or one per matrix.

    Returns
    -------
    ok : ndarray of bool, shape (batch,)
        Whether the factorization succeeded with a finite factor.
    squares : ndarray, shape (batch,)
        ``||R||_F^2`` of each factor (0 where it failed).
    """
    count, dimension = gram.shape[0], gram.shape[-1]
    threshold = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (count,))
    diagonal = np.arange(dimension)
    ok, squares = np.zeros(count, dtype=bool), np.zeros(count)
    if dimension >= _SINGLE_FACTOR_MIN_DIMENSION:
        # One matrix at a time: reports which fail, and each shifted copy stays in cache.
        # NumPy, not SciPy's LAPACK wrapper: NumPy releases the GIL, so chunks factor in
        # parallel threads.
        for index, matrix in enumerate(gram):
            shifted = -matrix
            shifted[diagonal, diagonal] += threshold[index]
            try:
                factor = np.linalg.cholesky(shifted)
            except np.linalg.LinAlgError:
                continue
            square = np.vdot(factor, factor).real  # not finite if any entry is not
            ok[index] = bool(np.isfinite(square))
            squares[index] = square if ok[index] else 0.0
        return ok, squares
    shifted = -gram
    shifted[..., diagonal, diagonal] += threshold[:, None]
    try:
        factors = np.linalg.cholesky(shifted)
    except np.linalg.LinAlgError:  # some matrix failed: halve the batch to find which
        if count == 1:
            return ok, squares
        half = count // 2
        first = _shifted_cholesky_squares(gram[:half], threshold[:half])
        second = _shifted_cholesky_squares(gram[half:], threshold[half:])
        return np.concatenate([first[0], second[0]]), np.concatenate([first[1], second[1]])
    ok = np.all(np.isfinite(factors), axis=(-2, -1))
    squares = np.sum(np.abs(np.where(ok[:, None, None], factors, 0.0)) ** 2, axis=(-2, -1))
    return ok, squares


def gram_iteration_bounds(blocks: Any, *, steps: int = 8) -> SigmaInterval:
    """Certified interval for ``max_i sigma_max(blocks[i])`` by Gram iteration.

    Parameters
    ----------
    blocks : array, shape (..., p, q)
        Real or complex matrices of any supported library.
    steps : int
        Gram steps ``J``; the upper bound overestimates by at most a factor
        ``rank^(1/2^(J+1))``.

    Returns
    -------
    SigmaInterval
        The largest of the per-matrix bounds of :func:`gram_iteration_block_bounds`.

    References
    ----------
    .. [1] B. Delattre, Q. Barthelemy, A. Araujo, A. Allauzen, "Efficient Bound of
       Lipschitz Constant for Convolutional Layers by Gram Iteration", ICML 2023.
    """
    lower, upper = gram_iteration_block_bounds(blocks, steps=steps)
    if not np.any(upper):
        return SigmaInterval(0.0, 0.0, "zero matrix")
    return SigmaInterval(float(np.max(lower)), float(np.max(upper)),
                         f"Gram iteration ({steps} steps, float64)")


def gram_iteration_block_bounds(blocks: Any, *, steps: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Certified bounds on ``sigma_max`` of every matrix of a stack, by Gram iteration.

    Parameters
    ----------
    blocks : array, shape (..., p, q)
        Real or complex matrices of any supported library.
    steps : int
        Gram steps ``J``, at least 1.

    Returns
    -------
    lower, upper : ndarray, float64, shape (batch,)
        ``lower[i] <= sigma_max(blocks[i]) <= upper[i]`` for the stack flattened to
        ``(batch, p, q)``. Upper: ``||G_J||_F^{1/2^J}`` with every product's rounding
        carried back; lower: ``upper * rank^(-1/2^(J+1))`` (valid because
        ``||G_J||_F^2 <= rank * sigma^(2^(J+1))``), lowered by the rounding. Zero
        matrices get ``0, 0``.

    Examples
    --------
    >>> import numpy as np
    >>> lower, upper = gram_iteration_block_bounds(np.stack([np.diag([3.0, 1.0]), np.eye(2)]))
    >>> bool(lower[0] <= 3.0 <= upper[0] and lower[1] <= 1.0 <= upper[1])
    True
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    stack = _HostStack.from_any(blocks)
    current = stack.blocks
    rank = min(current.shape[-2:])
    steps_taken = []
    for _ in range(steps):
        current, formation_error = block_grams(current)
        # Rescale each block by an exact power of two (zero blocks keep exponent 0).
        exponents = np.frexp(np.max(np.abs(current), axis=(-2, -1)))[1]
        current = current * np.ldexp(1.0, -exponents)[:, None, None]
        # With H_{j+1} = fl(H_j^H H_j) / 2^e exactly:
        # |sigma(H_j)^2 - 2^e sigma(H_{j+1})| <= gamma * ||H_j||_F^2.
        steps_taken.append((exponents, formation_error))
    final_squares = np.sum(np.abs(current) ** 2, axis=(-2, -1))
    rounding = _gamma(current.shape[-1] * current.shape[-2] + 2, stack.complex_dtype)
    upper = np.sqrt(final_squares * (1.0 + rounding)) * (1.0 + 4 * _UNIT_ROUNDOFF)
    lower = np.sqrt(final_squares * (1.0 - rounding) / rank) * (1.0 - 4 * _UNIT_ROUNDOFF)
    for exponents, slack in reversed(steps_taken):
        upper = np.sqrt((np.ldexp(upper, exponents) + slack) * (1.0 + 4 * _UNIT_ROUNDOFF))
        upper = upper * (1.0 + 4 * _UNIT_ROUNDOFF)
        lower = np.sqrt(np.maximum(np.ldexp(lower, exponents) - slack, 0.0) * (1.0 - 4 * _UNIT_ROUNDOFF))
        lower = lower * (1.0 - 4 * _UNIT_ROUNDOFF)
    zero = final_squares == 0.0
    return (np.where(zero, 0.0, stack.unscale_lower(_down(lower))),
            np.where(zero, 0.0, stack.unscale_upper(_up(upper))))


def certify_positive_semidefinite(matrix: np.ndarray, formation_error: float = 0.0) -> bool:
    """Whether a real symmetric matrix is certainly positive semidefinite.

    The matrix held is ``fl(matrix)``; the exact one is within ``formation_error``
    (spectral norm) of it. A successful floating-point Cholesky factorization ``R`` of
    ``fl(matrix − c I)`` gives ``λ_min ≥ c − γ_{d+1}‖R‖_F² − 2u(c + max|diag|)`` (Higham,
    Thm 10.3); the shift ``c`` is chosen just above what that rounding term and
    ``formation_error`` can be, and raised once if the factor's size asks for more
    (:func:`certify_shifted_cholesky`).

    Parameters
    ----------
    matrix : ndarray, shape (d, d), float64
        Symmetric (the lower triangle is read).
    formation_error : float
        Upper bound of the spectral norm of ``matrix − exact``.

    Returns
    -------
    bool
        True only if ``λ_min(exact) ≥ 0`` is proven.

    Examples
    --------
    >>> import numpy as np
    >>> certify_positive_semidefinite(np.diag([2.0, 1.0]))
    True
    >>> certify_positive_semidefinite(np.diag([2.0, -1e-300]))
    False
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    dimension = matrix.shape[0]
    if not np.all(np.isfinite(matrix)):
        return False
    diagonal = np.arange(dimension)

    def factor_square(shift: float) -> float | None:
        shifted = matrix.copy()
        shifted[diagonal, diagonal] -= shift
        try:
            factor = np.linalg.cholesky(shifted)
        except np.linalg.LinAlgError:
            return None
        return float(np.vdot(factor, factor))

    return certify_shifted_cholesky(
        factor_square, dimension=dimension, estimate=float(np.trace(matrix)),
        largest_diagonal=float(np.max(np.abs(matrix[diagonal, diagonal]))),
        formation_error=formation_error)


def certify_shifted_cholesky(factor_square: Callable[[float], float | None], *, dimension: int, estimate: float,
                             largest_diagonal: float, formation_error: float = 0.0,
                             complex_dtype: bool = False) -> bool:
    """Whether a Hermitian matrix is certainly positive semidefinite, from Cholesky factorizations.

    The check of :func:`certify_positive_semidefinite` for a matrix held in any form: the
    caller factors ``fl(A − c I)`` by a conventional Cholesky algorithm (any order of
    elimination and of summation, as for a sparse or block-structured matrix factored
    block by block with LAPACK's ``potrf`` and ``trsm``) and returns an upper bound of
    ``‖|R|‖₂²`` (``‖R‖_F²``, or less where the structure allows). Then
    ``R^H R = A − c I + E`` with ``|E| ≤ γ_{d+1}|R^H||R|`` (Higham, Thm 10.3), so
    ``λ_min(A) ≥ c − γ_{d+1}‖|R|‖₂² − 2u(c + max|diag|)``, and the exact matrix is within
    ``formation_error`` of ``A``.

    Parameters
    ----------
    factor_square : callable
        ``factor_square(c)`` factors ``fl(A − c I)`` and returns its bound of ``‖|R|‖₂²``
        (computed in float64), or None where the factorization failed.
    dimension : int
        ``d``: the longest inner product the factorization forms is at most ``d`` terms.
    estimate : float
        What ``factor_square`` returns in exact arithmetic at ``c = 0`` (``trace(A)`` for
        ``‖R‖_F²``): it sets the first shift.
    largest_diagonal : float
        ``max |A_ii|``.
    formation_error : float
        Upper bound of the spectral norm of ``A − exact``.
    complex_dtype : bool
        Whether ``A`` is complex Hermitian (complex rounding constants).

    Returns
    -------
    bool
        True only if ``λ_min(exact) ≥ 0`` is proven.
    """
    if not (math.isfinite(estimate) and math.isfinite(largest_diagonal) and math.isfinite(formation_error)):
        return False
    gamma = _gamma(dimension + 1, complex_dtype)
    square = max(estimate, 0.0)
    subnormal = dimension * dimension * _SMALLEST_SUBNORMAL * (2 if complex_dtype else 1)
    for _ in range(2):
        rounding = gamma * square * 1.01 + 2 * _UNIT_ROUNDOFF * 2 * largest_diagonal
        shift = 2 * (rounding + float(formation_error)) + subnormal
        computed = factor_square(shift)
        if computed is None:
            return False
        square = computed * (1.0 + _gamma(dimension * dimension + 2, complex_dtype))
        if not math.isfinite(square):
            return False
        delta = gamma * square + 2 * _UNIT_ROUNDOFF * (shift + largest_diagonal) + subnormal
        if shift - float(_up(delta * (1.0 + 1e-6))) - float(_up(float(formation_error))) > 0:
            return True
    return False
