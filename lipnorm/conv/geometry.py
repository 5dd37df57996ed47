"""Validated geometry of a convolution: sizes, stride, dilation, padding, groups.

Everything here is plain Python integers; no array is touched. The kernel's layout
(torch/keras, transposed, depthwise) is reduced elsewhere to one canonical *forward*
convolution, and this module describes that forward convolution.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import product

__all__ = [
    "ConvGeometry",
    "ceil_to_multiple",
    "check_output_nonempty",
    "check_positive",
    "expand_per_axis",
    "is_integer",
    "resolve_padding",
]


@dataclass(frozen=True)
class ConvGeometry:
    """Geometry of a forward convolution on a channels-first signal.

    Output position ``o`` (per spatial axis) reads input positions
    ``o * stride + j * dilation - pad_lo`` for kernel taps ``j = 0 .. kernel_size - 1``
    (cross-correlation, as in torch and Keras). Positions outside ``[0, n)`` are zero
    (``circular=False``) or wrap modulo ``n`` (``circular=True``).

    Attributes
    ----------
    in_channels, out_channels, groups : int
    input_size : tuple of int, shape (d,)
        Spatial size ``n`` of the input.
    kernel_size, stride, dilation, pad_lo, pad_hi : tuple of int, shape (d,)
    circular : bool
        Periodic boundary instead of zeros (then ``pad_hi`` is unused).
    """

    in_channels: int
    out_channels: int
    groups: int
    input_size: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pad_lo: tuple[int, ...]
    pad_hi: tuple[int, ...]
    circular: bool

    @property
    def ndim(self) -> int:
        """Number of spatial axes ``d``."""
        return len(self.input_size)

    @property
    def extent(self) -> tuple[int, ...]:
        """Dilated kernel extent ``dilation * (kernel_size - 1) + 1`` per axis."""
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel_size, self.dilation))

    @property
    def output_size(self) -> tuple[int, ...]:
        """Spatial size ``m`` of the output."""
        if self.circular:
            return tuple(n // s for n, s in zip(self.input_size, self.stride))
        return tuple(
            (n + lo + hi - e) // s + 1
            for n, lo, hi, e, s in zip(self.input_size, self.pad_lo, self.pad_hi, self.extent, self.stride)
        )

    @property
    def read_length(self) -> tuple[int, ...]:
        """Length ``s * (m - 1) + extent`` of the padded signal the outputs read."""
        return tuple(s * (m - 1) + e for s, m, e in zip(self.stride, self.output_size, self.extent))

    def taps(self) -> list[tuple[int, ...]]:
        """All kernel tap indices in C order (last axis fastest)."""
        return list(product(*(range(k) for k in self.kernel_size)))


def expand_per_axis(value, ndim: int, name: str) -> tuple[int, ...]:
    """Turn an int or a length-``ndim`` sequence of ints into a tuple of ints.

    Raises
    ------
    ValueError
        If a sequence has the wrong length or an entry is not an integer.
    """
    message = f"{name} must be an int or a sequence of {ndim} ints (one per spatial axis), got {value!r}"
    if isinstance(value, numbers.Integral):
        items = (value,) * ndim
    elif isinstance(value, Iterable):
        items = tuple(value)
    else:
        raise ValueError(message)
    if len(items) != ndim or not all(is_integer(v) for v in items):
        raise ValueError(message)
    return tuple(int(v) for v in items)


def is_integer(value) -> bool:
    """Whether ``value`` is an integer (Python's or NumPy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def resolve_padding(padding, input_size, kernel_size, stride, dilation):
    """Per-axis ``(pad_lo, pad_hi, circular)`` for a padding specification.

    Parameters
    ----------
    padding : int, sequence of int, sequence of (lo, hi) pairs, "valid", "same" or "circular"
        ``"same"`` follows TensorFlow/Keras: output ``ceil(n / stride)``, total padding
        ``max((m - 1) * stride + extent - n, 0)``, the odd element after (for stride 1
        this is also torch's ``padding="same"``). ``"circular"`` is the periodic
        convolution on the torus of size ``n`` with offset ``pad_lo = (extent - 1) // 2``
        on every axis (that of ``"same"`` for stride 1; for an odd extent, torch's
        ``padding_mode="circular"`` with ``padding=(extent - 1) // 2``).
    input_size, kernel_size, stride, dilation : tuple of int, shape (d,)

    Returns
    -------
    pad_lo, pad_hi : tuple of int
    circular : bool

    Raises
    ------
    ValueError
        Unknown string, negative padding, or circular padding with ``n`` not a multiple
        of the stride.
    """
    ndim = len(input_size)
    extent = [d * (k - 1) + 1 for k, d in zip(kernel_size, dilation)]
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return (0,) * ndim, (0,) * ndim, False
        if mode not in ("same", "circular"):
            raise ValueError(f"padding must be an int, a tuple, 'valid', 'same' or 'circular', got {padding!r}")
        totals = [
            max((-(-n // s) - 1) * s + e - n, 0) for n, s, e in zip(input_size, stride, extent)
        ]
        lo = tuple(t // 2 for t in totals)
        hi = tuple(t - t // 2 for t in totals)
        if mode == "circular":
            bad = [(n, s) for n, s in zip(input_size, stride) if n % s]
            if bad:
                raise ValueError(
                    f"circular padding needs every input size to be a multiple of its stride, "
                    f"got sizes {tuple(input_size)} with stride {tuple(stride)}; crop or pad the input"
                )
            lo = tuple((e - 1) // 2 for e in extent)
            return lo, lo, True
        return lo, hi, False
    if not isinstance(padding, numbers.Integral) and all(isinstance(p, (tuple, list)) for p in padding):
        pairs = tuple(tuple(p) for p in padding)
        if len(pairs) != ndim or any(len(p) != 2 for p in pairs):
            raise ValueError(f"padding as pairs needs {ndim} (lo, hi) pairs, got {padding!r}")
        lo = expand_per_axis([p[0] for p in pairs], ndim, "padding")
        hi = expand_per_axis([p[1] for p in pairs], ndim, "padding")
    else:
        lo = hi = expand_per_axis(padding, ndim, "padding")
    if min(lo + hi) < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    return lo, hi, False


def check_positive(values: tuple[int, ...], name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless every entry is >= 1."""
    if min(values) < 1:
        raise ValueError(f"{name} must be >= 1 on every axis, got {values}")


def check_output_nonempty(geometry: ConvGeometry) -> None:
    """Raise ``ValueError`` if the convolution has an empty output."""
    if min(geometry.output_size) < 1:
        raise ValueError(
            f"input of spatial size {geometry.input_size} is smaller than the dilated kernel "
            f"extent {geometry.extent} after padding ({geometry.pad_lo}, {geometry.pad_hi}); "
            "use a larger input or more padding"
        )


def ceil_to_multiple(value: int, step: int) -> int:
    """Smallest multiple of ``step`` that is >= ``value``."""
    return step * math.ceil(value / step)
