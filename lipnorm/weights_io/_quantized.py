"""Quantized weights: scales applied to float8/int8 weights, packed integers named and left alone."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from lipnorm.weights_io._safetensors import LOW_PRECISION
from lipnorm.weights_io._stored import StoredTensor, WeightFileError

__all__ = ["with_quantization"]

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


def with_quantization(tensors: dict[str, StoredTensor]) -> dict[str, StoredTensor]:
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
