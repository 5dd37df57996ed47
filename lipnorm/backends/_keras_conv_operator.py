"""The convolution of a Keras conv layer as a linear map on one input, for operator mode.

Power iteration on this map estimates the operator norm of the convolution
itself (with the layer's strides, padding and dilation) on the input shape the
layer was built for, instead of the norm of the reshaped kernel.

References
----------
Ryu, E., Liu, J., Wang, S., Chen, X., Wang, Z., Yin, W. "Plug-and-Play Methods
Provably Converge with Properly Trained Denoisers", ICML 2019 (real spectral
normalization by power iteration through the convolution).
Farnia, F., Zhang, J., Tse, D. "Generalizable Adversarial Training via Spectral
Normalization", ICLR 2019.
"""

from __future__ import annotations

from keras import ops

from lipnorm.backends._keras_kernel_views import CONV_LAYERS, CONV_TRANSPOSE_LAYERS
from lipnorm.backends._keras_power_iteration import LinearMap


def _spatial(shape, data_format):
    return tuple(shape[1:-1]) if data_format == "channels_last" else tuple(shape[2:])


def _transpose_output_padding(conv_input, layer, conv_output):
    """Output padding that makes ``conv_transpose`` return exactly ``conv_input`` lengths."""
    padding = []
    for n, m, k, s, d in zip(
        conv_input, conv_output, layer.kernel_size, layer.strides, layer.dilation_rate
    ):
        extent = (k - 1) * d + 1
        base = (m - 1) * s + (extent if layer.padding == "valid" else extent % 2)
        padding.append(n - base)
    return tuple(padding)


def spread_kernel(kernel, dilation_rate):
    """The kernel with ``d - 1`` zeros between taps along each spatial axis of dilation ``d``.

    A convolution with dilation ``d`` equals one with dilation 1 and the spread
    kernel; ``conv_transpose`` takes the spread kernel because TensorFlow's CPU
    transposed convolution rejects dilation > 1.

    Parameters
    ----------
    kernel : tensor, shape (*spatial, c_a, c_b)
    dilation_rate : tuple of int, one per spatial axis

    Returns
    -------
    tensor, shape (*((k - 1) * d + 1 for k, d), c_a, c_b)
    """
    for axis, rate in enumerate(dilation_rate):
        if rate == 1:
            continue
        taps = kernel.shape[axis]
        moved = ops.moveaxis(kernel, axis, 0)
        rest = tuple(moved.shape[1:])
        gaps = ops.zeros((taps, rate - 1) + rest, dtype=kernel.dtype)
        spread = ops.concatenate([ops.expand_dims(moved, 1), gaps], axis=1)
        spread = ops.reshape(spread, (taps * rate,) + rest)[: (taps - 1) * rate + 1]
        kernel = ops.moveaxis(spread, 0, axis)
    return kernel


def operator_shapes(layer, input_shape):
    """Shapes of one input and one output of the layer's convolution.

    Parameters
    ----------
    layer : keras.layers.Layer
        A built Conv1D/2D/3D or Conv1D/2D/3DTranspose layer.
    input_shape : tuple
        The shape the layer was built with; its spatial and channel sizes must be known.

    Returns
    -------
    input_shape, output_shape : tuple of int
        With batch size 1.

    Raises
    ------
    ValueError
        If a spatial or channel size is unknown.
    """
    one_input = (1,) + tuple(input_shape[1:])
    if any(size is None for size in one_input):
        raise ValueError(
            f"operator mode needs the full input shape at build; got {tuple(input_shape)}. "
            "Give the model input a fixed spatial size, e.g. keras.Input((32, 32, 3))."
        )
    return one_input, tuple(layer.compute_output_shape(one_input))


def conv_operator_map(layer, input_shape):
    """The layer's convolution, without bias or activation, as a LinearMap of its kernel.

    Parameters
    ----------
    layer : keras.layers.Layer
        A built Conv1D/2D/3D or Conv1D/2D/3DTranspose layer with ``groups == 1``.
    input_shape : tuple
        The shape of one input, batch size 1 (from :func:`operator_shapes`).

    Returns
    -------
    LinearMap
        ``forward`` maps an input-shaped tensor to an output-shaped one.

    Raises
    ------
    ValueError
        For grouped convolutions, which ``keras.ops.conv_transpose`` cannot express, and
        for causal padding, which ``keras.ops.conv`` does not take.
    """
    if getattr(layer, "groups", 1) != 1:
        raise ValueError(
            f"operator mode does not support grouped convolutions ({type(layer).__name__} "
            f"with groups={layer.groups}); use mode='matrix'."
        )
    if layer.padding == "causal":
        raise ValueError(
            f"operator mode supports padding 'valid' and 'same', not {type(layer).__name__} "
            "with padding='causal'; use mode='matrix'."
        )
    output_shape = tuple(layer.compute_output_shape(input_shape))
    dilation = tuple(layer.dilation_rate)
    conv_args = dict(
        strides=list(layer.strides),
        padding=layer.padding,
        dilation_rate=dilation,
        data_format=layer.data_format,
    )
    transpose_args = dict(conv_args, dilation_rate=1)
    if isinstance(layer, CONV_LAYERS):
        back_padding = _transpose_output_padding(
            _spatial(input_shape, layer.data_format),
            layer,
            _spatial(output_shape, layer.data_format),
        )
        return LinearMap(
            forward=lambda v, kernel: ops.conv(v, kernel, **conv_args),
            adjoint=lambda u, kernel: ops.conv_transpose(
                u, spread_kernel(kernel, dilation), output_padding=back_padding, **transpose_args
            ),
        )
    if isinstance(layer, CONV_TRANSPOSE_LAYERS):
        return LinearMap(
            forward=lambda v, kernel: ops.conv_transpose(
                v,
                spread_kernel(kernel, dilation),
                output_padding=layer.output_padding,
                **transpose_args,
            ),
            adjoint=lambda u, kernel: ops.conv(u, kernel, **conv_args),
        )
    raise ValueError(
        f"operator mode applies to Conv1D/2D/3D and Conv1D/2D/3DTranspose; "
        f"got {type(layer).__name__}. Use mode='matrix'."
    )
