"""`conv_operator`: a convolution layer as a linear operator with certified norm bounds."""

from __future__ import annotations

import math
import operator

from array_api_compat import device as array_device

from lipnorm._xp import array_namespace
from lipnorm.conv.geometry import (
    ConvGeometry,
    check_output_nonempty,
    check_positive,
    expand_per_axis,
    is_integer,
    resolve_padding,
)
from lipnorm.conv.taps import conv_adjoint, conv_forward
from lipnorm.operators import LinearOperator

__all__ = ["ConvOperator", "conv_operator"]

_LAYOUTS = ("torch", "keras")


class ConvOperator(LinearOperator):
    """A convolution on one input of fixed size, seen as a linear map of flat vectors.

    Build it with :func:`conv_operator`. ``matvec`` takes the flattened input (channels
    first for ``layout="torch"``, channels last for ``layout="keras"``, no batch axis)
    and returns the flattened output of the layer; ``rmatvec`` applies the exact
    transpose. A transposed convolution is stored as the forward convolution it is the
    adjoint of, so both directions share one implementation.

    Attributes
    ----------
    shape : tuple of int
        ``(output size, input size)`` of the flattened map.
    dtype, device
        Those of the kernel.
    xp : array namespace
        The kernel's namespace; vectors passed to ``matvec``/``rmatvec`` must belong to it.
    geometry : ConvGeometry
        The forward convolution (for ``transposed=True`` the one this layer is the adjoint of).
    transposed : bool
    channels_last : bool
    """

    def __init__(self, kernel, geometry: ConvGeometry, *, transposed: bool, channels_last: bool):
        self._kernel = kernel
        self.geometry = geometry
        self.transposed = transposed
        self.channels_last = channels_last
        self._xp = array_namespace(kernel)
        g = geometry
        fwd_in = g.in_channels * math.prod(g.input_size)
        fwd_out = g.out_channels * math.prod(g.output_size)
        self._shape = (fwd_in, fwd_out) if transposed else (fwd_out, fwd_in)

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def dtype(self):
        return self._kernel.dtype

    @property
    def xp(self):
        return self._xp

    @property
    def device(self):
        return array_device(self._kernel)

    @property
    def kernel(self):
        """The kernel in canonical forward form, shape (G, cout_g, cin_g, *kernel_size)."""
        return self._kernel

    def _unflatten(self, v, channels, spatial):
        xp = self._xp
        if self.channels_last:
            v = xp.reshape(v, tuple(spatial) + (channels,))
            return xp.permute_dims(v, (v.ndim - 1,) + tuple(range(v.ndim - 1)))
        return xp.reshape(v, (channels,) + tuple(spatial))

    def _flatten(self, v):
        xp = self._xp
        if self.channels_last:
            v = xp.permute_dims(v, tuple(range(1, v.ndim)) + (0,))
        return xp.reshape(v, (-1,))

    def _check_vector(self, v, length: int, name: str):
        if v.ndim != 1 or v.shape[0] != length:
            raise ValueError(f"{name} expects a 1-D vector of length {length}, got shape {tuple(v.shape)}")

    def _forward(self, x):
        g = self.geometry
        out = conv_forward(self._xp, self._kernel, self._unflatten(x, g.in_channels, g.input_size), g)
        return self._flatten(out)

    def _adjoint(self, y):
        g = self.geometry
        out = conv_adjoint(self._xp, self._kernel, self._unflatten(y, g.out_channels, g.output_size), g)
        return self._flatten(out)

    def matvec(self, x):
        """Apply the layer to a flattened input vector ``x`` of length ``shape[1]``."""
        self._check_vector(x, self._shape[1], "matvec")
        return self._adjoint(x) if self.transposed else self._forward(x)

    def rmatvec(self, y):
        """Apply the transpose of the layer to a flattened vector ``y`` of length ``shape[0]``."""
        self._check_vector(y, self._shape[0], "rmatvec")
        return self._forward(y) if self.transposed else self._adjoint(y)

    def to_dense(self):
        """The operator as a dense ``shape`` matrix (small operators only: one matvec per column)."""
        xp = self._xp
        eye = xp.eye(self._shape[1], dtype=self.dtype, device=self.device)
        return xp.stack([self.matvec(eye[i, :]) for i in range(self._shape[1])], axis=1)

    def sigma_bounds(self, **options):
        """Certified interval for the spectral norm of this layer on this input size.

        ``options`` (``method``, ``gram_steps``, ``lanczos_steps``, ``lanczos_rtol``, ``dense_max_columns``) are
        those of :func:`lipnorm.conv.bounds.conv_sigma_bounds`.
        """
        from lipnorm.conv.bounds import conv_sigma_bounds

        return conv_sigma_bounds(self, **options)

    def exact_sigma(self) -> float:
        """Spectral norm of a circular convolution from the FFT of its kernel (float64).

        Raises
        ------
        ValueError
            If the padding is not circular (use :meth:`sigma_bounds` instead).
        """
        from lipnorm.conv.bounds import circular_sigma

        return circular_sigma(self)


