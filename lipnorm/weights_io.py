"""Read weight tensors from files without running code from them.

Supported formats, chosen by the file's suffix:

``.npy``
    One NumPy array, read with ``allow_pickle=False``; it is named after the file's stem.
``.npz``
    NumPy archive of named arrays, read with ``allow_pickle=False``.
``.pt``, ``.pth``
    A PyTorch checkpoint (a state dict, possibly nested in dicts and lists), read with
    ``torch.load(weights_only=True, map_location="cpu")``. Tensors keep their torch dtype.
``.safetensors``
    Read as data with the ``safetensors`` package (NumPy arrays); bfloat16 tensors, which
    NumPy cannot hold, are read through torch and widened to float32, which is exact.

A file that would need code to load (a pickled object in a ``.npy``/``.npz``, a class or
function in a ``.pt`` pickle) is refused with a :class:`WeightFileError` that says why.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SUFFIXES", "WeightFileError", "load_weights"]

SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors")

class WeightFileError(ValueError):
    """A weight file that cannot be read: missing, corrupt, unsafe, or without the key asked for.

    The message is one line that names the file and, where there is one, the fix.
    """


def load_weights(path: str | Path, *, key: str | None = None) -> dict[str, Any]:
    """Read the tensors of a weight file, never running code stored in it.

    Parameters
    ----------
    path : str or Path
        A ``.npy``, ``.npz``, ``.pt``/``.pth`` or ``.safetensors`` file.
    key : str, optional
        Name of the one tensor to read. For ``.pt`` files, tensors nested in dicts or lists
        are named by their path joined with dots (``"state_dict.fc.weight"``). For ``.npy``
        files the one array is named after the file's stem.

    Returns
    -------
    dict of str to array
        Tensors by name, in file order: NumPy arrays, or ``torch.Tensor`` for ``.pt``
        files. With ``key``, exactly one entry.

    Raises
    ------
    WeightFileError
        If the file is missing, has an unsupported suffix, is truncated or corrupt, would
        need pickled code to load, or has no tensor named ``key``.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "w.npz")
    >>> np.savez(path, fc=np.eye(3))
    >>> load_weights(path)["fc"].shape
    (3, 3)
    """
    path = Path(path)
    if not path.exists():
        raise WeightFileError(f"{path}: no such file")
    if not path.is_file():
        raise WeightFileError(f"{path}: not a file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        tensors = _read_npy(path)
    elif suffix == ".npz":
        tensors = _read_npz(path, key)
    elif suffix in (".pt", ".pth"):
        tensors = _read_torch(path)
    elif suffix == ".safetensors":
        tensors = _read_safetensors(path, key)
    else:
        raise WeightFileError(
            f"{path}: unsupported file type {suffix or '(no suffix)'!r}; "
            f"lipnorm reads {', '.join(SUFFIXES)}"
        )
    if key is None:
        return tensors
    if key not in tensors:
        raise _missing_key(path, key, list(tensors))
    return {key: tensors[key]}


def _missing_key(path: Path, key: str, names: list[str], limit: int = 10) -> WeightFileError:
    """The error for a ``key`` not in the file, listing (the first ``limit``) names it has."""
    if not names:
        return WeightFileError(f"{path}: no tensor named {key!r}; the file holds no tensors")
    shown = ", ".join(repr(name) for name in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return WeightFileError(f"{path}: no tensor named {key!r}; its tensors are {shown}{more}")


def _npy_error(path: Path, exc: Exception) -> WeightFileError:
    if "allow_pickle" in str(exc):
        return WeightFileError(
            f"{path}: refused: it stores Python objects, and unpickling them could run code "
            "from the file; save the weights as numeric arrays"
        )
    return WeightFileError(f"{path}: not a readable NumPy file ({_first_line(exc)})")


def _read_npy(path: Path) -> dict[str, np.ndarray]:
    with path.open("rb") as file:
        if file.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
            raise WeightFileError(f"{path}: not a .npy file (it lacks the .npy magic bytes)")
        file.seek(0)
        try:
            array = np.lib.format.read_array(file, allow_pickle=False)
        except (ValueError, EOFError, OSError) as exc:
            raise _npy_error(path, exc) from None
    return {path.stem: array}


def _read_npz(path: Path, key: str | None) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise WeightFileError(f"{path}: not a .npz archive (it holds a single array)")
            if key is not None and key not in archive.files:
                raise _missing_key(path, key, archive.files)
            names = archive.files if key is None else [key]
            return {name: archive[name] for name in names}
    except WeightFileError:
        raise
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise _npy_error(path, exc) from None


def _read_torch(path: Path) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise WeightFileError(
            f"{path}: reading .pt files needs PyTorch: pip install 'lipnorm[torch]'"
        ) from None

    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise _unpickling_error(path, exc) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as exc:
        raise WeightFileError(
            f"{path}: not a readable PyTorch file ({_first_line(exc)})"
        ) from None
    tensors: dict[str, Any] = {}
    _collect_tensors(obj, prefix="", out=tensors, tensor_type=torch.Tensor)
    return tensors


def _unpickling_error(path: Path, exc: pickle.UnpicklingError) -> WeightFileError:
    """Tell a checkpoint that needs code to load (refused) from a corrupt one."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        reason = f"it references {found.group(1)}"
    else:
        detail = text.partition("WeightsUnpickler error:")[2].strip() or text
        reason = _first_line(ValueError(detail))
        if re.search(r"unsupported operand|invalid load key|ran out of input", reason, re.IGNORECASE):
            return WeightFileError(f"{path}: not a readable PyTorch file ({reason})")
    return WeightFileError(
        f"{path}: refused: loading it would run code from the file ({reason}); lipnorm "
        "reads only tensors in plain dicts and lists (torch.load(weights_only=True)); "
        "save model.state_dict() instead of the model"
    )


