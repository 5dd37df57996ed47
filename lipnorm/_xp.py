"""Array-namespace dispatch: which library an input array belongs to.

Every public function of lipnorm takes its namespace from the arrays it receives
(never from global state). NumPy, CuPy, PyTorch, JAX, Dask and any array-API
library (``array_api_strict``) go through ``array_api_compat``; TensorFlow, which
has no array-API namespace, goes through the small shim in
:mod:`lipnorm.backends.tensorflow`, loaded by name only when a TensorFlow tensor is
met. Nothing here imports a framework to ask what an array is.

The core calls only these namespace functions (the TensorFlow shim implements
exactly this list): ``asarray``, ``astype``, ``reshape``, ``permute_dims``,
``matmul`` (batched over leading axes too), ``conj``, ``abs``, ``max`` and ``min``
(NaN propagates: they find NaN/Inf entries), ``sum``,
``sqrt``, ``isfinite``, ``all``, ``stack``, ``concat``, ``take``, ``where``, ``zeros``, ``isdtype``,
``finfo`` (its ``bits`` and ``max``), ``linalg.vector_norm`` (also along an axis)
and the dtype objects ``float32``, ``float64``, ``complex64``, ``complex128``;
``linalg.svdvals`` where the library has it (else NumPy's SVD on the host).
"""

from __future__ import annotations

import importlib
from typing import Any

import array_api_compat
import numpy as np

__all__ = [
    "array_namespace",
    "device_of",
    "is_tensorflow_array",
    "library_name",
    "to_numpy",
]


def _type_module(x: Any) -> str:
    return type(x).__module__ or ""


def is_tensorflow_array(x: Any) -> bool:
    """Return whether ``x`` is a TensorFlow tensor or variable, without importing TF."""
    module = _type_module(x)
    return module.startswith("tensorflow.") or module == "tensorflow"


def library_name(x: Any) -> str:
    """Name of the library an array belongs to: ``"numpy"``, ``"torch"``, ``"tensorflow"``...

    Parameters
    ----------
    x : array
        Any array or tensor.

    Returns
    -------
    str
        The top-level package of the array's type (``"jaxlib"`` is reported as ``"jax"``).
    """
    top = _type_module(x).split(".")[0]
    return {"jaxlib": "jax", "builtins": type(x).__name__}.get(top, top)


def array_namespace(*arrays: Any) -> Any:
    """Return the array-API namespace shared by ``arrays``.

    Parameters
    ----------
    *arrays : array
        Arrays of one library: NumPy, CuPy, PyTorch, JAX, Dask, TensorFlow or any
        library that implements the array API standard.

    Returns
    -------
    namespace
        The array-API-compatible namespace (``array_api_compat``'s wrapper, or
        lipnorm's TensorFlow shim).

    Raises
    ------
    TypeError
        If the arrays come from different libraries, or an input is not an array
        (or is a NumPy masked array).

    Examples
    --------
    >>> import numpy as np
    >>> array_namespace(np.ones(3)).__name__
    'array_api_compat.numpy'
    """
    if not arrays:
        raise TypeError("array_namespace needs at least one array")
    tensorflow_flags = [is_tensorflow_array(a) for a in arrays]
    if any(tensorflow_flags):
        if not all(tensorflow_flags):
            raise TypeError(_mixed_message(arrays))
        module = importlib.import_module("lipnorm.backends.tensorflow")
        return module.namespace
    for a in arrays:
        if isinstance(a, np.ma.MaskedArray):
            raise TypeError(
                "NumPy masked arrays are not supported (their masked entries would count); "
                "pass weight.filled(0)"
            )
        if not array_api_compat.is_array_api_obj(a):
            raise TypeError(
                f"expected an array (NumPy, CuPy, PyTorch, TensorFlow, JAX, Dask or any "
                f"array-API library) or a linear operator, got {type(a).__name__}; "
                "wrap Python lists with numpy.asarray"
            )
    try:
        return array_api_compat.array_namespace(*arrays)
    except TypeError as error:
        raise TypeError(_mixed_message(arrays)) from error


def device_of(x: Any) -> Any:
    """The device an array of any supported library lives on (TensorFlow's device string)."""
    if is_tensorflow_array(x):
        return x.device
    return array_api_compat.device(x)


def _mixed_message(arrays: tuple[Any, ...]) -> str:
    names = sorted({library_name(a) for a in arrays})
    return (
        f"arrays from different libraries in one call ({', '.join(names)}); "
        "convert them to one library first"
    )


def to_numpy(x: Any) -> np.ndarray:
    """Copy an array of any supported library to a NumPy array on the host.

    Used only where lipnorm certifies a bound (the certificate is computed in
    float64 on the host, see :mod:`lipnorm.certificates`). Low-precision floats
    (float16, bfloat16) become float32; autograd history is dropped.

    Parameters
    ----------
    x : array
        Any supported array.

    Returns
    -------
    numpy.ndarray
    """
    library = library_name(x)
    if library == "torch":
        x = x.detach()
        if x.dtype.is_floating_point and x.element_size() < 4:
            x = x.float()
        return x.cpu().resolve_conj().numpy()
    if library == "tensorflow":
        if x.dtype.size < 4 and x.dtype.is_floating:
            return np.asarray(x.numpy(), dtype=np.float32)
        return x.numpy()
    if library == "cupy":
        return x.get()
    if library == "dask":
        return np.asarray(x.compute())
    if library == "numpy":
        return x
    try:
        result = np.asarray(x)
    except (TypeError, ValueError, RuntimeError):
        result = np.from_dlpack(x)
    if result.dtype.kind == "V" or result.dtype.itemsize < 4 and result.dtype.kind == "f":
        result = result.astype(np.float32)
    return result
