"""Read weight tensors from files and checkpoints without running code from them.

Supported inputs, chosen by the path:

``.npy``
    One NumPy array, read with ``allow_pickle=False``; it is named after the file's stem.
``.npz``
    NumPy archive of named arrays, read with ``allow_pickle=False``.
``.pt``, ``.pth``
    A PyTorch checkpoint (a state dict, possibly nested in dicts and lists), read with
    ``torch.load(weights_only=True, map_location="cpu")``.
``.safetensors``
    Read as data with the ``safetensors`` package (``safe_open``), one tensor at a time.
``*.safetensors.index.json``, or a directory
    A sharded checkpoint: the index's ``weight_map`` says which shard holds each tensor (a
    directory is read through the one index in it, or else as all its ``.safetensors``
    files). The shards are one model; their tensors are read one at a time, so memory
    follows the largest tensor, not the checkpoint.

What a tensor reads as
    Floats narrower than float32 (float16, bfloat16, the float8 formats) are widened to
    float32, which is exact; :attr:`StoredTensor.dtype` keeps the stored dtype. bfloat16
    and float8 in ``.safetensors`` are read through ``ml_dtypes`` where it is installed,
    else through torch. A float8 or int8 weight stored with a scale tensor (``<name>_scale_inv``
    with one value per 128×128 block, as in DeepSeek-V3's checkpoints, or ``<name>_scale``
    per tensor or per row, as compressed-tensors writes) reads as the matrix the model uses,
    weight × scale in float32 (each entry rounded once, relative error ≤ 2⁻²⁴); the scale is
    then not a tensor of its own. Packed integer quantizations (GPTQ/AWQ ``qweight``,
    compressed-tensors ``weight_packed``) are listed with the reason lipnorm does not unpack
    them (:attr:`StoredTensor.unsupported`), and so are their zeros, scales and indices.

A file that would need code to load (a pickled object in a ``.npy``/``.npz``, a class or
function in a ``.pt`` pickle) is refused with a :class:`WeightFileError` that says why; so is
a truncated or corrupt file, a header that disagrees with the data, an index that names a
missing shard, and a dtype lipnorm cannot read, each in one line that names the file (and
the tensor).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lipnorm.weights_io._numpy import read_npy, read_npz
from lipnorm.weights_io._quantized import with_quantization
from lipnorm.weights_io._safetensors import safetensors_entries
from lipnorm.weights_io._sharded import open_directory, open_index
from lipnorm.weights_io._stored import (
    INDEX_SUFFIX,
    SUFFIXES,
    StoredTensor,
    WeightFileError,
    missing_key,
    widened,
)
from lipnorm.weights_io._torch import read_torch

__all__ = ["INDEX_SUFFIX", "SUFFIXES", "StoredTensor", "WeightFileError", "load_weights",
           "missing_key", "open_weights"]

def open_weights(path: str | Path) -> dict[str, StoredTensor]:
    """The tensors of a weight file, checkpoint index or checkpoint directory, unread.

    Parameters
    ----------
    path : str or Path
        A ``.npy``, ``.npz``, ``.pt``/``.pth`` or ``.safetensors`` file, a
        ``*.safetensors.index.json`` index of shards, or a directory of shards.

    Returns
    -------
    dict of str to StoredTensor
        Tensors by name, in file order (shard by shard). Scale tensors applied to a weight
        are not listed on their own. ``.safetensors`` tensors are read when asked for; the
        other formats are read here.

    Raises
    ------
    WeightFileError
        If the path is missing or unsupported, a file is truncated, corrupt or would need
        pickled code to load, an index names a missing shard or a tensor its shard lacks,
        or a scale's shape fits no known layout.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "w.npz")
    >>> np.savez(path, fc=np.eye(3, dtype=np.float16))
    >>> tensor = open_weights(path)["fc"]
    >>> tensor.shape, tensor.dtype, tensor.read().dtype
    ((3, 3), 'float16', dtype('float32'))
    """
    path = Path(path)
    if not path.exists():
        raise WeightFileError(f"{path}: no such file or directory")
    if path.is_dir():
        tensors = open_directory(path)
    elif path.name.endswith(INDEX_SUFFIX):
        tensors = open_index(path)
    elif not path.is_file():
        raise WeightFileError(f"{path}: not a file")
    else:
        tensors = _open_file(path)
    return with_quantization(tensors)


def load_weights(path: str | Path, *, key: str | None = None) -> dict[str, Any]:
    """Read the tensors of a weight file or checkpoint, never running code stored in it.

    Parameters
    ----------
    path : str or Path
        As for :func:`open_weights`.
    key : str, optional
        Name of the one tensor to read. For ``.pt`` files, tensors nested in dicts or lists
        are named by their path joined with dots (``"state_dict.fc.weight"``). For ``.npy``
        files the one array is named after the file's stem.

    Returns
    -------
    dict of str to array
        Tensors by name, in file order, as :meth:`StoredTensor.read` gives them: NumPy
        arrays, or ``torch.Tensor`` for ``.pt`` files. With ``key``, exactly one entry.

    Raises
    ------
    WeightFileError
        As for :func:`open_weights`; also if there is no tensor named ``key``.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "w.npz")
    >>> np.savez(path, fc=np.eye(3))
    >>> load_weights(path)["fc"].shape
    (3, 3)
    """
    tensors = open_weights(path)
    if key is None:
        return {name: tensor.read() for name, tensor in tensors.items()}
    if key not in tensors:
        raise missing_key(Path(path), key, list(tensors))
    return {key: tensors[key].read()}


def _open_file(path: Path) -> dict[str, StoredTensor]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return safetensors_entries(path)
    if suffix == ".npy":
        arrays = read_npy(path)
    elif suffix == ".npz":
        arrays = read_npz(path)
    elif suffix in (".pt", ".pth"):
        arrays = read_torch(path)
    else:
        raise WeightFileError(
            f"{path}: unsupported file type {suffix or '(no suffix)'!r}; lipnorm reads "
            f"{', '.join(SUFFIXES)}, a *{INDEX_SUFFIX} or a directory of .safetensors shards"
        )
    return {name: read_entry(path, name, array) for name, array in arrays.items()}


def read_entry(path: Path, name: str, array: Any) -> StoredTensor:
    """A tensor read already (``.npy``, ``.npz``, ``.pt``) as a :class:`StoredTensor`."""
    return StoredTensor(
        name, tuple(int(n) for n in array.shape), str(array.dtype).removeprefix("torch."), path,
        reader=lambda: widened(array),
    )
