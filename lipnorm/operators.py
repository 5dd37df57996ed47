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
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat
import numpy as np

from lipnorm._xp import array_namespace, device_of, is_tensorflow_array, library_name, to_numpy

__all__ = [
    "DaskOperator",
    "DenseOperator",
    "ForeignOperator",
    "LinearOperator",
    "as_operator",
    "dense_from_products",
    "matrix_view",
]


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

    def matvec(self, x: Any) -> Any:
        """Return ``A @ x`` for a 1-D ``x`` of length ``n``."""
        raise NotImplementedError

    def rmatvec(self, y: Any) -> Any:
        """Return ``A^H @ y`` for a 1-D ``y`` of length ``m``."""
        raise NotImplementedError

    def to_dense(self) -> Any:
        """Return the ``(m, n)`` matrix of the operator, in namespace ``xp``."""
        raise NotImplementedError(f"{type(self).__name__} has no dense form")


class DenseOperator(LinearOperator):
    """A matrix as a linear operator, in its own library, dtype and device.

    Parameters
    ----------
    matrix : array, shape (m, n)
        A finite 2-D array of a floating or complex dtype (see :func:`matrix_view`).
    xp : namespace
        The namespace of ``matrix``.
    """

    def __init__(self, matrix: Any, xp: Any) -> None:
        self.matrix = matrix
        self.xp = xp
        self.shape = (int(matrix.shape[0]), int(matrix.shape[1]))
        self.dtype = matrix.dtype
        self.device = device_of(matrix)
        self._complex = xp.isdtype(matrix.dtype, "complex floating")

    def matvec(self, x: Any) -> Any:
        return self.xp.matmul(self.matrix, x)

    def rmatvec(self, y: Any) -> Any:
        # y^H A, conjugated back: never forms a transposed or conjugated copy of A.
        if self._complex:
            return self.xp.conj(self.xp.matmul(self.xp.conj(y), self.matrix))
        return self.xp.matmul(y, self.matrix)

    def to_dense(self) -> Any:
        return self.matrix


class DaskOperator(DenseOperator):
    """A chunked ``dask.array`` matrix: products run block by block on Dask's scheduler.

    Vectors are NumPy arrays (they fit in memory even when the matrix does not);
    each :meth:`matvec` / :meth:`rmatvec` builds a blockwise Dask graph and
    computes it.
    """

    def __init__(self, matrix: Any, xp: Any) -> None:
        super().__init__(matrix, xp)
        self.xp = array_api_compat.array_namespace(np.empty(0))
        self.dtype = np.dtype(str(matrix.dtype))
        self.device = "cpu"
        self._complex = np.issubdtype(self.dtype, np.complexfloating)

    def matvec(self, x: Any) -> Any:
        return np.asarray((self.matrix @ x).compute())

    def rmatvec(self, y: Any) -> Any:
        if self._complex:
            return np.conj(np.asarray((np.conj(y) @ self.matrix).compute()))
        return np.asarray((y @ self.matrix).compute())

    def to_dense(self) -> Any:
        return np.asarray(self.matrix.compute())


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
    matrix, xp = matrix_view(weight, dim=dim)
    if library_name(matrix) == "dask":
        return DaskOperator(matrix, xp)
    return DenseOperator(matrix, xp)


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


def matrix_view(weight: Any, dim: int | None = None) -> tuple[Any, Any]:
    """Validate an array and return its matrix view and namespace.

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

    Raises
    ------
    TypeError
        Non-numeric or boolean dtype; not an array; a sparse torch tensor.
    ValueError
        0-d input, N-D input without ``dim``, ``dim`` out of range, an empty
        array, a torch tensor on the meta device (checked after its shape: it
        has no values), or NaN/Inf entries.
    """
    xp = array_namespace(weight)
    if library_name(weight) == "torch" and str(weight.layout) != "torch.strided":
        raise TypeError(
            f"the torch tensor has layout {weight.layout}; sigma needs a dense (strided) "
            "tensor: pass weight.to_dense(), or a scipy.sparse matrix"
        )
    shape = tuple(int(s) for s in weight.shape)
    ndim = len(shape)
    if ndim == 0:
        raise ValueError("sigma of a 0-d array (a scalar) is not defined; pass a vector or matrix")
    working_dtype = compute_dtype(xp, weight.dtype)
    if dim is not None and not -ndim <= dim < ndim:
        raise ValueError(f"dim={dim} is out of range for a {ndim}-D array of shape {shape}")
    if ndim > 2 and dim is None:
        raise ValueError(
            f"got a {ndim}-D array of shape {shape}; say how to view it as a matrix: "
            "dim=0 keeps axis 0 as rows and flattens the rest (torch's spectral_norm rule), "
            "or pass lipnorm.conv_operator(...) for the operator norm of a convolution"
        )
    if math.prod(shape) == 0:
        raise ValueError(f"the array is empty (shape {shape}); sigma is undefined")
    if library_name(weight) == "torch" and weight.device.type == "meta":
        raise ValueError(
            f"the torch tensor of shape {shape} is on the meta device, which holds no values, "
            "and sigma needs them; materialize it first (e.g. module.to_empty(device='cpu') "
            "and initialize its parameters)"
        )
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
    if not bool(xp.all(xp.isfinite(matrix))):
        raise ValueError(
            f"the {library_name(weight)} array of shape {shape} has NaN or Inf entries; "
            "sigma is undefined"
        )
    return matrix, xp
