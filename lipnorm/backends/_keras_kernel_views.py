"""Which weights of a Keras layer spectral normalization acts on, and their matrix view.

A *kernel view* names one weight of a layer (``kernel``, ``embeddings``,
``depthwise_kernel``, ...) and the axes of that weight that index the layer's
outputs. The matrix view of the weight has the remaining (input) axes flattened
into rows and the output axes flattened into columns, so ``x @ matrix`` is the
layer's linear map for Dense-like layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras


@dataclass(frozen=True)
class KernelView:
    """One normalized weight of a layer.

    Attributes
    ----------
    attribute : str
        Name of the weight on the layer (``"kernel"``, ``"embeddings"``, ...).
    output_axes : tuple of int
        Non-negative axes of the weight that index the layer's outputs.
    """

    attribute: str
    output_axes: tuple[int, ...]


CONV_LAYERS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
CONV_TRANSPOSE_LAYERS = (
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
)
DEPTHWISE_LAYERS = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
SEPARABLE_LAYERS = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)


def _last_axes(weight, count):
    ndim = len(weight.shape)
    return tuple(range(ndim - count, ndim))


def _einsum_output_axes(layer, kernel):
    """Axes of an EinsumDense kernel whose letters appear in the output term."""
    inputs_term, output_term = layer.equation.split("->")
    kernel_term = inputs_term.split(",")[1].strip()
    if len(kernel_term) != len(kernel.shape) or "." in kernel_term:
        raise ValueError(
            f"EinsumDense equation {layer.equation!r} has a kernel term that does not "
            f"name one letter per kernel axis (kernel shape {tuple(kernel.shape)}); "
            "spectral normalization needs an explicit kernel term such as 'ab,bc->ac'."
        )
    axes = tuple(i for i, letter in enumerate(kernel_term) if letter in output_term)
    if not axes:
        raise ValueError(
            f"EinsumDense equation {layer.equation!r} contracts every kernel axis; "
            "no axis indexes the outputs, so the kernel has no matrix view."
        )
    return axes


def kernel_views(layer):
    """The weights of a built layer that spectral normalization acts on.

    Parameters
    ----------
    layer : keras.layers.Layer
        A built layer.

    Returns
    -------
    list of KernelView
        One entry per normalized weight (two for SeparableConv, one otherwise).

    Raises
    ------
    ValueError
        If the layer has no ``kernel`` nor ``embeddings`` weight.
    """
    if isinstance(layer, SEPARABLE_LAYERS):
        return [
            KernelView("depthwise_kernel", _last_axes(layer.depthwise_kernel, 2)),
            KernelView("pointwise_kernel", _last_axes(layer.pointwise_kernel, 1)),
        ]
    if isinstance(layer, DEPTHWISE_LAYERS):
        # Every (input channel, multiplier) pair is one output channel.
        return [KernelView("kernel", _last_axes(layer.kernel, 2))]
    if isinstance(layer, CONV_TRANSPOSE_LAYERS):
        # Kernel layout (*spatial, filters, in_channels): outputs are axis -2.
        ndim = len(layer.kernel.shape)
        return [KernelView("kernel", (ndim - 2,))]
    if isinstance(layer, keras.layers.EinsumDense):
        return [KernelView("kernel", _einsum_output_axes(layer, layer.kernel))]
    for attribute in ("kernel", "embeddings"):
        weight = getattr(layer, attribute, None)
        if weight is not None:
            return [KernelView(attribute, _last_axes(weight, 1))]
    raise ValueError(
        f"SpectralNormalization needs a layer with a `kernel` or `embeddings` weight; "
        f"{type(layer).__name__} has neither. Wrap Dense, EinsumDense, Conv*, "
        "Conv*Transpose, DepthwiseConv*, SeparableConv*, Embedding, or a layer that "
        "defines `kernel`."
    )


def matrix_shape(shape, view):
    """Shape (n_in, n_out) of the matrix view of a weight of shape ``shape``."""
    n_in = n_out = 1
    for axis, size in enumerate(shape):
        if axis in view.output_axes:
            n_out *= size
        else:
            n_in *= size
    return n_in, n_out


def kernel_matrix(weight, view):
    """The matrix view of a weight: input axes as rows, output axes as columns.

    Parameters
    ----------
    weight : tensor, shape (...)
        The weight value.
    view : KernelView
        Which axes index the outputs.

    Returns
    -------
    tensor, shape (n_in, n_out)
        ``n_out`` is the product of the output axes' lengths, ``n_in`` of the rest.
    """
    shape = tuple(weight.shape)
    input_axes = tuple(i for i in range(len(shape)) if i not in view.output_axes)
    order = input_axes + view.output_axes
    if order != tuple(range(len(shape))):
        weight = keras.ops.transpose(weight, order)
    return keras.ops.reshape(weight, matrix_shape(shape, view))


def kernel_from_matrix(matrix, shape, view):
    """The inverse of ``kernel_matrix``: a matrix view back in the weight's layout.

    Parameters
    ----------
    matrix : tensor, shape (n_in, n_out)
    shape : tuple of int
        The weight's shape.
    view : KernelView

    Returns
    -------
    tensor, shape ``shape``
    """
    input_axes = tuple(i for i in range(len(shape)) if i not in view.output_axes)
    order = input_axes + view.output_axes
    weight = keras.ops.reshape(matrix, tuple(shape[i] for i in order))
    if order == tuple(range(len(shape))):
        return weight
    return keras.ops.transpose(weight, tuple(order.index(i) for i in range(len(shape))))
