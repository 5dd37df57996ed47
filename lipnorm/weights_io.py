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

import functools
import json
import math
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["INDEX_SUFFIX", "SUFFIXES", "StoredTensor", "WeightFileError", "load_weights",
           "open_weights"]

SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors")

#: The name ending of a sharded checkpoint's index (``model.safetensors.index.json``).
INDEX_SUFFIX = ".safetensors.index.json"

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

#: Stored dtypes that a scale tensor turns into the model's matrix.
SCALED_DTYPES = (*LOW_PRECISION[1:], "int8")

#: Side of the square blocks of a ``<name>_scale_inv`` tensor (DeepSeek-V3's ``weight_block_size``).
SCALE_BLOCK = 128

#: Packed integer quantizations: the packed tensor's name ending, and its companions' endings.
PACKED = {
    "qweight": ("GPTQ/AWQ", ("qzeros", "scales", "g_idx")),
    "weight_packed": ("compressed-tensors", ("weight_scale", "weight_zero_point", "weight_shape",
                                              "weight_g_idx")),
}


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
        return self.dequantized is not None or _is_floating_name(self.dtype)

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
        tensors = _open_directory(path)
    elif path.name.endswith(INDEX_SUFFIX):
        tensors = _open_index(path)
    elif not path.is_file():
        raise WeightFileError(f"{path}: not a file")
    else:
        tensors = _open_file(path)
    return _with_quantization(tensors)


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


