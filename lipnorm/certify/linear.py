"""Linear maps found in networks, their certified norms, and merging adjacent ones.

A front end describes each linear layer as one of four maps; consecutive maps with
nothing nonlinear between them are merged (a BatchNorm after a convolution becomes a
convolution with scaled output channels; two dense layers become their product) before
the norm is bounded, which is tighter than multiplying the two norms.

Each map carries ``error``: an upper bound on the spectral norm of the difference
between the map held in float64 and the exact map of the model, grown by the rounding of
every merge, so that ``certified_norm`` stays an upper bound of the exact map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from lipnorm.bounds import round_up
from lipnorm.certify.rounding import UNIT_ROUNDOFF, frobenius_upper

__all__ = [
    "ConvMap",
    "DenseMap",
    "FixedMap",
    "ScaleMap",
    "certified_norm",
    "conv_map_operator",
    "conv_sigma_interval",
    "dense_sigma_interval",
    "merge",
]



@dataclass(frozen=True)
class DenseMap:
    """x ↦ W x along one tensor axis.

    Attributes
    ----------
    weight : ndarray, shape (out, in), float64
    axis : int
        Axis of the activation tensor (batch axis included) the matrix acts on; every
        other axis is a batch of independent vectors, which leaves the norm unchanged.
    error : float
        Upper bound of ‖weight − exact‖₂.
    """

    weight: np.ndarray
    axis: int
    error: float = 0.0


@dataclass(frozen=True)
class ConvMap:
    """A (transposed) convolution, in PyTorch's kernel layout.

    Attributes
    ----------
    kernel : ndarray, float64
        ``(out, in/groups, *k)``, or ``(in, out/groups, *k)`` when ``transposed``.
    input_spatial : tuple of int
        Spatial shape of the input (without padding).
    stride, dilation : tuple of int
    padding : tuple of (int, int)
        Zeros added before and after each spatial axis (for a transposed convolution,
        PyTorch's ``padding`` that crops the output).
    groups : int
    transposed : bool
    output_padding : tuple of int
    channel_axis : int
        Channel axis of the activation tensor (1 for NCHW, last for NHWC).
    error : float
        Upper bound of the operator-norm error of ``kernel`` against the exact kernel.
    """

    kernel: np.ndarray
    input_spatial: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    groups: int
    channel_axis: int
    transposed: bool = False
    output_padding: tuple[int, ...] = field(default=())
    error: float = 0.0


@dataclass(frozen=True)
class ScaleMap:
    """x ↦ s ⊙ x: one factor per channel along ``axis``, or a scalar (``axis=None``)."""

    scale: np.ndarray
    axis: int | None
    error: float = 0.0


@dataclass(frozen=True)
class FixedMap:
    """A linear map whose norm is known in closed form (pooling, padding, reshape).

    Attributes
    ----------
    bound : float
        Upper bound of the map's norm.
    method : str
    flat_identity : bool
        The map leaves the row-major flattened tensor unchanged (flatten, view,
        reshape, squeeze): the tight methods see through it.
    spatial_factors : tuple of ndarray, optional
        For a map that acts on each spatial axis separately and on every channel alike
        (average pooling): its 1-D matrix per spatial axis, so the tight methods can hold
        it as a matrix. Any other fixed map is known to them by its bound alone.
    channels_last : bool
        Where the channel axis of ``spatial_factors``' tensor is.
    padding : tuple of (int, int), optional
        For a padding layer: the entries added ``(before, after)`` on every axis of the
        tensor (batch axis included), so the tight methods can hold it as a shift.
    padding_mode : str, optional
        ``"constant"`` (zeros), ``"reflect"``, ``"replicate"`` or ``"circular"``.
    """

    bound: float
    method: str
    flat_identity: bool = False
    spatial_factors: tuple[np.ndarray, ...] | None = field(default=None, compare=False)
    channels_last: bool = False
    padding: tuple[tuple[int, int], ...] | None = None
    padding_mode: str | None = None


LinearMap = DenseMap | ConvMap | ScaleMap | FixedMap


def dense_sigma_interval(weight: np.ndarray):
    """Certified interval for σ_max(weight).

    Parameters
    ----------
    weight : ndarray, shape (m, n)

    Returns
    -------
    SigmaInterval
        ``lipnorm.sigma_bounds(weight)``.
    """
    import lipnorm

    weight = np.asarray(weight, dtype=np.float64)
    if not np.all(np.isfinite(weight)):
        raise ValueError("weight has NaN or infinite entries; no bound exists")
    return lipnorm.sigma_bounds(weight)


def conv_sigma_interval(conv: ConvMap):
    """Certified interval for a convolution's operator norm.

    Parameters
    ----------
    conv : ConvMap

    Returns
    -------
    SigmaInterval
        From :meth:`lipnorm.conv.ConvOperator.sigma_bounds` (the exact norm of a circular
        convolution on a grid where the zero-padded one is a sub-block, certified).
    """
    return conv_map_operator(conv).sigma_bounds()


def conv_map_operator(conv: ConvMap):
    """The :class:`~lipnorm.conv.ConvOperator` of a convolution map (channels-first vectors).

    Parameters
    ----------
    conv : ConvMap

    Returns
    -------
    ConvOperator
    """
    from lipnorm.conv import conv_operator

    in_channels = conv.kernel.shape[0] if conv.transposed else conv.kernel.shape[1] * conv.groups
    return conv_operator(
        conv.kernel,
        (in_channels, *conv.input_spatial),
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        layout="torch",
        transposed=conv.transposed,
        output_padding=conv.output_padding or 0,
    )


def certified_norm(linear_map: LinearMap) -> tuple[float, str, float | None]:
    """Certified bounds of the operator norm of ``linear_map`` (exact map, rounding included).

    Parameters
    ----------
    linear_map : DenseMap, ConvMap, ScaleMap or FixedMap

    Returns
    -------
    (float, str, float or None)
        Upper bound, a short description of how it was obtained, and a certified lower
        bound of the same norm where one is available.
    """
    if isinstance(linear_map, FixedMap):
        return linear_map.bound, linear_map.method, None
    if isinstance(linear_map, ScaleMap):
        exact = float(np.max(np.abs(linear_map.scale)))
        upper, lower, method = exact, exact, "max |scale| (exact)"
    else:
        interval = (dense_sigma_interval(linear_map.weight) if isinstance(linear_map, DenseMap)
                    else conv_sigma_interval(linear_map))
        upper, lower, method = float(interval.upper), float(interval.lower), interval.method
    if linear_map.error:
        upper = round_up(upper + linear_map.error)
        lower = max(0.0, lower - 2 * linear_map.error)
    return upper, method, lower


def merge(first: LinearMap, second: LinearMap) -> LinearMap | None:
    """The single map equal to ``second ∘ first``, or None when they do not merge.

    Merged: scalar with anything but a FixedMap; per-channel scale with a dense or
    convolution map acting on the same axis (BatchNorm folding, on either side); dense
    with dense on the same axis; scale with scale.

    Parameters
    ----------
    first, second : LinearMap
        Applied in this order.

    Returns
    -------
    LinearMap or None
    """
    if isinstance(first, FixedMap) or isinstance(second, FixedMap):
        return None
    if isinstance(first, ScaleMap) and first.axis is None:
        return _scaled(second, first, output_side=False)
    if isinstance(second, ScaleMap) and second.axis is None:
        return _scaled(first, second, output_side=True)
    if isinstance(first, ScaleMap) and isinstance(second, ScaleMap):
        if first.axis != second.axis or first.scale.shape != second.scale.shape:
            return None
        return _scaled(first, second, output_side=True)
    if isinstance(second, ScaleMap):
        return _scaled(first, second, output_side=True)
    if isinstance(first, ScaleMap):
        return _scaled(second, first, output_side=False)
    if isinstance(first, DenseMap) and isinstance(second, DenseMap):
        return _dense_product(second, first)
    return None


def _scaled(target: LinearMap, scale: ScaleMap, *, output_side: bool) -> LinearMap | None:
    """``diag(s) ∘ target`` (output_side) or ``target ∘ diag(s)``; None if axes differ."""
    s = np.asarray(scale.scale, dtype=np.float64)
    s_norm = float(np.max(np.abs(s)))
    if isinstance(target, ScaleMap):
        if scale.axis is not None and target.axis is not None and scale.axis != target.axis:
            return None
        values = target.scale * s
        axis = target.axis if target.axis is not None else scale.axis
        error = _product_error(values, target.error, s_norm, scale.error, float(np.max(np.abs(target.scale))), 1)
        return ScaleMap(values, axis, error)
    if isinstance(target, DenseMap):
        if scale.axis is not None and scale.axis != target.axis:
            return None
        w = target.weight * (s[:, None] if output_side and s.ndim else s[None, :] if s.ndim else s)
        error = _product_error(w, target.error, s_norm, scale.error, frobenius_upper(target.weight), 1)
        return replace(target, weight=w, error=error)
    if isinstance(target, ConvMap):
        if scale.axis is not None and scale.axis != target.channel_axis:
            return None
        k = target.kernel * _kernel_channel_factor(target, s, output_side)
        taps = math.prod(target.kernel.shape[2:])
        error = _product_error(k, target.error, s_norm, scale.error, frobenius_upper(target.kernel), taps)
        return replace(target, kernel=k, error=error)
    return None


def _kernel_channel_factor(conv: ConvMap, s: np.ndarray, output_side: bool) -> np.ndarray:
    """Broadcastable factor that scales a kernel's output (or input) channels by ``s``."""
    trailing = (1,) * (conv.kernel.ndim - 2)
    if s.ndim == 0:
        return s
    a, b = conv.kernel.shape[:2]  # forward: (out, in/g); transposed: (in, out/g)
    g = conv.groups
    scales_rows = output_side != conv.transposed  # output channels are the rows of a forward kernel
    if scales_rows:
        return s.reshape((a, 1) + trailing)
    # s runs over g·b channels; channel c = group·b + j belongs to kernel rows of that group
    per_group = s.reshape(g, b)
    rows_per_group = a // g
    return np.repeat(per_group, rows_per_group, axis=0).reshape((a, b) + trailing)


def _dense_product(second: DenseMap, first: DenseMap) -> DenseMap | None:
    if first.axis != second.axis:
        return None
    a, b = second.weight, first.weight
    product = a @ b
    inner = b.shape[0]
    gamma = inner * UNIT_ROUNDOFF / (1 - inner * UNIT_ROUNDOFF)
    rounding = gamma * frobenius_upper(np.abs(a) @ np.abs(b))
    error = round_up(
        round_up(rounding * 1.01)
        + frobenius_upper(a) * first.error
        + second.error * frobenius_upper(b)
        + second.error * first.error
    )
    return DenseMap(product, first.axis, error)


def _product_error(
    result: np.ndarray, target_error: float, scale_norm: float, scale_error: float,
    target_norm: float, taps: int,
) -> float:
    """Error bound of an elementwise product result = target·s (each entry ≤ 8u relative)."""
    rounding = 8 * UNIT_ROUNDOFF * frobenius_upper(result) * math.sqrt(taps)
    return round_up(
        rounding + scale_norm * target_error + scale_error * target_norm * math.sqrt(taps)
        + scale_error * target_error
    )