def _to_forward_torch_kernel(xp, kernel, ndim: int, layout: str, depthwise: bool):
    """Permute a kernel to torch's forward layout (cout_f, cin_f / groups, *k)."""
    if layout == "keras" and depthwise:  # (*k, cin, dm) -> (cin * dm, 1, *k), out channel c * dm + j
        kernel = xp.permute_dims(kernel, (ndim, ndim + 1) + tuple(range(ndim)))
        kernel = xp.reshape(kernel, (kernel.shape[0] * kernel.shape[1], 1) + tuple(kernel.shape[2:]))
    elif layout == "keras":  # (*k, cin/groups, cout) -> (cout, cin/groups, *k)
        kernel = xp.permute_dims(kernel, (ndim + 1, ndim) + tuple(range(ndim)))
    return kernel


def conv_operator(
    kernel,
    input_shape,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    layout: str = "torch",
    transposed: bool = False,
    output_padding=0,
    depthwise: bool = False,
) -> ConvOperator:
    """The linear operator of a 1-D, 2-D or 3-D convolution layer on one input size.

    Parameters
    ----------
    kernel : array of any supported library, real floating dtype
        ``layout="torch"``: ``(cout, cin/groups, *k)``; transposed ``(cin, cout/groups, *k)``.
        ``layout="keras"``: ``(*k, cin/groups, cout)``; transposed ``(*k, cout, cin)``;
        ``depthwise=True`` (Keras ``DepthwiseConv*D``) ``(*k, cin, depth_multiplier)``.
    input_shape : sequence of int
        Shape of one input sample without the batch axis: ``(cin, *spatial)`` for torch,
        ``(*spatial, cin)`` for keras.
    stride, dilation : int or sequence of int
    padding : int, sequence of int, sequence of (lo, hi), "valid", "same" or "circular"
        Zeros outside the input, except ``"circular"`` (periodic, output ``n / stride``).
    groups : int
        Grouped convolution; ``depthwise=True`` sets it to the number of input channels.
    layout : {"torch", "keras"}
    transposed : bool
        The layer is a transposed convolution (the adjoint of the forward convolution
        with the same kernel). Output size: torch's rule ``(m-1)*stride - pad_lo -
        pad_hi + extent + output_padding`` for explicit padding; Keras's for ``"same"``
        (``m * stride``) and ``"valid"`` (``m * stride + max(extent - stride, 0)``).
    output_padding : int or sequence of int
        Extra output size of a transposed convolution, ``0 <= output_padding < stride``.
    depthwise : bool
        Depthwise convolution (one group per input channel).

    Returns
    -------
    ConvOperator

    Raises
    ------
    ValueError
        Kernel rank or channel count not matching ``input_shape`` and ``layout``, stride or
        dilation < 1, negative padding, groups not dividing the channels, non-finite,
        non-floating or empty kernel, non-integer or empty ``input_shape``, empty output,
        unsupported combination.

    Examples
    --------
    >>> import numpy as np, lipnorm
    >>> w = np.random.default_rng(0).standard_normal((8, 4, 3, 3))
    >>> op = lipnorm.conv_operator(w, (4, 16, 16), stride=2, padding=1)
    >>> op.shape
    (512, 1024)
    >>> lo, hi = lipnorm.sigma_bounds(op)
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be 'torch' or 'keras', got {layout!r}")
    if isinstance(padding, str):
        padding = padding.lower()
    xp = array_namespace(kernel)
    try:
        input_shape = tuple(operator.index(v) for v in input_shape)
    except TypeError:
        raise ValueError(f"input_shape must hold integers, got {tuple(input_shape)}") from None
    ndim = len(input_shape) - 1
    if ndim not in (1, 2, 3):
        raise ValueError(
            f"input_shape must be one sample's shape with 1 to 3 spatial axes plus a channel axis "
            f"(no batch axis), got {input_shape}"
        )
    if min(input_shape) < 1:
        raise ValueError(f"input_shape {input_shape} has an empty axis; every size must be >= 1")
    if kernel.ndim != ndim + 2:
        raise ValueError(
            f"a {ndim}-D convolution needs a kernel with {ndim + 2} axes, got shape {tuple(kernel.shape)} "
            f"for input_shape {input_shape} (layout={layout!r})"
        )
    if 0 in tuple(kernel.shape):
        raise ValueError(f"kernel of shape {tuple(kernel.shape)} is empty; every axis must have length >= 1")
    if not xp.isdtype(kernel.dtype, "real floating"):
        raise ValueError(f"kernel must have a real floating dtype, got {kernel.dtype}; cast it first")
    if not bool(xp.all(xp.isfinite(kernel))):
        raise ValueError("kernel contains NaN or Inf; its operator norm is undefined")
    stride = expand_per_axis(stride, ndim, "stride")
    dilation = expand_per_axis(dilation, ndim, "dilation")
    output_padding = expand_per_axis(output_padding, ndim, "output_padding")
    check_positive(stride, "stride")
    check_positive(dilation, "dilation")
    if depthwise and transposed:
        raise ValueError("depthwise=True describes a forward DepthwiseConv layer; it cannot be transposed")

    channels_last = layout == "keras"
    in_channels = input_shape[-1] if channels_last else input_shape[0]
    spatial = input_shape[:-1] if channels_last else input_shape[1:]
    if depthwise:
        groups = in_channels
    if not is_integer(groups) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    groups = int(groups)
    weight = _to_forward_torch_kernel(xp, kernel, ndim, layout, depthwise)
    kernel_size = tuple(weight.shape[2:])
    fwd_out, fwd_in = weight.shape[0], weight.shape[1] * groups
    layer_in = fwd_out if transposed else fwd_in
    if in_channels != layer_in:
        raise ValueError(
            f"kernel of shape {tuple(kernel.shape)} (layout={layout!r}, groups={groups}, "
            f"transposed={transposed}, depthwise={depthwise}) expects {layer_in} input channels, "
            f"but input_shape {input_shape} has {in_channels}; check layout and channel order"
        )
    if fwd_out % groups:
        raise ValueError(f"groups={groups} must divide the {fwd_out} output channels of the forward convolution")

    if transposed:
        if padding == "circular":
            raise ValueError("transposed convolutions support zero padding only (as in torch and Keras)")
        extent = tuple(d * (k - 1) + 1 for k, d in zip(kernel_size, dilation))
        if any(p >= s for p, s in zip(output_padding, stride)):
            raise ValueError(f"output_padding {output_padding} must be smaller than stride {stride}")
        if padding == "same":
            if any(output_padding):
                raise ValueError("output_padding is not supported with padding='same'; give explicit padding")
            size = tuple(m * s for m, s in zip(spatial, stride))
        elif padding == "valid" and not any(output_padding):
            size = tuple(m * s + max(e - s, 0) for m, s, e in zip(spatial, stride, extent))
        else:
            lo, hi, _ = resolve_padding(padding, spatial, kernel_size, stride, dilation)
            size = tuple(
                (m - 1) * s - a - b + e + p
                for m, s, a, b, e, p in zip(spatial, stride, lo, hi, extent, output_padding)
            )
        if min(size) < 1:
            raise ValueError(f"transposed convolution on input {input_shape} has an empty output; reduce padding")
    else:
        if any(output_padding):
            raise ValueError("output_padding applies to transposed convolutions only")
        size = spatial
    lo, hi, circular = resolve_padding(padding, size, kernel_size, stride, dilation)
    geometry = ConvGeometry(
        in_channels=fwd_in,
        out_channels=fwd_out,
        groups=groups,
        input_size=tuple(size),
        kernel_size=kernel_size,
        stride=stride,
        dilation=dilation,
        pad_lo=lo,
        pad_hi=hi,
        circular=circular,
    )
    check_output_nonempty(geometry)
    if transposed and tuple(geometry.output_size) != tuple(spatial):
        raise ValueError(
            f"no forward convolution maps size {geometry.input_size} to the transposed input size "
            f"{spatial} with these settings; check padding and output_padding"
        )
    canonical = xp.reshape(weight, (groups, fwd_out // groups, weight.shape[1]) + kernel_size)
    return ConvOperator(canonical, geometry, transposed=transposed, channels_last=channels_last)