def missing_key(path: Path, key: str, names: list[str], limit: int = 10) -> WeightFileError:
    """The error for a ``key`` not in the file, listing (the first ``limit``) names it has."""
    if not names:
        return WeightFileError(f"{path}: no tensor named {key!r}; the file holds no tensors")
    shown = ", ".join(repr(name) for name in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return WeightFileError(f"{path}: no tensor named {key!r}; its tensors are {shown}{more}")


def _is_floating_name(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat", "complex"))


def _widened(array: Any) -> Any:
    """``array`` with floats narrower than float32 widened to float32 (exact), else itself."""
    dtype = array.dtype
    if isinstance(dtype, np.dtype):
        narrow = dtype.itemsize < 4 and _is_floating_name(dtype.name)
        return array.astype(np.float32) if narrow else array
    narrow = dtype.is_floating_point and array.element_size() < 4  # a torch tensor
    return array.float() if narrow else array


def _open_file(path: Path) -> dict[str, StoredTensor]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _safetensors_entries(path)
    if suffix == ".npy":
        arrays = _read_npy(path)
    elif suffix == ".npz":
        arrays = _read_npz(path)
    elif suffix in (".pt", ".pth"):
        arrays = _read_torch(path)
    else:
        raise WeightFileError(
            f"{path}: unsupported file type {suffix or '(no suffix)'!r}; lipnorm reads "
            f"{', '.join(SUFFIXES)}, a *{INDEX_SUFFIX} or a directory of .safetensors shards"
        )
    return {name: _read_entry(path, name, array) for name, array in arrays.items()}


def _read_entry(path: Path, name: str, array: Any) -> StoredTensor:
    """A tensor read already (``.npy``, ``.npz``, ``.pt``) as a :class:`StoredTensor`."""
    return StoredTensor(
        name, tuple(int(n) for n in array.shape), str(array.dtype).removeprefix("torch."), path,
        reader=lambda: _widened(array),
    )


def _open_directory(path: Path) -> dict[str, StoredTensor]:
    """A checkpoint directory: through its one index, else all its ``.safetensors`` shards."""
    indexes = sorted(path.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) > 1:
        names = ", ".join(index.name for index in indexes)
        raise WeightFileError(f"{path}: holds {len(indexes)} indexes ({names}); pass one of them")
    if indexes:
        return _open_index(indexes[0])
    shards = sorted(shard for shard in path.glob("*.safetensors") if shard.is_file())
    if not shards:
        raise WeightFileError(
            f"{path}: a directory without .safetensors files or a *{INDEX_SUFFIX}; lipnorm "
            f"reads a directory of shards, or one file ({', '.join(SUFFIXES)})"
        )
    tensors: dict[str, StoredTensor] = {}
    for shard in shards:
        for name, entry in _safetensors_entries(shard).items():
            if name in tensors:
                raise WeightFileError(
                    f"{shard}: tensor {name!r} is also in {tensors[name].file.name}; a directory "
                    f"of shards holds each tensor once (or pass its *{INDEX_SUFFIX})"
                )
            tensors[name] = entry
    return tensors


def _open_index(path: Path) -> dict[str, StoredTensor]:
    """A sharded checkpoint through its index: ``{"weight_map": {tensor: shard file}}``."""
    try:
        index = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:  # JSON and Unicode errors are ValueErrors
        raise WeightFileError(f"{path}: not a readable JSON index ({_first_line(exc)})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (isinstance(weight_map, dict) and weight_map
            and all(isinstance(shard, str) and shard for shard in weight_map.values())):
        raise WeightFileError(
            f"{path}: not a safetensors index (it needs a \"weight_map\" from tensor names to "
            "shard files)"
        )
    shards = {}
    for shard_name in dict.fromkeys(weight_map.values()):
        shard = path.parent / shard_name
        if not shard.is_file():
            raise WeightFileError(f"{path}: names shard {shard_name!r}, which is missing ({shard})")
        shards[shard_name] = _safetensors_entries(shard)
    tensors = {}
    for name, shard_name in weight_map.items():
        if name not in shards[shard_name]:
            raise WeightFileError(
                f"{path.parent / shard_name}: no tensor named {name!r}, which {path.name} "
                "places in this shard"
            )
        tensors[name] = shards[shard_name][name]
    return tensors


# --- quantized weights ---


def _with_quantization(tensors: dict[str, StoredTensor]) -> dict[str, StoredTensor]:
    """Mark packed quantizations unsupported, and dequantize scaled float8/int8 weights."""
    result = dict(tensors)
    for name, tensor in tensors.items():
        for ending, (library, companions) in PACKED.items():
            if name.endswith(ending) and not tensor.is_floating:
                prefix = name.removesuffix(ending)
                result[name] = replace(tensor, unsupported=(
                    f"packed {tensor.dtype} quantization ({library} {ending}), which lipnorm "
                    "does not unpack"
                ))
                for companion in companions:
                    if prefix + companion in result:
                        result[prefix + companion] = replace(
                            result[prefix + companion], unsupported=f"part of {name}'s packed quantization"
                        )
    for name, tensor in tensors.items():
        if tensor.dtype not in SCALED_DTYPES or result[name].unsupported:
            continue
        scale = tensors.get(f"{name}_scale_inv") or tensors.get(f"{name}_scale")
        if scale is not None and scale.name in result:
            result[name] = _dequantized(tensor, scale)
            del result[scale.name]
    return result


def _scale_layout(weight: StoredTensor, scale: StoredTensor) -> str:
    """How ``scale`` spreads over ``weight``: ``"tensor"``, ``"row"`` or ``"block"``."""
    if scale.size == 1:
        return "tensor"
    if len(weight.shape) == 2:
        rows, cols = weight.shape
        if scale.shape in ((rows,), (rows, 1)):
            return "row"
        if scale.shape == (-(-rows // SCALE_BLOCK), -(-cols // SCALE_BLOCK)):
            return "block"
    raise WeightFileError(
        f"{scale.file}: scale {scale.name!r} has shape {scale.shape}, which fits no layout lipnorm "
        f"reads for {weight.name!r} of shape {weight.shape}: one value, one per row, or one per "
        f"{SCALE_BLOCK}×{SCALE_BLOCK} block"
    )


def _dequantized(weight: StoredTensor, scale: StoredTensor) -> StoredTensor:
    """``weight`` reading as weight × scale in float32, the matrix the model uses."""
    layout = _scale_layout(weight, scale)

    def read() -> np.ndarray:
        values = _host_float32(weight.read())
        factors = _host_float32(scale.read())
        if layout == "tensor":
            values *= factors.reshape(())
        elif layout == "row":
            values *= factors.reshape(-1, 1)
        else:
            for index, start in enumerate(range(0, values.shape[0], SCALE_BLOCK)):
                block_factors = np.repeat(factors[index], SCALE_BLOCK)[: values.shape[1]]
                values[start:start + SCALE_BLOCK] *= block_factors
        return values

    described = {"tensor": "per tensor", "row": "per row",
                 "block": f"per {SCALE_BLOCK}×{SCALE_BLOCK} block"}[layout]
    return replace(weight, reader=read, dequantized=f"× {scale.name.rsplit('.', 1)[-1]} {described}")


def _host_float32(values: Any) -> np.ndarray:
    """A writable float32 NumPy copy of a NumPy array or torch tensor."""
    if not isinstance(values, np.ndarray):
        values = values.detach().cpu().float().numpy()  # a torch tensor from a .pt file
    return np.array(values, dtype=np.float32)


# --- NumPy files ---


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
        except Exception as exc:  # a corrupt header fails in many ways (tokenize, eval, sizes)
            raise _npy_error(path, exc) from None
    return {path.stem: array}


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        # Opened here, so that it is closed also when np.load fails on it.
        with path.open("rb") as file:
            archive = np.load(file, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise WeightFileError(f"{path}: not a .npz archive (it holds a single array)")
            with archive:
                return {name: archive[name] for name in archive.files}
    except WeightFileError:
        raise
    except Exception as exc:  # a corrupt archive or member fails in many ways, all one answer
        raise _npy_error(path, exc) from None


# --- PyTorch files ---


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
    except Exception as exc:  # a corrupt archive fails in many ways, all with one answer
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


# --- safetensors files ---


def _safetensors() -> Any:
    try:
        import safetensors
    except ImportError:
        raise ImportError(
            "reading .safetensors needs the safetensors package: pip install 'lipnorm[cli]'"
        ) from None
    return safetensors


def _safetensors_entries(path: Path) -> dict[str, StoredTensor]:
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
            f"{path}: not a valid .safetensors file, or truncated ({_first_line(exc)})"
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
            return _widened(_read_low_precision(path, name, dtype))
        with safetensors.safe_open(str(path), framework="numpy") as file:
            return _widened(file.get_tensor(name))
    except (safetensors.SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise WeightFileError(
            f"{path}: tensor {name!r} could not be read ({_first_line(exc)})"
        ) from None


def _read_low_precision(path: Path, name: str, dtype: str) -> Any:
    """A bfloat16 or float8 tensor, through ml_dtypes where installed, else torch."""
    try:
        import ml_dtypes
    except ImportError:
        return _read_through_torch(path, name, dtype)
    return _read_raw(path, name, np.dtype(getattr(ml_dtypes, dtype)))


def _read_raw(path: Path, name: str, dtype: np.dtype) -> np.ndarray:
    """A tensor's bytes as ``dtype``, found through the file's JSON header.

    The header is the one :func:`_safetensors_entries` had ``safe_open`` check: offsets
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
