"""What a weight file holds: :class:`StoredTensor`, and the error for a file that cannot be read."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["INDEX_SUFFIX", "SUFFIXES", "StoredTensor", "WeightFileError", "first_line",
           "is_floating_name", "missing_key", "widened"]

#: The suffixes of the files lipnorm reads.
SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors")

#: The name ending of a sharded checkpoint's index (``model.safetensors.index.json``).
INDEX_SUFFIX = ".safetensors.index.json"


class WeightFileError(ValueError):
    """A weight file that cannot be read: missing, corrupt, unsafe, or without the key asked for.

    The message is one line that names the file (and the tensor) and, where there is one,
    the fix.
    """


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a weight file or checkpoint, described by its header, read on demand.

    Attributes
    ----------
    name : str
        The tensor's name in the checkpoint.
    shape : tuple of int
        Its shape.
    dtype : str
        The dtype it is stored in (``"bfloat16"``, ``"float8_e4m3fn"``, ``"int32"``...).
    file : Path
        The file (shard) that holds it.
    dequantized : str or None
        How its scale was applied (``"× weight_scale_inv per 128×128 block"``), or None.
    unsupported : str or None
        Why lipnorm does not give its matrix (a packed integer quantization), or None.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path
    reader: Callable[[], Any] = field(repr=False, compare=False)
    dequantized: str | None = None
    unsupported: str | None = None

    @property
    def is_floating(self) -> bool:
        """Whether it reads as floating point (a dequantized integer weight does)."""
        return self.dequantized is not None or is_floating_name(self.dtype)

    @property
    def size(self) -> int:
        """Number of entries."""
        return math.prod(self.shape)

    def read(self) -> Any:
        """The tensor's values: a NumPy array (a ``torch.Tensor`` from ``.pt`` files).

        Floats narrower than float32 are widened to float32 (exact); a scaled weight is
        dequantized (see the module's description).

        Raises
        ------
        WeightFileError
            If the data cannot be read (a truncated file, an unreadable dtype).
        """
        return self.reader()


def missing_key(path: Path, key: str, names: list[str], limit: int = 10) -> WeightFileError:
    """The error for a ``key`` not in the file, listing (the first ``limit``) names it has."""
    if not names:
        return WeightFileError(f"{path}: no tensor named {key!r}; the file holds no tensors")
    shown = ", ".join(repr(name) for name in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return WeightFileError(f"{path}: no tensor named {key!r}; its tensors are {shown}{more}")


def is_floating_name(dtype: str) -> bool:
    """Whether a dtype name (NumPy, ml_dtypes or torch spelling) is a real or complex float."""
    return dtype.startswith(("float", "bfloat", "complex"))


def widened(array: Any) -> Any:
    """``array`` with floats narrower than float32 widened to float32 (exact), else itself."""
    dtype = array.dtype
    if isinstance(dtype, np.dtype):
        narrow = dtype.itemsize < 4 and is_floating_name(dtype.name)
        return array.astype(np.float32) if narrow else array
    narrow = dtype.is_floating_point and array.element_size() < 4  # a torch tensor
    return array.float() if narrow else array


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
