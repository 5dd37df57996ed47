"""A minimal array-API namespace for TensorFlow tensors.

TensorFlow has no array-API namespace, so lipnorm's dispatch
(:func:`lipnorm._xp.array_namespace`) loads this module by name when it meets a
TensorFlow tensor. It implements exactly the functions the core uses (the list
is in :mod:`lipnorm._xp`), with TensorFlow's own public ops, so results stay
TensorFlow tensors on the input's device.
"""

from __future__ import annotations

import types
from typing import Any

import tensorflow as tf

__all__ = ["namespace"]

_KIND_DTYPES = {
    "bool": (tf.bool,),
    "signed integer": (tf.int8, tf.int16, tf.int32, tf.int64),
    "unsigned integer": (tf.uint8, tf.uint16, tf.uint32, tf.uint64),
    "real floating": (tf.float16, tf.bfloat16, tf.float32, tf.float64),
    "complex floating": (tf.complex64, tf.complex128),
}
_KIND_DTYPES["integral"] = _KIND_DTYPES["signed integer"] + _KIND_DTYPES["unsigned integer"]
_KIND_DTYPES["numeric"] = (
    _KIND_DTYPES["integral"] + _KIND_DTYPES["real floating"] + _KIND_DTYPES["complex floating"]
)


def asarray(obj: Any, dtype: Any = None, device: Any = None, copy: Any = None) -> tf.Tensor:
    """Convert ``obj`` to a tensor (optionally of ``dtype``, placed on ``device``)."""
    if device is not None:
        with tf.device(device):
            return asarray(obj, dtype=dtype)
    if isinstance(obj, (tf.Tensor, tf.Variable)):
        tensor = tf.convert_to_tensor(obj)
        return tensor if dtype is None or tensor.dtype == dtype else tf.cast(tensor, dtype)
    return tf.convert_to_tensor(obj, dtype=dtype)


def astype(x: tf.Tensor, dtype: Any, copy: bool = True) -> tf.Tensor:
    """Cast ``x`` to ``dtype``."""
    return tf.cast(x, dtype)


def reshape(x: tf.Tensor, shape: tuple[int, ...], copy: Any = None) -> tf.Tensor:
    """Reshape ``x``."""
    return tf.reshape(x, shape)


def permute_dims(x: tf.Tensor, axes: tuple[int, ...]) -> tf.Tensor:
    """Permute the axes of ``x``."""
    return tf.transpose(x, perm=axes)