def _collect_tensors(obj: Any, prefix: str, out: dict[str, Any], tensor_type: type) -> None:
    """Gather the tensors of a nested dict/list checkpoint, named by dotted paths."""
    if isinstance(obj, tensor_type):
        out[prefix or "tensor"] = obj
    elif isinstance(obj, dict):
        for name, value in obj.items():
            _collect_tensors(value, f"{prefix}.{name}" if prefix else str(name), out, tensor_type)
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            _collect_tensors(value, f"{prefix}.{index}" if prefix else str(index), out, tensor_type)


def _read_safetensors(path: Path, key: str | None) -> dict[str, np.ndarray]:
    try:
        import safetensors
    except ImportError:
        raise WeightFileError(
            f"{path}: reading .safetensors needs the safetensors package: "
            "pip install 'lipnorm[cli]'"
        ) from None
    try:
        with safetensors.safe_open(str(path), framework="numpy") as file:
            names = list(file.keys())
            if key is not None and key not in names:
                raise _missing_key(path, key, names)
            return {
                name: _safetensors_tensor(path, file, name)
                for name in (names if key is None else [key])
            }
    except safetensors.SafetensorError as exc:
        raise WeightFileError(
            f"{path}: not a valid .safetensors file, or truncated ({_first_line(exc)})"
        ) from None


def _safetensors_tensor(path: Path, file: Any, name: str) -> np.ndarray:
    """One tensor as NumPy; bfloat16 is widened to float32, which is exact.

    NumPy reads bfloat16 only where ``ml_dtypes`` is installed (JAX and TensorFlow bring
    it); without it the tensor is read through torch.
    """
    try:
        array = file.get_tensor(name)
    except TypeError:
        return _bfloat16_through_torch(path, name)
    return array.astype(np.float32) if array.dtype.name == "bfloat16" else array


def _bfloat16_through_torch(path: Path, name: str) -> np.ndarray:
    try:
        import safetensors
        import torch  # noqa: F401  (safetensors' torch framework needs it)
    except ImportError:
        raise WeightFileError(
            f"{path}: tensor {name!r} is bfloat16, which NumPy cannot hold; reading it needs "
            "torch: pip install 'lipnorm[torch]'"
        ) from None
    with safetensors.safe_open(str(path), framework="pt") as torch_file:
        return torch_file.get_tensor(name).float().numpy()


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
