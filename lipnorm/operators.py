"""The linear-operator view of weights: what ``estimate_sigma`` iterates on.

A linear operator here is anything with a ``shape`` ``(m, n)``, a ``dtype``,
``matvec`` (``x`` of length ``n`` to ``A x`` of length ``m``) and ``rmatvec``
(``y`` to ``A^H y``, the conjugate transpose). :func:`as_operator` turns every
input ``estimate_sigma`` accepts into one:

* an array of any supported library -> :class:`DenseOperator` (1-D: the vector
  as an ``(n, 1)`` matrix; 2-D: the matrix; N-D: only with ``dim=``, the axis
  kept as rows and the rest flattened, as in ``torch.nn.utils.spectral_norm``);
* a chunked ``dask.array`` -> :class:`DaskOperator`, which runs each product
  block by block on Dask's scheduler and keeps only vectors in memory;
* ``scipy.sparse`` matrices and ``scipy.sparse.linalg.LinearOperator`` ->
  :class:`ForeignOperator` with NumPy vectors;
* a lipnorm operator (:class:`LinearOperator`, e.g. ``lipnorm.conv_operator``)
  is used as it is; any other object with ``shape``, ``dtype``, ``matvec`` and
  ``rmatvec`` is wrapped in :class:`ForeignOperator` (NumPy vectors unless the
  object has an ``xp`` attribute naming its namespace).

:func:`stack_operator` views an array of shape ``(..., m, n)`` as a stack of
matrices (:class:`DenseStack`): what ``estimate_sigma(W, batched=True)`` iterates on.

The Krylov methods of :mod:`lipnorm.krylov` see every operator as a stack of
``count`` matrices (1 for a single one) through :meth:`LinearOperator.products`,
which returns ``A x`` and ``A^H A x`` for one vector per matrix. A NumPy matrix
computes both in one pass over its entries (:func:`fused_normal_products`); other
operators call ``matvec`` and then ``rmatvec``.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat
import numpy as np

from lipnorm._xp import array_namespace, device_of, is_tensorflow_array, library_name, to_numpy

__all__ = [
    "DaskOperator",
    "DaskStack",
    "DenseOperator",
    "DenseStack",
    "ForeignOperator",
    "LinearOperator",
    "as_operator",
    "dense_from_products",
    "fused_normal_products",
    "matrix_view",
    "stack_operator",
]

#: Bytes of a matrix's rows that :func:`fused_normal_products` multiplies at a time: small
#: enough to stay in a core's cache between the two products with them.
FUSED_CHUNK_BYTES = 1 << 19


class LinearOperator:
    """Base class of lipnorm's linear operators.

    Subclasses set ``shape`` ``(m, n)``, ``dtype`` (the dtype vectors are computed
    in), ``xp`` (the array namespace of the vectors) and ``device``, and implement
    :meth:`matvec` and :meth:`rmatvec`. An operator that can certify its own
    norm (e.g. a convolution, through its Fourier blocks) also defines
    ``sigma_bounds()``, which :func:`lipnorm.sigma_bounds` calls.

    Attributes
    ----------
    shape : tuple of int
        ``(m, n)``: the operator maps vectors of length ``n`` to length ``m``.
    dtype : dtype
        Dtype of the vectors, in namespace ``xp``.
    xp : namespace
        Array namespace the vectors live in.
    device : object
        Device of the vectors.
    """

    shape: tuple[int, int]
    dtype: Any
    xp: Any
    device: Any = None
    #: Matrices the operator holds: 1, or a stack's length (:class:`DenseStack`).
    count: int = 1
    #: Passes over the operator's entries that one call of :meth:`products` makes.
    passes_per_product: int = 2
    #: The largest magnitude of each matrix's entries (host, shape (count,)) where known.
    largest: np.ndarray | None = None

    def matvec(self, x: Any) -> Any:
        """Return ``A @ x`` for a 1-D ``x`` of length ``n``."""
        raise NotImplementedError

    def rmatvec(self, y: Any) -> Any:
        """Return ``A^H @ y`` for a 1-D ``y`` of length ``m``."""
        raise NotImplementedError

    def to_dense(self) -> Any:
        """Return the ``(m, n)`` matrix of the operator, in namespace ``xp``."""
        raise NotImplementedError(f"{type(self).__name__} has no dense form")

    def products(self, x: Any) -> tuple[Any, Any]:
        """``A x`` and ``A^H A x`` for one vector per matrix.

        Parameters
        ----------
        x : array, shape (count, n)
            Row ``i`` multiplies matrix ``i``.

        Returns
        -------
        forward : array, shape (count, m)
        normal : array, shape (count, n)
        """
        forward = self.matvec(self.xp.reshape(x, (self.shape[1],)))
        normal = self.rmatvec(forward)
        return (self.xp.reshape(forward, (1, self.shape[0])),
                self.xp.reshape(normal, (1, self.shape[1])))

    def take(self, slots: np.ndarray) -> "LinearOperator":
        """The operator of the matrices ``slots`` (host integer array) of the stack."""
        if len(slots) != 1 or int(slots[0]) != 0:
            raise IndexError(f"a single operator has matrix 0 only, not {list(slots)}")
        return self

    def adjoint(self) -> "LinearOperator":
        """The operator ``A^H`` (no copy: products swap ``matvec`` and ``rmatvec``)."""
        return AdjointOperator(self)

    def iterates_on_left(self) -> bool:
        """Whether an iteration on a normal operator should run on ``A A^H`` (vectors of
        length ``m``) rather than ``A^H A``: on the smaller side, unless the operator's
        products read its entries in memory order on one side only
        (:meth:`DenseOperator.iterates_on_left`)."""
        return self.shape[0] < self.shape[1]


class AdjointOperator(LinearOperator):
    """``A^H`` of a single operator ``A``: its ``matvec`` is ``A.rmatvec`` and back.

    Parameters
    ----------
    operator : LinearOperator
    """

    def __init__(self, operator: LinearOperator) -> None:
        self.operator = operator
        self.shape = (operator.shape[1], operator.shape[0])
        self.dtype, self.xp, self.device = operator.dtype, operator.xp, operator.device

    def matvec(self, x: Any) -> Any:
        return self.operator.rmatvec(x)

    def rmatvec(self, y: Any) -> Any:
        return self.operator.matvec(y)

    def adjoint(self) -> LinearOperator:
        return self.operator


class DenseOperator(LinearOperator):
    """A matrix as a linear operator, in its own library, dtype and device.

    Parameters
    ----------
    matrix : array, shape (m, n)
        A finite 2-D array of a floating or complex dtype (see :func:`matrix_view`).
    xp : namespace
        The namespace of ``matrix``.
    """

    def __init__(self, matrix: Any, xp: Any, *, adjoint: bool = False) -> None:
        self.matrix = matrix
        self.xp = xp
        rows, cols = int(matrix.shape[0]), int(matrix.shape[1])
        self.shape = (cols, rows) if adjoint else (rows, cols)
        self.dtype = matrix.dtype
        self.device = device_of(matrix)
        self._complex = xp.isdtype(matrix.dtype, "complex floating")
        self._adjoint = adjoint
        self._fused = library_name(matrix) == "numpy"
        self.passes_per_product = 1 if self._fused else 2

    def _times(self, x: Any) -> Any:
        """``matrix @ x``."""
        return self.xp.matmul(self.matrix, x)

    def _adjoint_times(self, y: Any) -> Any:
        """``matrix^H @ y``: ``y^H matrix`` conjugated back, never a transposed or conjugated
        copy of the matrix."""
        if self._complex:
            return self.xp.conj(self.xp.matmul(self.xp.conj(y), self.matrix))
        return self.xp.matmul(y, self.matrix)

    def matvec(self, x: Any) -> Any:
        return self._adjoint_times(x) if self._adjoint else self._times(x)

    def rmatvec(self, y: Any) -> Any:
        return self._times(y) if self._adjoint else self._adjoint_times(y)

    def products(self, x: Any) -> tuple[Any, Any]:
        if not self._fused:
            return super().products(x)
        forward, normal = fused_normal_products(self.matrix, x[0], adjoint=self._adjoint)
        return forward[None], normal[None]

    def adjoint(self) -> "DenseOperator":
        return _with_largest(type(self)(self.matrix, self.xp, adjoint=not self._adjoint), self.largest)

    def iterates_on_left(self) -> bool:
        """A NumPy matrix runs on the side whose :func:`fused_normal_products` walk blocks of
        contiguous rows (of a C-ordered matrix; columns of a Fortran-ordered one), whatever
        its shape: a block of a row-major matrix's columns is as many short strided pieces
        as it has rows, 2.7-3.3x slower to read for the same products (2048 x 5632). The
        longer vectors cost a little more reorthogonalization, never more than the products
        (the basis never exceeds the smaller side plus one). Other libraries: the smaller side."""
        if self._fused:
            rows_contiguous = self.matrix.flags.c_contiguous or not self.matrix.flags.f_contiguous
            # A^H A walks rows of the matrix; for the adjoint operator A A^H does.
            return rows_contiguous == self._adjoint
        return super().iterates_on_left()

    def scaled(self, exponents: np.ndarray) -> "DenseOperator":
        """The operator times ``2**exponents[0]`` (exact unless entries leave the dtype's range)."""
        scaled = type(self)(_times_powers_of_two(self.matrix, exponents, (), self), self.xp,
                            adjoint=self._adjoint)
        return _with_largest(scaled, None if self.largest is None else np.ldexp(self.largest, exponents))

    def to_dense(self) -> Any:
        if self._adjoint:
            transposed = self.xp.permute_dims(self.matrix, (1, 0))
            return self.xp.conj(transposed) if self._complex else transposed
        return self.matrix


def fused_normal_products(matrix: np.ndarray, x: np.ndarray, *, adjoint: bool = False
                          ) -> tuple[np.ndarray, np.ndarray]:
    """``F x`` and ``F^H F x`` of ``F = matrix`` (or ``matrix^H``) in one pass over it.

    ``F^H F x = sum_c F_c^H (F_c x)`` over blocks ``F_c`` of rows of ``F`` (of
    :data:`FUSED_CHUNK_BYTES`): each block is still in cache for its second product, so the
    matrix is read from memory once where ``matvec`` then ``rmatvec`` read it twice (a
    product with a large matrix is bound by memory, not arithmetic).

    Parameters
    ----------
    matrix : numpy.ndarray, shape (p, q)
    x : numpy.ndarray, shape (q,), or (p,) when ``adjoint``
    adjoint : bool
        ``F = matrix^H``: its rows are the matrix's columns.

    Returns
    -------
    forward : numpy.ndarray
        ``F x``.
    normal : numpy.ndarray
        ``F^H F x``, the length of ``x``.
    """
    complex_dtype = np.iscomplexobj(matrix)
    rows_of_f = matrix.shape[1] if adjoint else matrix.shape[0]
    step = max(1, FUSED_CHUNK_BYTES // max(1, (matrix.size // rows_of_f) * matrix.itemsize))
    dtype = np.result_type(matrix, x)
    forward = np.empty(rows_of_f, dtype=dtype)
    normal = np.zeros(x.shape[0], dtype=dtype)
    part = np.empty_like(normal)
    conjugated_x = np.conj(x) if complex_dtype and adjoint else x
    for start in range(0, rows_of_f, step):
        stop = min(start + step, rows_of_f)
        if adjoint:  # F_c = matrix[:, c]^H
            block = matrix[:, start:stop]
            np.matmul(conjugated_x, block, out=forward[start:stop])
            if complex_dtype:
                np.conj(forward[start:stop], out=forward[start:stop])
            np.matmul(block, forward[start:stop], out=part)
        else:  # F_c = matrix[c]
            block = matrix[start:stop]
            np.matmul(block, x, out=forward[start:stop])
            if complex_dtype:
                np.conj(np.matmul(np.conj(forward[start:stop]), block), out=part)
            else:
                np.matmul(forward[start:stop], block, out=part)
        normal += part
    return forward, normal


class DenseStack(LinearOperator):
    """A stack of matrices ``(count, m, n)`` as ``count`` operators iterated together.

    One batched product serves every matrix: :meth:`products` takes one vector per
    matrix. Made by :func:`stack_operator`.

    Parameters
    ----------
    matrices : array, shape (count, m, n)
        Finite, of a floating or complex dtype.
    xp : namespace
    adjoint : bool
        Stand for the stack of ``matrices[i]^H`` (no copy).
    """

    def __init__(self, matrices: Any, xp: Any, *, adjoint: bool = False) -> None:
        self.matrices = matrices
        self.xp = xp
        count, rows, cols = (int(s) for s in matrices.shape)
        self.count = count
        self.shape = (cols, rows) if adjoint else (rows, cols)
        self.dtype = matrices.dtype
        self.device = device_of(matrices)
        self._complex = xp.isdtype(matrices.dtype, "complex floating")
        self._adjoint = adjoint

    def _matmul(self, a: Any, b: Any) -> Any:
        return self.xp.matmul(a, b)

    def _times(self, x: Any) -> Any:
        """``matrices[i] @ x[i]`` for ``x`` of shape (count, n) -> (count, m)."""
        count, length = (int(s) for s in x.shape)
        product = self._matmul(self.matrices, self.xp.reshape(x, (count, length, 1)))
        return self.xp.reshape(product, (count, int(self.matrices.shape[1])))

    def _adjoint_times(self, y: Any) -> Any:
        """``matrices[i]^H @ y[i]`` for ``y`` of shape (count, m) -> (count, n)."""
        xp = self.xp
        count, length = (int(s) for s in y.shape)
        if self._complex:
            y = xp.conj(y)
        product = self._matmul(xp.reshape(y, (count, 1, length)), self.matrices)
        product = xp.reshape(product, (count, int(self.matrices.shape[2])))
        return xp.conj(product) if self._complex else product

    def products(self, x: Any) -> tuple[Any, Any]:
        if self._adjoint:
            forward = self._adjoint_times(x)
            return forward, self._times(forward)
        forward = self._times(x)
        return forward, self._adjoint_times(forward)

    def take(self, slots: np.ndarray) -> "DenseStack":
        index = self.xp.asarray(np.asarray(slots, dtype=np.int64), device=self.device)
        taken = type(self)(self.xp.take(self.matrices, index, axis=0), self.xp, adjoint=self._adjoint)
        return _with_largest(taken, None if self.largest is None else self.largest[slots])

    def adjoint(self) -> "DenseStack":
        return _with_largest(type(self)(self.matrices, self.xp, adjoint=not self._adjoint), self.largest)

    def scaled(self, exponents: np.ndarray) -> "DenseStack":
        """The stack with matrix ``i`` times ``2**exponents[i]`` (exact unless entries leave
        the dtype's range)."""
        scaled = type(self)(_times_powers_of_two(self.matrices, exponents, (-1, 1, 1), self), self.xp,
                            adjoint=self._adjoint)
        return _with_largest(scaled, None if self.largest is None else np.ldexp(self.largest, exponents))

    def to_dense(self) -> Any:
        return self.matrices


def _with_largest(operator: LinearOperator, largest: np.ndarray | None) -> LinearOperator:
    """``operator`` with its ``largest`` entries' magnitudes set (host, one per matrix)."""
    operator.largest = largest
    return operator


def _times_powers_of_two(matrices: Any, exponents: np.ndarray, shape: tuple[int, ...],
                         operator: LinearOperator) -> Any:
    """``matrices`` times ``2**exponents`` (host integers, reshaped to ``shape`` to broadcast),
    in steps of at most ``2**60``, a factor every floating dtype from single precision up holds."""
    exponents = np.asarray(exponents, dtype=np.int64).copy()
    dtype = to_numpy_dtype(operator.dtype)  # complex factors for complex matrices (TensorFlow)
    while np.any(exponents):
        step = np.clip(exponents, -60, 60)
        factors = np.ldexp(1.0, step).astype(dtype).reshape(shape)
        matrices = matrices * operator.xp.asarray(factors, device=operator.device)
        exponents -= step
    return matrices


class DaskStack(DenseStack):
    """A chunked ``dask.array`` stack: every batched product is computed by Dask's
    scheduler, with NumPy vectors."""

    def __init__(self, matrices: Any, xp: Any, *, adjoint: bool = False) -> None:
        super().__init__(matrices, array_api_compat.array_namespace(np.empty(0)), adjoint=adjoint)
        self.dtype = np.dtype(str(matrices.dtype))
        self.device = "cpu"

    def _matmul(self, a: Any, b: Any) -> Any:
        import dask.array

        return np.asarray(dask.array.matmul(a, b).compute())

    def take(self, slots: np.ndarray) -> "DaskStack":
        taken = type(self)(self.matrices[np.asarray(slots, dtype=np.int64)], self.xp, adjoint=self._adjoint)
        return _with_largest(taken, None if self.largest is None else self.largest[slots])

    def to_dense(self) -> Any:
        return np.asarray(self.matrices.compute())


class DaskOperator(DenseOperator):
    """A chunked ``dask.array`` matrix: products run block by block on Dask's scheduler.

    Vectors are NumPy arrays (they fit in memory even when the matrix does not);
    each :meth:`matvec` / :meth:`rmatvec` builds a blockwise Dask graph and
    computes it.
    """

    def __init__(self, matrix: Any, xp: Any, *, adjoint: bool = False) -> None:
        super().__init__(matrix, xp, adjoint=adjoint)
        self.xp = array_api_compat.array_namespace(np.empty(0))
        self.dtype = np.dtype(str(matrix.dtype))
        self.device = "cpu"
        self._complex = np.issubdtype(self.dtype, np.complexfloating)
        self._fused = False
        self.passes_per_product = 2

    def _times(self, x: Any) -> Any:
        return np.asarray((self.matrix @ x).compute())

    def _adjoint_times(self, y: Any) -> Any:
        if self._complex:
            return np.conj(np.asarray((np.conj(y) @ self.matrix).compute()))
        return np.asarray((y @ self.matrix).compute())

    def to_dense(self) -> Any:
        dense = np.asarray(self.matrix.compute())
        return np.conj(dense.T) if self._adjoint else dense


class ForeignOperator(LinearOperator):
    """A SciPy sparse matrix, SciPy ``LinearOperator`` or duck-typed operator.

    Parameters
    ----------
    operator : object
        Has ``shape`` (2 ints), ``dtype``, ``matvec`` and ``rmatvec`` (or is a
        ``scipy.sparse`` matrix/array, which has ``@``).
    """

    def __init__(self, operator: Any) -> None:
        self.operator = operator
        self.shape = (int(operator.shape[0]), int(operator.shape[1]))
        self.xp = getattr(operator, "xp", None) or array_api_compat.array_namespace(np.empty(0))
        self.device = getattr(operator, "device", "cpu")
        self._sparse = _is_scipy_sparse(operator)
        dtype = operator.dtype
        if self.xp.__name__.endswith("numpy"):
            dtype = compute_dtype(self.xp, np.dtype(dtype))
        self.dtype = dtype

    def matvec(self, x: Any) -> Any:
        if self._sparse:
            return self.operator @ x
        return self.xp.reshape(self.operator.matvec(x), (self.shape[0],))

    def rmatvec(self, y: Any) -> Any:
        if self._sparse:
            return np.conj(np.conj(y) @ self.operator)
        return self.xp.reshape(self.operator.rmatvec(y), (self.shape[1],))

    def to_dense(self) -> Any:
        if self._sparse:
            return np.asarray(self.operator.toarray(), dtype=self.dtype)
        if hasattr(self.operator, "to_dense"):
            return self.operator.to_dense()
        return super().to_dense()


def dense_from_products(operator: LinearOperator) -> Any:
    """The ``(m, n)`` matrix of an operator, from its products with the basis vectors.

    ``matvec`` of the ``n`` basis vectors gives the columns, or, when ``m < n``,
    ``rmatvec`` of the ``m`` basis vectors gives the conjugated rows: one product
    per unit of the smaller side.

    Parameters
    ----------
    operator : LinearOperator

    Returns
    -------
    array, shape (m, n)
        In the operator's namespace, dtype and device.
    """
    m, n = operator.shape
    by_rows = m < n
    product = operator.rmatvec if by_rows else operator.matvec
    basis = np.eye(min(m, n), dtype=to_numpy_dtype(operator.dtype))
    vectors = [to_numpy(product(operator.xp.asarray(unit, device=operator.device))) for unit in basis]
    dense = np.conj(np.stack(vectors)) if by_rows else np.stack(vectors, axis=1)
    return operator.xp.asarray(dense, device=operator.device)


def to_numpy_dtype(dtype: Any) -> np.dtype:
    """The NumPy dtype of the same name as ``dtype`` (of any library)."""
    name = getattr(dtype, "name", None) or str(dtype).split(".")[-1]
    return np.dtype(name)


def _is_scipy_sparse(obj: Any) -> bool:
    return type(obj).__module__.startswith("scipy.sparse") and hasattr(obj, "toarray")


def _is_operator_like(obj: Any) -> bool:
    return all(hasattr(obj, name) for name in ("shape", "dtype", "matvec", "rmatvec"))


def as_operator(weight: Any, dim: int | None = None) -> LinearOperator:
    """Return the linear-operator view of ``weight``.

    Parameters
    ----------
    weight : array or operator
        See the module docstring for what is accepted.
    dim : int, optional
        For arrays with more than 2 dimensions: the axis kept as rows (the rest
        is flattened). For 2-D arrays, ``dim=1`` takes the transpose (same norm).

    Returns
    -------
    LinearOperator

    Raises
    ------
    TypeError, ValueError
        For the inputs :func:`matrix_view` rejects, or a SciPy sparse matrix
        with non-finite entries.
    """
    if isinstance(weight, LinearOperator):
        return weight
    if _is_scipy_sparse(weight):
        data = np.asarray(weight.tocoo().data)
        if data.size and not np.all(np.isfinite(data)):
            raise ValueError("the sparse matrix has NaN or Inf entries; sigma is undefined")
        _check_nonempty(weight.shape)
        return ForeignOperator(weight)
    if not array_api_compat.is_array_api_obj(weight) and not is_tensorflow_array(weight):
        if _is_operator_like(weight):
            _check_nonempty(weight.shape)
            return ForeignOperator(weight)
    matrix, xp, largest = _validated_matrix(weight, dim=dim)
    operator = (DaskOperator if library_name(matrix) == "dask" else DenseOperator)(matrix, xp)
    operator.largest = np.array([largest])
    return operator


def _check_nonempty(shape: tuple[int, ...]) -> None:
    if len(shape) != 2:
        raise ValueError(f"a linear operator must have a 2-D shape (m, n), got {tuple(shape)}")
    if math.prod(shape) == 0:
        raise ValueError(f"the operator is empty (shape {tuple(shape)}); sigma is undefined")


def compute_dtype(xp: Any, dtype: Any) -> Any:
    """The dtype lipnorm computes in for input ``dtype``.

    float32/float64/complex64/complex128 are kept; narrower floats (float16,
    bfloat16, complex32) are computed in float32/complex64, wider ones (long
    double) in float64/complex128; integers in the namespace's default real float.

    Raises
    ------
    TypeError
        For booleans and non-numeric dtypes.
    """
    try:
        is_bool = xp.isdtype(dtype, "bool")
        is_integral = xp.isdtype(dtype, "integral")
        is_complex = xp.isdtype(dtype, "complex floating")
        is_real = xp.isdtype(dtype, "real floating")
    except (TypeError, ValueError, KeyError, AttributeError):
        is_bool = is_integral = is_complex = is_real = False
    if is_bool or not (is_integral or is_complex or is_real):
        raise TypeError(
            f"sigma needs a numeric (integer, floating or complex) array, got dtype {dtype}"
        )
    if is_integral:
        return xp.__array_namespace_info__().default_dtypes()["real floating"]
    if any(dtype == kept for kept in (xp.float32, xp.float64, xp.complex64, xp.complex128)):
        return dtype
    wide = xp.finfo(dtype).bits > 64
    if is_complex:
        return xp.complex128 if wide else xp.complex64
    return xp.float64 if wide else xp.float32


def _checked_array(weight: Any) -> tuple[Any, tuple[int, ...], Any]:
    """The namespace, shape and compute dtype of an array sigma can be computed of.

    Raises
    ------
    TypeError
        Non-numeric or boolean dtype; not an array; a sparse torch tensor.
    ValueError
        A 0-d array.
    """
    xp = array_namespace(weight)
    if library_name(weight) == "torch" and str(weight.layout) != "torch.strided":
        raise TypeError(
            f"the torch tensor has layout {weight.layout}; sigma needs a dense (strided) "
            "tensor: pass weight.to_dense(), or a scipy.sparse matrix"
        )
    shape = tuple(int(s) for s in weight.shape)
    if not shape:
        raise ValueError("sigma of a 0-d array (a scalar) is not defined; pass a vector or matrix")
    return xp, shape, compute_dtype(xp, weight.dtype)


def _check_values_present(weight: Any, shape: tuple[int, ...]) -> None:
    """Raise for an empty array or a torch tensor on the meta device (no values)."""
    if math.prod(shape) == 0:
        raise ValueError(f"the array is empty (shape {shape}); sigma is undefined")
    if library_name(weight) == "torch" and weight.device.type == "meta":
        raise ValueError(
            f"the torch tensor of shape {shape} is on the meta device, which holds no values, "
            "and sigma needs them; materialize it first (e.g. module.to_empty(device='cpu') "
            "and initialize its parameters)"
        )


def matrix_view(weight: Any, dim: int | None = None) -> tuple[Any, Any]:
    """Validate an array and return its matrix view and namespace (see :func:`_validated_matrix`)."""
    return _validated_matrix(weight, dim)[:2]


def _validated_matrix(weight: Any, dim: int | None = None) -> tuple[Any, Any, float]:
    """Validate an array and return its matrix view, namespace and largest magnitude.

    Parameters
    ----------
    weight : array
        1-D (treated as an ``(n, 1)`` matrix, whose norm is the vector's 2-norm),
        2-D, or N-D with ``dim``.
    dim : int, optional
        Axis kept as rows; the other axes are flattened (torch's rule).

    Returns
    -------
    matrix : array, shape (m, n)
        In the input's namespace and device, cast to the compute dtype (see
        :func:`compute_dtype`).
    xp : namespace
    largest : float
        The largest magnitude of its entries.

    Raises
    ------
    TypeError
        Non-numeric or boolean dtype; not an array; a sparse torch tensor.
    ValueError
        0-d input, N-D input without ``dim``, ``dim`` out of range, an empty
        array, a torch tensor on the meta device (checked after its shape: it
        has no values), or NaN/Inf entries.
    """
    xp, shape, working_dtype = _checked_array(weight)
    ndim = len(shape)
    if dim is not None and not -ndim <= dim < ndim:
        raise ValueError(f"dim={dim} is out of range for a {ndim}-D array of shape {shape}")
    if ndim > 2 and dim is None:
        raise ValueError(
            f"got a {ndim}-D array of shape {shape}; say how to view it as a matrix: "
            "batched=True reads it as a stack of matrices over its leading axes (MoE experts, "
            "per-head weights), dim=0 keeps axis 0 as rows and flattens the rest (torch's "
            "spectral_norm rule), or pass lipnorm.conv_operator(...) for the operator norm of "
            "a convolution"
        )
    _check_values_present(weight, shape)
    matrix = weight if weight.dtype == working_dtype else xp.astype(weight, working_dtype)
    if ndim == 1:
        matrix = xp.reshape(matrix, (shape[0], 1))
    elif dim is not None:
        kept = dim % ndim
        if kept != 0:
            order = (kept,) + tuple(a for a in range(ndim) if a != kept)
            matrix = xp.permute_dims(matrix, order)
        if ndim > 2:
            matrix = xp.reshape(matrix, (shape[kept], math.prod(shape) // shape[kept]))
    largest = float(largest_magnitudes(xp, matrix))
    if not math.isfinite(largest):
        raise ValueError(
            f"the {library_name(weight)} array of shape {shape} has NaN or Inf entries; "
            "sigma is undefined"
        )
    return matrix, xp, largest


def largest_magnitudes(xp: Any, matrices: Any) -> np.ndarray:
    """The largest magnitude of the entries of each matrix (the last two axes), on the host.

    NaN where a matrix has a NaN, ``inf`` where it has an infinity: the array API's ``max``
    and ``min`` propagate NaN. Real matrices take their ``max`` and ``min`` (two reads, no
    copy), complex ones the ``max`` of ``abs``.

    Parameters
    ----------
    xp : namespace
    matrices : array, shape (..., m, n)

    Returns
    -------
    numpy.ndarray, float64, shape (...)
    """
    axes = (-2, -1)
    if xp.isdtype(matrices.dtype, "complex floating"):
        return np.asarray(to_numpy(xp.max(xp.abs(matrices), axis=axes)), dtype=np.float64)
    top = np.asarray(to_numpy(xp.max(matrices, axis=axes)), dtype=np.float64)
    bottom = np.asarray(to_numpy(xp.min(matrices, axis=axes)), dtype=np.float64)
    return np.maximum(top, -bottom)


def stack_operator(weight: Any) -> tuple[DenseStack, tuple[int, ...]]:
    """View an array of shape ``(..., m, n)`` as a stack of matrices.

    The last two axes are the matrix, the leading ones the batch, as in
    ``torch.linalg.matrix_norm`` and the array API's ``linalg`` functions.

    Parameters
    ----------
    weight : array, shape (..., m, n)
        At least 2-D (a 2-D array is a stack of one matrix with batch shape ``()``).

    Returns
    -------
    stack : DenseStack
        The ``prod(batch_shape)`` matrices in C order, in the input's namespace and device,
        cast to the compute dtype (:func:`compute_dtype`); :class:`DaskStack` for Dask.
    batch_shape : tuple of int
        ``weight.shape[:-2]``.

    Raises
    ------
    TypeError
        As :func:`matrix_view`; also for a linear operator (only arrays form stacks).
    ValueError
        Fewer than two axes, an empty array, a torch meta tensor, or NaN/Inf entries in a
        matrix, named by its index in the batch.

    Examples
    --------
    >>> import numpy as np
    >>> stack, batch_shape = stack_operator(np.zeros((8, 3, 64, 128)))
    >>> stack.count, stack.shape, batch_shape
    (24, (64, 128), (8, 3))
    """
    if isinstance(weight, LinearOperator) or _is_scipy_sparse(weight) or (
        not array_api_compat.is_array_api_obj(weight) and not is_tensorflow_array(weight)
        and _is_operator_like(weight)
    ):
        raise TypeError(
            f"batched=True reads an array of shape (..., m, n) as a stack of matrices; "
            f"got a {type(weight).__name__}, a linear operator: call estimate_sigma on it "
            "without batched=True"
        )
    xp, shape, working_dtype = _checked_array(weight)
    if len(shape) < 2:
        raise ValueError(
            f"batched=True needs an array of shape (..., m, n) (the last two axes are the "
            f"matrix), got shape {shape}"
        )
    _check_values_present(weight, shape)
    batch_shape = shape[:-2]
    matrices = weight if weight.dtype == working_dtype else xp.astype(weight, working_dtype)
    matrices = xp.reshape(matrices, (math.prod(batch_shape),) + shape[-2:])
    largest = largest_magnitudes(xp, matrices)
    if not np.all(np.isfinite(largest)):
        bad = np.flatnonzero(~np.isfinite(largest))
        where = ", ".join(str(int(i)) for i in np.unravel_index(int(bad[0]), batch_shape))
        more = f" (and {bad.size - 1} more)" if bad.size > 1 else ""
        raise ValueError(
            f"matrix [{where}] of the stack of shape {shape} has NaN or Inf entries{more}; "
            "sigma is undefined"
        )
    stack = (DaskStack if library_name(weight) == "dask" else DenseStack)(matrices, xp)
    stack.largest = largest
    return stack, batch_shape