def matmul(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """Matrix product with the array API's rules for 1-D operands."""
    if a.shape.rank == 1 and b.shape.rank == 1:
        return tf.reduce_sum(a * b)
    if b.shape.rank == 1:
        return tf.linalg.matvec(a, b)
    if a.shape.rank == 1:
        return tf.linalg.matvec(b, a, transpose_a=True)
    return tf.linalg.matmul(a, b)


def conj(x: tf.Tensor) -> tf.Tensor:
    """Complex conjugate (identity for real tensors)."""
    return tf.math.conj(x)


def abs(x: tf.Tensor) -> tf.Tensor:  # noqa: A001 - array-API name
    """Elementwise absolute value."""
    return tf.math.abs(x)


def _propagating_nan(reduced: tf.Tensor, x: tf.Tensor, axis: Any, keepdims: bool) -> tf.Tensor:
    """``reduced``, NaN wherever ``x`` has a NaN along ``axis`` (as the array API requires;
    TensorFlow's reductions do not promise it)."""
    if not x.dtype.is_floating:
        return reduced
    has_nan = tf.math.reduce_any(tf.math.is_nan(x), axis=axis, keepdims=keepdims)
    return tf.where(has_nan, tf.constant(float("nan"), dtype=reduced.dtype), reduced)


def max(x: tf.Tensor, axis: Any = None, keepdims: bool = False) -> tf.Tensor:  # noqa: A001
    """Maximum over ``axis`` (NaN propagates)."""
    return _propagating_nan(tf.math.reduce_max(x, axis=axis, keepdims=keepdims), x, axis, keepdims)


def min(x: tf.Tensor, axis: Any = None, keepdims: bool = False) -> tf.Tensor:  # noqa: A001
    """Minimum over ``axis`` (NaN propagates)."""
    return _propagating_nan(tf.math.reduce_min(x, axis=axis, keepdims=keepdims), x, axis, keepdims)


def sum(x: tf.Tensor, axis: Any = None, keepdims: bool = False) -> tf.Tensor:  # noqa: A001
    """Sum over ``axis``."""
    return tf.math.reduce_sum(x, axis=axis, keepdims=keepdims)


def sqrt(x: tf.Tensor) -> tf.Tensor:
    """Elementwise square root."""
    return tf.math.sqrt(x)


def isfinite(x: tf.Tensor) -> tf.Tensor:
    """Elementwise finiteness test (complex: both parts finite)."""
    if x.dtype.is_complex:
        return tf.math.logical_and(
            tf.math.is_finite(tf.math.real(x)), tf.math.is_finite(tf.math.imag(x))
        )
    if not x.dtype.is_floating:
        return tf.ones_like(x, dtype=tf.bool)
    return tf.math.is_finite(x)


def all(x: tf.Tensor, axis: Any = None, keepdims: bool = False) -> tf.Tensor:  # noqa: A001
    """Logical AND over ``axis``."""
    return tf.math.reduce_all(tf.cast(x, tf.bool), axis=axis, keepdims=keepdims)


def stack(arrays: Any, axis: int = 0) -> tf.Tensor:
    """Stack tensors along a new axis."""
    return tf.stack(list(arrays), axis=axis)


def concat(arrays: Any, axis: int = 0) -> tf.Tensor:
    """Join tensors along an existing axis."""
    return tf.concat(list(arrays), axis=axis)


def take(x: tf.Tensor, indices: tf.Tensor, axis: int = 0) -> tf.Tensor:
    """The entries of ``x`` at ``indices`` along ``axis``."""
    return tf.gather(x, indices, axis=axis)


def where(condition: tf.Tensor, x1: tf.Tensor, x2: tf.Tensor) -> tf.Tensor:
    """``x1`` where ``condition`` holds, else ``x2`` (broadcast)."""
    return tf.where(condition, x1, x2)


def zeros(shape: tuple[int, ...], dtype: Any = None, device: Any = None) -> tf.Tensor:
    """A tensor of zeros (float32 unless ``dtype``), placed on ``device``."""
    if device is not None:
        with tf.device(device):
            return tf.zeros(shape, dtype=dtype or tf.float32)
    return tf.zeros(shape, dtype=dtype or tf.float32)


def isdtype(dtype: Any, kind: Any) -> bool:
    """The array API's dtype-kind test, for TensorFlow dtypes."""
    if isinstance(kind, tuple):
        return any(isdtype(dtype, k) for k in kind)
    if isinstance(kind, str):
        return tf.as_dtype(dtype) in _KIND_DTYPES[kind]
    return tf.as_dtype(dtype) == tf.as_dtype(kind)


def finfo(dtype: Any) -> types.SimpleNamespace:
    """Machine limits of a floating dtype: ``bits`` and ``max`` (the fields the core uses)."""
    dtype = tf.as_dtype(dtype)
    if dtype.is_complex:
        dtype = dtype.real_dtype
    return types.SimpleNamespace(bits=8 * dtype.size, max=float(dtype.max))


def _vector_norm(x: tf.Tensor, axis: Any = None, keepdims: bool = False, ord: Any = 2) -> tf.Tensor:
    """Euclidean norm (the only order the core uses)."""
    if ord != 2:
        raise NotImplementedError("lipnorm's TensorFlow shim implements only the 2-norm")
    squared = tf.math.real(x * tf.math.conj(x)) if x.dtype.is_complex else x * x
    return tf.math.sqrt(tf.math.reduce_sum(squared, axis=axis, keepdims=keepdims))


def _default_dtypes(device: Any = None) -> dict[str, Any]:
    return {
        "real floating": tf.float32,
        "complex floating": tf.complex64,
        "integral": tf.int32,
        "indexing": tf.int64,
    }


namespace = types.SimpleNamespace(
    __name__="lipnorm.backends.tensorflow",
    asarray=asarray,
    astype=astype,
    reshape=reshape,
    permute_dims=permute_dims,
    matmul=matmul,
    conj=conj,
    abs=abs,
    max=max,
    min=min,
    sum=sum,
    sqrt=sqrt,
    isfinite=isfinite,
    all=all,
    stack=stack,
    concat=concat,
    take=take,
    where=where,
    zeros=zeros,
    isdtype=isdtype,
    finfo=finfo,
    linalg=types.SimpleNamespace(vector_norm=_vector_norm),
    __array_namespace_info__=lambda: types.SimpleNamespace(default_dtypes=_default_dtypes),
    float16=tf.float16,
    bfloat16=tf.bfloat16,
    float32=tf.float32,
    float64=tf.float64,
    complex64=tf.complex64,
    complex128=tf.complex128,
)
"""The namespace object :func:`lipnorm._xp.array_namespace` returns for TF tensors."""
