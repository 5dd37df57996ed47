"""Closed-form bounds for the fixed layers every front end meets.

Framework-neutral: the front ends read a layer's parameters and call these. Pooling and
padding act on each spatial axis separately, so their matrices are Kronecker products of
small 1-D matrices and their norms the products of the 1-D norms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lipnorm.bounds import compose, round_up
from lipnorm.certify.linear import FixedMap, ScaleMap, dense_sigma_interval

__all__ = [
    "average_pool_map",
    "batch_norm_map",
    "max_pool_bound",
    "normalization_bound",
    "selection_map",
    "torch_pool_windows",
    "adaptive_pool_windows",
    "padding_map",
    "padding_sources",
    "same_padding",
]

_UNIT_ROUNDOFF = 2.0**-53


def batch_norm_map(gamma, var, eps: float, axis: int) -> ScaleMap:
    """Linear part of BatchNorm in inference mode: diag(γ / √(var + ε)) along ``axis``.

    Parameters
    ----------
    gamma, var : array_like, shape (channels,)
        Scale (None means 1) and running variance.
    eps : float
    axis : int
        Channel axis of the activation tensor (batch axis included).

    Returns
    -------
    ScaleMap
        With the rounding error of computing the scale in float64 (≤ 4 units of roundoff
        per entry) recorded in ``error``.
    """
    var = np.asarray(var, dtype=np.float64)
    gamma = np.ones_like(var) if gamma is None else np.asarray(gamma, dtype=np.float64)
    denominator = var + float(eps)
    if np.any(denominator <= 0) or not np.all(np.isfinite(denominator)):
        raise ValueError("BatchNorm has a non-positive or non-finite var + eps")
    scale = gamma / np.sqrt(denominator)
    error = round_up(5 * _UNIT_ROUNDOFF * float(np.max(np.abs(scale))))
    return ScaleMap(scale, axis, error)


def normalization_bound(gamma, eps: float) -> float:
    """Global bound of LayerNorm/GroupNorm: max|γ| / √ε (only used on explicit opt-in).

    With s = √(var(x) + ε), the Jacobian of (x − mean x)/s is (P − z zᵀ)/s where P is the
    centering projection and z = P x /(√n s) has ‖z‖ < 1, so its norm is ≤ 1/s ≤ 1/√ε.
    The bound is valid but huge (≈ 316·max|γ| at ε = 1e-5).

    Parameters
    ----------
    gamma : array_like or None
        Elementwise scale (None means 1).
    eps : float

    Returns
    -------
    float
    """
    g = 1.0 if gamma is None else float(np.max(np.abs(np.asarray(gamma, dtype=np.float64))))
    return round_up(round_up(g / math.sqrt(float(eps))) * (1 + 4 * _UNIT_ROUNDOFF))


def torch_pool_windows(length: int, kernel: int, stride: int, pad_before: int, pad_after: int,
                       ceil_mode: bool = False) -> list[tuple[int, int, int]]:
    """Windows of PyTorch/ONNX pooling along one axis: (start, end, size incl. padding).

    ``start``/``end`` are clipped to the input; ``size`` counts padded positions
    (the divisor when padding is included in the average).
    """
    span = length + pad_before + pad_after - kernel
    if span < 0:
        raise ValueError(f"pooling kernel {kernel} is larger than the padded input {length}")
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= length + pad_before:
        out -= 1
    windows = []
    for i in range(out):
        start = i * stride - pad_before
        end = min(start + kernel, length + pad_after)
        size = end - start
        windows.append((max(start, 0), min(end, length), size))
    return windows


def same_padding(length: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow/Keras ``padding="same"``: (before, after) zeros for one axis."""
    extent = (kernel - 1) * dilation + 1
    out = -(-length // stride)
    total = max((out - 1) * stride + extent - length, 0)
    return total // 2, total - total // 2


def adaptive_pool_windows(length: int, out: int) -> list[tuple[int, int, int]]:
    """Windows of adaptive pooling (PyTorch): start = ⌊iL/O⌋, end = ⌈(i+1)L/O⌉."""
    windows = []
    for i in range(out):
        start = (i * length) // out
        end = -(-((i + 1) * length) // out)
        windows.append((start, end, end - start))
    return windows


def average_pool_map(axes: Sequence[tuple[int, list[tuple[int, int, int]]]],
                     count_include_pad: bool, *, channels_last: bool = False) -> FixedMap:
    """Exact norm (certified) of average pooling given its windows on each spatial axis.

    Each axis contributes a matrix A with ``A[i, start:end] = 1/divisor``; the pooling
    is their Kronecker product on every channel, so its norm is the product of the σ(A).

    Parameters
    ----------
    axes : sequence of (length, windows)
        For each spatial axis: input length and the windows from
        :func:`torch_pool_windows` or :func:`adaptive_pool_windows`.
    count_include_pad : bool
        Divide by the window size including padding (else by the valid count).
    channels_last : bool
        The layout of the pooled tensor (for the map's matrix, ``FixedMap.spatial_factors``).

    Returns
    -------
    FixedMap
    """
    factors, matrices = [], []
    for length, windows in axes:
        matrix = np.zeros((len(windows), length))
        for row, (start, end, size) in enumerate(windows):
            divisor = size if count_include_pad else end - start
            if end > start:
                matrix[row, start:end] = 1.0 / divisor
        sigma = float(dense_sigma_interval(matrix).upper)
        factors.append(round_up(sigma + 2 * _UNIT_ROUNDOFF * float(np.linalg.norm(matrix))))
        matrices.append(matrix)
    return FixedMap(compose(factors), "average pooling, σ of the 1-D averaging matrices",
                    spatial_factors=tuple(matrices), channels_last=channels_last)


def max_pool_bound(axes: Sequence[tuple[int, list[tuple[int, int, int]]]]) -> float:
    """√m for max pooling with arbitrary windows, m the most windows sharing one input."""
    windows = 1
    for length, axis_windows in axes:
        counts = np.zeros(length, dtype=np.int64)
        for start, end, _ in axis_windows:
            counts[start:end] += 1
        windows *= int(counts.max()) if length else 1
    return 1.0 if windows <= 1 else round_up(math.sqrt(windows))


def selection_map(sources: Sequence[np.ndarray], length: Sequence[int], method: str) -> FixedMap:
    """Norm of a map whose every output copies one input (padding, nearest upsampling).

    Along each axis ``sources[d][j]`` is the input index copied to output ``j`` (or −1
    for a constant). The matrix has orthogonal columns with squared norms equal to the
    number of copies, so its norm is √(max copies), and the product over axes.
    """
    copies = 1
    for src, n in zip(sources, length):
        src = np.asarray(src)
        counts = np.bincount(src[src >= 0], minlength=n)
        copies *= int(counts.max()) if counts.size else 1
    return FixedMap(1.0 if copies <= 1 else round_up(math.sqrt(copies)), method)


def padding_map(shape: Sequence[int], pads: Sequence[tuple[int, int]], mode: str,
                method: str | None = None) -> FixedMap:
    """A padding (or cropping) layer as a fixed map that knows its padding.

    Parameters
    ----------
    shape : sequence of int
        The padded tensor's shape, batch axis included.
    pads : sequence of (int, int)
        ``(before, after)`` for every axis of ``shape`` (negative values crop).
    mode : {"constant", "reflect", "replicate", "circular"}
    method : str, optional
        The description shown in reports (default: "<mode> padding √copies").

    Returns
    -------
    FixedMap
        Its bound from :func:`selection_map`; ``padding`` and ``padding_mode`` set.
    """
    shape = tuple(1 if n is None else int(n) for n in shape)  # an unknown batch size counts as 1
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if len(pads) != len(shape):
        raise ValueError(f"padding needs (before, after) for each of the {len(shape)} axes, got {pads}")
    sources = [padding_sources(n, lo, hi, mode) for n, (lo, hi) in zip(shape, pads)]
    bound = selection_map(sources, list(shape), "").bound
    return FixedMap(bound, method or f"{mode} padding √copies", padding=pads, padding_mode=mode)


def padding_sources(length: int, before: int, after: int, mode: str) -> np.ndarray:
    """Input index copied to each output of a padded (or cropped, if negative) axis."""
    positions = np.arange(-before, length + after)
    if mode == "constant":
        return np.where((positions >= 0) & (positions < length), positions, -1)
    if mode == "reflect":
        period = 2 * (length - 1) if length > 1 else 1
        folded = np.mod(positions, period)
        return np.where(folded < length, folded, period - folded)
    if mode == "replicate":
        return np.clip(positions, 0, length - 1)
    if mode == "circular":
        return np.mod(positions, length)
    raise ValueError(f"unknown padding mode {mode!r}; expected constant, reflect, replicate or circular")
