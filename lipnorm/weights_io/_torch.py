"""PyTorch checkpoints, read with ``torch.load(weights_only=True)``: tensors in dicts and lists."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

from lipnorm.weights_io._stored import WeightFileError, first_line

__all__ = ["read_torch"]


def read_torch(path: Path) -> dict[str, Any]:
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
            f"{path}: not a readable PyTorch file ({first_line(exc)})"
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
        reason = first_line(ValueError(detail))
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
