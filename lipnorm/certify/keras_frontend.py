"""Keras 3 front end: the functional graph of a Sequential/functional model → Graph.

Nested models are walked in place. Imports keras at its top; :func:`lipnorm.certify.certify`
loads it only for Keras models.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from lipnorm.backends._keras_kernel_views import kernel_views
from lipnorm.backends.keras import SpectralNormalization
from lipnorm.bounds import max_pool_lipschitz, round_up
from lipnorm.certify.builder import ATTENTION_REASON, GraphBuilder
from lipnorm.certify.errors import NotCertifiableError
from lipnorm.certify.layers import (
    average_pool_map,
    batch_norm_map,
    padding_map,
    same_padding,
    torch_pool_windows,
)
from lipnorm.certify.linear import ConvMap, DenseMap, FixedMap, ScaleMap

__all__ = ["build_graph"]

L = keras.layers
_PASSTHROUGH = (L.Dropout, L.SpatialDropout1D, L.SpatialDropout2D, L.SpatialDropout3D,
                L.GaussianNoise, L.GaussianDropout, L.AlphaDropout, L.ActivityRegularization,
                L.Identity, L.InputLayer)
_RESHAPES = (L.Flatten, L.Reshape, L.Permute, L.Cropping1D, L.Cropping2D, L.Cropping3D)
_NORMALIZATIONS = (L.LayerNormalization, L.GroupNormalization, L.UnitNormalization)
_ATTENTION = (L.MultiHeadAttention, L.Attention, L.AdditiveAttention, L.GroupQueryAttention)
# layers combining their inputs entry by entry, which broadcast them to one shape
_ELEMENTWISE = (L.Add, L.Subtract, L.Average, L.Maximum, L.Minimum)
_CONVS = (L.Conv1D, L.Conv2D, L.Conv3D)
_CONV_TRANSPOSES = (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)


def build_graph(model, input_shape=None, rules=None):
    """Translate a Keras model into a graph of bounded nodes.

    Parameters
    ----------
    model : keras.Model
        Functional or Sequential (nested models allowed).
    input_shape : tuple of int, optional
        One input's shape without batch; needed when the model's own is not fixed.
    rules : mapping, optional

    Returns
    -------
    (GraphBuilder, tuple of int)
    """
    functional = _functional(model, input_shape)
    inputs = functional.inputs
    if len(inputs) != 1:
        GraphBuilder.refuse(model.name, type(model).__name__,
                            f"has {len(inputs)} inputs; certify supports one")
    shape = tuple(inputs[0].shape[1:])
    if input_shape is not None and tuple(input_shape) != shape:
        raise ValueError(f"input_shape {tuple(input_shape)} differs from the model's {shape}")
    if any(n is None for n in shape):
        raise ValueError(f"the model's input shape {shape} is not fixed; pass input_shape")
    builder = GraphBuilder(rules)
    walker = _Walker(builder)
    outputs = walker.walk(functional, [builder.graph.input_name])
    builder.graph.outputs = outputs
    return builder, shape


def _functional(model, input_shape):
    """The model itself, or the functional graph inside a Sequential."""
    if isinstance(model, keras.Sequential):
        if not model.built or getattr(model, "_functional", None) is None:
            if input_shape is None:
                raise ValueError("the Sequential model is not built; pass input_shape")
            model.build((None, *input_shape))
        return model._functional
    if not hasattr(model, "_nodes_by_depth"):
        GraphBuilder.refuse(model.name, type(model).__name__,
                            "is a subclassed keras.Model without a functional graph; rebuild it "
                            "with the functional API or keras.Sequential")
    return model


class _Walker:
    def __init__(self, builder: GraphBuilder):
        self.builder = builder
        # id(weight variable) -> sigma it is divided by, inside lipnorm's SpectralNormalization
        self._divisors: dict[int, float] = {}

    def walk(self, functional, sources: list[str], prefix: str = "") -> list[str]:
        """Add the nodes of ``functional`` reading ``sources``; returns its output nodes."""
        tensors: dict[int, str] = {id(t): s for t, s in zip(functional.inputs, sources)}
        depths = sorted(functional._nodes_by_depth, reverse=True)
        for depth in depths:
            for node in functional._nodes_by_depth[depth]:
                layer = node.operation
                if isinstance(layer, L.InputLayer):
                    continue
                dynamic = [t for t in node.input_tensors if id(t) in tensors]
                if not dynamic:
                    continue  # a constant branch
                inputs = [tensors[id(t)] for t in dynamic]
                # keras.ops' Add/Subtract operations (x + y on symbolic tensors) broadcast too
                if isinstance(layer, _ELEMENTWISE) or type(layer).__name__ in {"Add", "Subtract"}:
                    out_shape = node.output_tensors[0].shape
                    inputs = [self.builder.broadcast(prefix + layer.name, type(layer).__name__, source,
                                                     t.shape, out_shape)
                              for source, t in zip(inputs, dynamic)]
                outputs = self.layer(layer, node, inputs, prefix)
                for tensor, name in zip(node.output_tensors, outputs):
                    tensors[id(tensor)] = name
                    self.builder.graph.record_shape(name, tensor.shape)
        return [tensors[id(t)] for t in functional.outputs]

    def layer(self, layer, node, sources: list[str], prefix: str) -> list[str]:
        b = self.builder
        name, kind = prefix + layer.name, type(layer).__name__
        rule = b.user_rule(name, kind, layer, sources)
        if rule is not None:
            return [rule]
        if isinstance(layer, keras.Model):
            return self.walk(_functional(layer, None), sources, f"{name}/")
        if isinstance(layer, SpectralNormalization):
            return self._spectrally_normalized(layer, node, sources, f"{name}/")
        in_shape = tuple(node.input_tensors[0].shape)
        if isinstance(layer, L.Subtract) or kind == "Subtract":
            return [b.difference(name, kind, sources, _subtracted(node, sources))]
        if isinstance(layer, L.Add) or (kind == "Add" and len(sources) > 1):
            return [b.add_sum(name, kind, sources)]
        if kind == "Add":  # keras.ops with a constant operand
            b.passthrough(name, f"{kind} (constant shift)", sources[0])
            return sources
        if isinstance(layer, L.Average):
            total = b.add_sum(f"{name}.sum", kind, sources)
            return [b.linear(name, kind, total, ScaleMap(np.asarray(1.0 / len(sources)), None,
                                                          error=2.0**-52))]
        if isinstance(layer, (L.Concatenate, L.Maximum, L.Minimum)) or kind in {"Concatenate", "Stack"}:
            # max/min elementwise: |max(a,b) − max(c,d)| ≤ max(|a−c|, |b−d|) ≤ ‖(a−c, b−d)‖
            return [b.concat(name, kind, sources)]
        if len(sources) > 1:
            b.refuse(name, kind, "combines several inputs in a way with no Lipschitz rule "
                     "(products of input-dependent tensors are not globally Lipschitz)")
        source = sources[0]
        rank = len(in_shape)
        if isinstance(layer, L.Dense):
            source = b.linear(name, kind, source,
                              DenseMap(self._weight(layer.kernel).T, rank - 1))
            return [self._activation(f"{name}.activation", kind, layer.activation, source)]
        if isinstance(layer, (*_CONVS, *_CONV_TRANSPOSES, L.DepthwiseConv2D, L.DepthwiseConv1D,
                              L.SeparableConv2D, L.SeparableConv1D)):
            source = b.linear(name, kind, source, self._conv(layer, in_shape))
            return [self._activation(f"{name}.activation", kind, layer.activation, source)]
        if isinstance(layer, L.BatchNormalization):
            gamma = _numpy(layer.gamma) if layer.scale else None
            axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
            return [b.linear(name, kind, source, batch_norm_map(
                gamma, _numpy(layer.moving_variance), layer.epsilon, axis % rank))]
        if isinstance(layer, L.Activation):
            return [self._activation(name, kind, layer.activation, source)]
        if isinstance(layer, L.ReLU):
            if layer.threshold:
                b.refuse(name, kind, "has a nonzero threshold, which makes it discontinuous")
            return [b.activation(name, kind, source, "leaky_relu",
                                 negative_slope=float(layer.negative_slope))]
        if isinstance(layer, L.LeakyReLU):
            return [b.activation(name, kind, source, "leaky_relu",
                                 negative_slope=float(layer.negative_slope))]
        if isinstance(layer, L.ELU):
            return [b.activation(name, kind, source, "elu", alpha=float(layer.alpha))]
        if isinstance(layer, L.PReLU):
            return [b.activation(name, kind, source, "prelu",
                                 slopes=_numpy(layer.alpha))]
        if isinstance(layer, L.Softmax):
            return [b.activation(name, kind, source, "softmax")]
        if isinstance(layer, _PASSTHROUGH):
            b.passthrough(name, kind, source)
            return [source]
        if isinstance(layer, _RESHAPES):
            return [b.reshape(name, kind, source,
                              flat_identity=isinstance(layer, (L.Flatten, L.Reshape)))]
        if isinstance(layer, L.RepeatVector):
            return [b.broadcast(name, kind, source, in_shape, node.output_tensors[0].shape)]
        if isinstance(layer, (L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D)):
            return [b.lipschitz(name, kind, source, max_pool_lipschitz(
                layer.pool_size, layer.strides, None), "max pooling √m")]
        if isinstance(layer, (L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D)):
            return [b.linear(name, kind, source, self._average_pool(layer, in_shape))]
        if isinstance(layer, (L.GlobalAveragePooling1D, L.GlobalAveragePooling2D,
                              L.GlobalAveragePooling3D)):
            spatial = _spatial(in_shape, layer.data_format)
            return [b.linear(name, kind, source, average_pool_map(
                [(n, [(0, n, n)]) for n in spatial], True,
                channels_last=layer.data_format in (None, "channels_last")))]
        if isinstance(layer, (L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D)):
            return [b.lipschitz(name, kind, source, 1.0, "global max pooling")]
        if isinstance(layer, (L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D)):
            pads = layer.padding if isinstance(layer.padding[0], (tuple, list)) else (layer.padding,)
            pads = [tuple(p) for p in pads]
            pairs = ([(0, 0), *pads, (0, 0)] if layer.data_format in (None, "channels_last")
                     else [(0, 0), (0, 0), *pads])
            return [b.linear(name, kind, source, padding_map(in_shape, pairs, "constant", "zero padding"))]
        if isinstance(layer, (L.UpSampling1D, L.UpSampling2D, L.UpSampling3D)):
            if getattr(layer, "interpolation", "nearest") != "nearest":
                b.refuse(name, kind, "uses non-nearest interpolation, which lipnorm does not model")
            size = layer.size if isinstance(layer.size, (tuple, list)) else (layer.size,)
            return [b.linear(name, kind, source, FixedMap(
                1.0 if math.prod(size) == 1 else math.nextafter(math.sqrt(math.prod(size)), math.inf),
                "nearest upsampling √copies"))]
        if isinstance(layer, L.Rescaling):
            return [b.linear(name, kind, source, _scale_map(layer.scale, rank, 0.0))]
        if isinstance(layer, L.Normalization):
            if layer.invert:
                return [b.linear(name, kind, source, _scale_map(
                    np.sqrt(_numpy(layer.variance)), rank, 2.0**-50))]
            scale = 1.0 / np.maximum(np.sqrt(_numpy(layer.variance)), keras.backend.epsilon())
            return [b.linear(name, kind, source, _scale_map(
                scale, rank, 4 * 2.0**-53 * float(np.max(np.abs(scale)))))]
        if isinstance(layer, _NORMALIZATIONS):
            if isinstance(layer, L.UnitNormalization):
                b.refuse(name, kind, "divides by the input's norm, which is not globally Lipschitz")
            gamma = getattr(layer, "gamma", None)
            return [b.normalization(name, kind, source, None if gamma is None else _numpy(gamma),
                                    layer.epsilon)]
        if isinstance(layer, _ATTENTION):
            b.refuse(name, kind, ATTENTION_REASON)
        b.refuse(name, kind)

    def _spectrally_normalized(self, wrapper, node, sources: list[str], prefix: str) -> list[str]:
        """lipnorm's Keras SpectralNormalization: the wrapped layer with its weights / sigma.

        The sigmas are the ones inference divides by (stored u, v; no update), so the
        bound is that of the layer as it runs, not an assumed 1.
        """
        inner = wrapper.layer
        divisors = {id(getattr(inner, view.attribute)): float(sigma)
                    for view, sigma in zip(kernel_views(inner), wrapper.sigmas())}
        # Only while the wrapped layer is translated: the same layer object used unwrapped
        # elsewhere in the model runs with its raw weights.
        self._divisors.update(divisors)
        try:
            return self.layer(inner, node, sources, prefix)
        finally:
            for key in divisors:
                del self._divisors[key]

    def _weight(self, variable) -> np.ndarray:
        """A weight in float64, divided by its sigma when a SpectralNormalization wraps it."""
        return _numpy(variable) / self._divisors.get(id(variable), 1.0)

    def _activation(self, name, kind, activation, source) -> str:
        activation_name = keras.activations.serialize(activation)
        if isinstance(activation_name, dict):
            activation_name = activation_name.get("config", activation_name.get("class_name"))
        activation_name = str(activation_name)
        if activation_name == "linear":
            return source
        # a serialized activation keeps only its name: Keras then uses the defaults
        defaults = {"leaky_relu": {"negative_slope": 0.2}, "elu": {"alpha": 1.0}}
        return self.builder.activation(name, kind, source, activation_name,
                                       **defaults.get(activation_name, {}))

    def _conv(self, layer, in_shape) -> ConvMap:
        channels_last = getattr(layer, "data_format", "channels_last") == "channels_last"
        rank = len(in_shape)
        spatial = _spatial(in_shape, layer.data_format)
        d = len(spatial)
        strides = tuple(layer.strides)
        dilation = tuple(getattr(layer, "dilation_rate", (1,) * d))
        if isinstance(layer, (L.DepthwiseConv1D, L.DepthwiseConv2D, L.SeparableConv1D, L.SeparableConv2D)):
            is_separable = hasattr(layer, "pointwise_kernel")
            # (*k, channels, multiplier); DepthwiseConv calls it ``kernel``
            depthwise = self._weight(layer.depthwise_kernel if is_separable else layer.kernel)
            channels, multiplier = depthwise.shape[-2:]
            by_channel = np.moveaxis(depthwise, (-2, -1), (0, 1))  # (channels, multiplier, *k)
            kernel = by_channel.reshape(channels * multiplier, 1, *depthwise.shape[:-2])
            groups = channels
            if is_separable:
                # a 1×1 convolution after the depthwise one is one convolution:
                # K[o, c] = Σ_m P[o, c, m] D[c, m]
                pointwise = self._weight(layer.pointwise_kernel).reshape(channels * multiplier, -1).T
                kernel = np.einsum("ocm,cm...->oc...",
                                   pointwise.reshape(-1, channels, multiplier), by_channel)
                groups = 1
        else:
            raw = self._weight(layer.kernel)  # (*k, in/g, out) or transposed (*k, out, in)
            kernel = np.moveaxis(raw, (-1, -2), (0, 1))
            groups = getattr(layer, "groups", 1)
        k = kernel.shape[2:]
        transposed = isinstance(layer, _CONV_TRANSPOSES)
        if transposed or layer.padding == "valid":
            pads = ((0, 0),) * d  # a transposed conv's cropping only lowers the norm
        elif layer.padding == "same":
            pads = tuple(same_padding(n, k[i], strides[i], dilation[i]) for i, n in enumerate(spatial))
        else:  # causal
            pads = tuple((dilation[i] * (k[i] - 1), 0) for i in range(d))
        return ConvMap(kernel=kernel, input_spatial=tuple(spatial), stride=strides, padding=pads,
                       dilation=dilation, groups=groups,
                       channel_axis=rank - 1 if channels_last else 1, transposed=transposed,
                       output_padding=(0,) * d if transposed else ())

    def _average_pool(self, layer, in_shape) -> FixedMap:
        spatial = _spatial(in_shape, layer.data_format)
        axes = []
        for i, n in enumerate(spatial):
            k, s = layer.pool_size[i], layer.strides[i]
            before, after = same_padding(n, k, s) if layer.padding == "same" else (0, 0)
            axes.append((n, torch_pool_windows(n, k, s, before, after)))
        return average_pool_map(axes, count_include_pad=False,
                                channels_last=layer.data_format in (None, "channels_last"))


def _scale_map(scale, rank: int, error: float) -> ScaleMap | FixedMap:
    """x ↦ s ⊙ x for a scale broadcast against activations of rank ``rank`` (batch included).

    A scalar, or a scale varying along one axis, is a :class:`ScaleMap` on that axis (so
    it merges with its linear neighbours); a scale varying along several axes is bounded
    by max |s|.

    Parameters
    ----------
    scale : array_like
        Broadcastable against the activations.
    rank : int
        Rank of the activations, batch axis included.
    error : float
        Upper bound of the error of ``scale`` against the model's exact scale.

    Returns
    -------
    ScaleMap or FixedMap
    """
    scale = np.asarray(scale, dtype=np.float64)
    shape = (1,) * (rank - scale.ndim) + scale.shape
    varying = [axis for axis, n in enumerate(shape) if n > 1]
    if len(varying) > 1:
        return FixedMap(round_up(float(np.max(np.abs(scale))) + error), "max |scale|")
    return ScaleMap(scale.ravel() if varying else scale.reshape(()),
                    varying[0] if varying else None, error)


def _subtracted(node, sources: list[str]) -> list[bool]:
    """For each input-dependent operand of a subtraction, whether it is subtracted (not first).

    A Subtract layer is called with ``[a, b]``, ``keras.ops.subtract`` with ``(a, b)``; the
    operands are read in that order, constants (plain numbers) included.
    """
    operands = keras.tree.flatten(node.arguments.args)
    dynamic = [i for i, operand in enumerate(operands) if any(operand is t for t in node.input_tensors)]
    if len(dynamic) != len(sources):
        raise NotCertifiableError(node.operation.name, type(node.operation).__name__,
                                  "subtracts operands lipnorm cannot tell apart")
    return [i > 0 for i in dynamic]


def _spatial(shape, data_format) -> tuple[int, ...]:
    return tuple(shape[1:-1]) if data_format in (None, "channels_last") else tuple(shape[2:])


def _numpy(variable) -> np.ndarray:
    array = np.asarray(keras.ops.convert_to_numpy(variable), dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError("a weight has NaN or infinite entries; no finite bound exists")
    return array
