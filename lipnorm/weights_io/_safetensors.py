""".safetensors files: the header through ``safe_open``, each tensor read when asked for.

bfloat16 and float8 tensors, which NumPy has no type for, are read as float32 through
ml_dtypes where it is installed (the bytes the checked header points at, looked up in a table
of every bit pattern's value), else through safetensors' torch framework.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from lipnorm.weights_io._stored import StoredTensor, WeightFileError, first_line, widened

__all__ = ["LOW_PRECISION", "SAFETENSORS_DTYPES", "safetensors_entries"]

#: safetensors' dtype codes lipnorm reads, and the dtype names it shows for them.
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "C64": "complex64", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}

#: The floating dtypes NumPy has no type for (read through ml_dtypes or torch).
LOW_PRECISION = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")


def _safetensors() -> Any:
    try:
        import safetensors
    except ImportError:
        raise ImportError(
            "reading .safetensors needs the safetensors package: pip install 'lipnorm[cli]'"
        ) from None
    return safetensors


def safetensors_entries(path: Path) -> dict[str, StoredTensor]:
    """The tensors of one ``.safetensors`` file from its header, which ``safe_open`` checks."""
    try:
        safetensors = _safetensors()
    except ImportError as exc:
        raise WeightFileError(f"{path}: {exc}") from None
    try:
        with safetensors.safe_open(str(path), framework="numpy") as file:
            headers = {name: file.get_slice(name) for name in file.keys()}
            described = {
                name: (header.get_dtype(), tuple(int(n) for n in header.get_shape()))
                for name, header in headers.items()
            }
    except (safetensors.SafetensorError, OSError) as exc:
        raise WeightFileError(
            f"{path}: not a valid .safetensors file, or truncated ({first_line(exc)})"
        ) from None
    for name, (code, _) in described.items():
        if code not in SAFETENSORS_DTYPES:
            raise WeightFileError(
                f"{path}: tensor {name!r} has dtype {code}, which lipnorm cannot read "
                f"(it reads {', '.join(SAFETENSORS_DTYPES)})"
            )
    return {
        name: StoredTensor(
            name, shape, SAFETENSORS_DTYPES[code], path,
            reader=functools.partial(_read_safetensor, path, name, SAFETENSORS_DTYPES[code]),
        )
        for name, (code, shape) in described.items()
    }


def _read_safetensor(path: Path, name: str, dtype: str) -> Any:
    """One tensor of a ``.safetensors`` file, narrow floats widened to float32."""
    safetensors = _safetensors()
    try:
        if dtype in LOW_PRECISION:
            return _read_low_precision(path, name, dtype)
        with safetensors.safe_open(str(path), framework="numpy") as file:
            return widened(file.get_tensor(name))
    except (safetensors.SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise WeightFileError(
            f"{path}: tensor {name!r} could not be read ({first_line(exc)})"
        ) from None


def _read_low_precision(path: Path, name: str, dtype: str) -> Any:
    """A bfloat16 or float8 tensor as float32, through ml_dtypes where installed, else torch."""
    try:
        import ml_dtypes
    except ImportError:
        return _read_through_torch(path, name, dtype)
    table = _float32_table(getattr(ml_dtypes, dtype))
    codes = _read_raw(path, name, np.dtype(f"<u{table.size.bit_length() // 8}"))
    return table[codes.reshape(-1)].reshape(codes.shape)


@functools.cache
def _float32_table(stored: type) -> np.ndarray:
    """The float32 value of every bit pattern of a 1- or 2-byte float type (ml_dtypes').

    Looking a tensor's codes up in it is exact (every such value is a float32) and about 20
    times faster than ml_dtypes' element-wise cast.
    """
    itemsize = np.dtype(stored).itemsize
    codes = np.arange(2 ** (8 * itemsize), dtype=f"<u{itemsize}")
    return codes.view(stored).astype(np.float32)


def _read_raw(path: Path, name: str, dtype: np.dtype) -> np.ndarray:
    """A tensor's bytes as ``dtype`` (of the stored dtype's size), found through the file's header.

    The header is the one :func:`safetensors_entries` had ``safe_open`` check: offsets
    within the file and consistent with the shapes.
    """
    with path.open("rb") as file:
        length = int.from_bytes(file.read(8), "little")
        entry = json.loads(file.read(length))[name]
        shape = tuple(entry["shape"])
        start, end = entry["data_offsets"]
        count = math.prod(shape)
        if end - start != count * dtype.itemsize:
            raise ValueError(f"its data is {end - start} bytes, not {count * dtype.itemsize}")
        file.seek(8 + length + start)
        values = np.fromfile(file, dtype=dtype, count=count)
    if values.size != count:
        raise ValueError(f"the file ends {count - values.size} values into it")
    return values.reshape(shape)


def _read_through_torch(path: Path, name: str, dtype: str) -> Any:
    try:
        import torch  # noqa: F401  (safetensors' torch framework needs it)
    except ImportError:
        raise WeightFileError(
            f"{path}: tensor {name!r} is {dtype}, which NumPy cannot hold; reading it needs "
            "ml_dtypes or torch: pip install 'lipnorm[cli]'"
        ) from None
    with _safetensors().safe_open(str(path), framework="pt") as file:
        return file.get_tensor(name).float().numpy()
