"""ONNX front end: the ``onnx`` graph → Graph.

The graph is run once with onnxruntime on an input of the fixed shape, exposing every
tensor: that gives the static shapes, and the values of the tensors that do not depend on
the input (initializers, ``Constant`` nodes, shape arithmetic). Imports onnx at its top.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from lipnorm.bounds import max_pool_lipschitz
from lipnorm.certify.builder import ATTENTION_REASON, GraphBuilder
from lipnorm.certify.layers import (
    average_pool_map,
    batch_norm_map,
    padding_map,
    same_padding,
    torch_pool_windows,
)
from lipnorm.certify.linear import ConvMap, DenseMap, FixedMap, ScaleMap

__all__ = ["build_graph", "load_onnx"]

_ACTIVATIONS = {
    "Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Softplus": "softplus",
    "Softsign": "softsign", "HardSwish": "hard_swish", "Mish": "mish",
    "Softmax": "softmax", "Clip": "hardtanh", "Abs": "abs",
}
#: Reshapes that keep the row-major order of the entries.
_FLAT_IDENTITIES = {"Flatten", "Reshape", "Squeeze", "Unsqueeze"}
_RESHAPES = {"Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Split",
             "SpaceToDepth", "DepthToSpace"}
_PASSTHROUGH = {"Identity", "Dropout", "Cast"}
# elementwise operators with more than one operand, which broadcast their inputs
_ELEMENTWISE = {"Add", "Sub", "Sum", "Mul", "Div", "Max", "Min"}
_FLOATING = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
             onnx.TensorProto.BFLOAT16}
_NORMALIZATIONS = {"LayerNormalization", "GroupNormalization", "InstanceNormalization",
                   "RMSNormalization"}


def load_onnx(model) -> onnx.ModelProto:
    """An ONNX ModelProto from a path or a ModelProto, checked.

    Raises
    ------
    ValueError
        For a file that is not a valid ONNX model.
    """
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise ValueError(f"{path} is not a valid ONNX model ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from None
    return proto


def build_graph(model, input_shape=None, rules=None):
    """Translate an ONNX model into a graph of bounded nodes.

    Parameters
    ----------
    model : onnx.ModelProto or path
    input_shape : tuple of int, optional
        One input's shape without batch; default: the model's, when fixed.
    rules : mapping, optional

    Returns
    -------
    (GraphBuilder, tuple of int)
    """
    proto = load_onnx(model)
    graph = proto.graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        GraphBuilder.refuse(graph.name or "model", "ONNX graph",
                            f"has {len(inputs)} inputs; certify supports one")
    declared = [d.dim_value if d.HasField("dim_value") else None
                for d in inputs[0].type.tensor_type.shape.dim]
    shape = tuple(input_shape) if input_shape is not None else tuple(declared[1:])
    if any(n is None for n in shape):
        raise ValueError(f"the ONNX input shape {declared} is not fixed; pass input_shape")
    values = _evaluate_all(proto, inputs[0].name, (1, *shape))
    translator = _Translator(GraphBuilder(rules), initializers, values)
    translator.values[inputs[0].name] = translator.builder.graph.input_name
    for node in graph.node:
        translator.node(node)
    translator.builder.graph.outputs = [translator.values[o.name] for o in graph.output
                                        if o.name in translator.values]
    return translator.builder, shape


def _evaluate_all(proto: onnx.ModelProto, input_name: str, shape) -> dict[str, np.ndarray]:
    """Every tensor of the graph on one Gaussian input (onnxruntime, no graph rewrites).

    Gives the static shapes, and the values of tensors that do not depend on the input.
    """
    import onnxruntime

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    present = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for output in node.output:
            if output and output not in present:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(output))
                present.add(output)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    element = session.get_inputs()[0].type
    dtype = np.float64 if "double" in element else np.float16 if "float16" in element else np.float32
    example = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    values = session.run(None, {input_name: example})
    result = {o.name: np.asarray(v) for o, v in zip(session.get_outputs(), values)}
    result[input_name] = example
    return result


class _Translator:
    def __init__(self, builder, initializers, evaluated):
        self.builder = builder
        self.constants: dict[str, np.ndarray] = dict(initializers)
        self.evaluated = evaluated
        self.values: dict[str, str] = {}  # input-dependent tensor name -> graph node
        self.producers: dict[str, object] = {}  # tensor name -> ONNX node that makes it

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.evaluated[name].shape)

    def constant(self, node, index: int, what: str) -> np.ndarray:
        name = node.input[index] if len(node.input) > index else ""
        if name in self.constants:
            return np.asarray(self.constants[name], dtype=np.float64)
        self.builder.refuse(node.name or node.op_type, node.op_type,
                            f"has an input-dependent {what}; only constant {what}s are supported")

    def node(self, node) -> None:
        for output in node.output:
            self.producers[output] = node
        dynamic = [i for i in node.input if i in self.values]
        if not dynamic or node.op_type in {"Shape", "Size"}:
            for output in node.output:  # does not depend on the input's values
                if output:
                    self.constants[output] = self.evaluated[output]
            return
        name = node.name or f"{node.op_type}_{node.output[0]}"
        sources = [self.values[i] for i in dynamic]
        if node.op_type in _ELEMENTWISE:
            out_shape = self.shape(node.output[0])
            sources = [self.builder.broadcast(name, node.op_type, source, self.shape(i), out_shape)
                       for source, i in zip(sources, dynamic)]
        outputs = self._translate(node, name, sources)
        for output, graph_node in zip(node.output, outputs):
            self.values[output] = graph_node
            self.builder.graph.record_shape(graph_node, self.shape(output))

    def _translate(self, node, name, sources) -> list[str]:
        b = self.builder
        op = node.op_type
        a = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
        rule = b.user_rule(name, op, node, sources)
        if rule is not None:
            return [rule] * len(node.output)
        if op == "Sub":
            subtracted = [k == 1 for k, i in enumerate(node.input) if i in self.values]
            if len(sources) > 1 or any(subtracted):
                return [b.difference(name, op, sources, subtracted)]
        if op in {"Add", "Sub", "Sum"}:
            if len(sources) > 1:
                return [b.add_sum(name, op, sources)]
            b.passthrough(name, f"{op} (constant shift)", sources[0])
            return sources
        if op == "Concat":
            return [b.concat(name, op, sources)]
        if op in {"Max", "Min"} and len(sources) > 1:
            return [b.concat(name, op, sources)]  # |max(a,b)−max(c,d)| ≤ ‖(a−c, b−d)‖
        if op == "Mul" and len(sources) > 1:
            activation = self._gated_activation(node)
            if activation is not None:
                source, name_of, scale = activation
                added = b.activation(name, f"Mul ({name_of})", self.values[source], name_of)
                if scale == 1:
                    return [added]
                return [b.linear(f"{name}.scale", "Mul", added, ScaleMap(np.asarray(scale), None))]
        if len(sources) > 1:
            if op == "MatMul":
                b.refuse(name, op, "multiplies two input-dependent tensors (" + ATTENTION_REASON[3:] + ")")
            b.refuse(name, op, "combines several input-dependent tensors in a way with no "
                     "Lipschitz rule")
        source = sources[0]
        in_shape = self.shape(node.input[0]) if node.input[0] in self.values else None
        if op == "Gemm":
            if a.get("transA", 0) or node.input[0] not in self.values:
                b.refuse(name, op, "transposes its input or has a non-constant weight")
            weight = self.constant(node, 1, "weight")
            weight = weight if a.get("transB", 0) else weight.T
            alpha = float(a.get("alpha", 1.0))
            error = 0.0 if alpha == 1.0 else 2.0**-52 * _norm(weight) * abs(alpha)  # rounding of α·W
            return [b.linear(name, op, source, DenseMap(alpha * weight, 1, error=error))]
        if op == "MatMul":
            if node.input[0] in self.values:
                weight = self.constant(node, 1, "weight")
                if weight.ndim != 2:
                    b.refuse(name, op, "has a batched constant operand")
                return [b.linear(name, op, source, DenseMap(weight.T, len(in_shape) - 1))]
            weight = self.constant(node, 0, "weight")
            rank = len(self.shape(node.input[1]))
            return [b.linear(name, op, source, DenseMap(weight, rank - 2))]
        if op in {"Conv", "ConvTranspose"}:
            return [b.linear(name, op, source, self._conv(node, a, in_shape))]
        if op == "BatchNormalization":
            if a.get("training_mode", 0):
                b.refuse(name, op, "is in training mode: it normalizes by the batch's statistics, "
                         "not its running ones; export the model in eval mode")
            return [b.linear(name, op, source, batch_norm_map(
                self.constant(node, 1, "scale"), self.constant(node, 4, "variance"),
                a.get("epsilon", 1e-5), 1))]
        if op in {"Mul", "Div"}:
            index = 1 if node.input[0] in self.values else 0
            if op == "Div" and index == 0:
                b.refuse(name, op, "divides by an input-dependent tensor")
            value = self.constant(node, index, "factor")
            if op == "Div":
                value = 1.0 / value
            if value.size == 1:
                return [b.linear(name, op, source, ScaleMap(value.reshape(()), None,
                                                             error=2.0**-52 * float(np.max(np.abs(value)))))]
            return [b.linear(name, op, source, FixedMap(
                math.nextafter(float(np.max(np.abs(value))) * (1 + 2.0**-50), math.inf),
                "max |constant factor|"))]
        if op == "Neg":
            return [b.linear(name, op, source, ScaleMap(np.asarray(-1.0), None))]
        if op in _ACTIVATIONS:
            return [b.activation(name, op, source, _ACTIVATIONS[op])]
        if op == "LeakyRelu":
            return [b.activation(name, op, source, "leaky_relu", negative_slope=a.get("alpha", 0.01))]
        if op == "Celu":
            return [b.celu(name, op, source, a.get("alpha", 1.0))]
        if op == "Elu":
            return [b.activation(name, op, source, "elu", alpha=a.get("alpha", 1.0))]
        if op == "Selu":
            return [b.activation(name, op, source, "selu", alpha=a.get("alpha", 1.67326319217681884765625),
                                 gamma=a.get("gamma", 1.05070102214813232421875))]
        if op == "PRelu":
            return [b.activation(name, op, source, "prelu",
                                 slopes=np.asarray(self.constant(node, 1, "slope")))]
        if op == "HardSigmoid":
            return [b.activation(name, op, source, "hard_sigmoid_affine", alpha=a.get("alpha", 0.2))]
        if op == "Gelu":
            return [b.activation(name, op, source,
                                 "gelu_tanh" if a.get("approximate", b"none") in (b"tanh", "tanh") else "gelu")]
        if op == "Cast" and a["to"] not in _FLOATING:
            b.refuse(name, op, "converts to a non-floating type, which rounds (discontinuous)")
        if op == "Dropout" and len(node.input) > 2 and node.input[2] and bool(self.constant(
                node, 2, "training_mode")):
            b.refuse(name, op, "runs in training mode, which is random and has no Lipschitz constant")
        if op in _PASSTHROUGH:
            b.passthrough(name, op, source)
            return sources
        if op in _RESHAPES:
            same_entries = op in _FLAT_IDENTITIES and len(node.output) == 1
            return [b.reshape(name if i == 0 else f"{name}:{i}", op, source, flat_identity=same_entries)
                    for i in range(len(node.output))]
        if op == "MaxPool":
            k = a["kernel_shape"]
            return [b.lipschitz(name, op, source, max_pool_lipschitz(
                k, a.get("strides", [1] * len(k)), a.get("dilations", [1] * len(k))), "max pooling √m")]
        if op == "GlobalMaxPool":
            return [b.lipschitz(name, op, source, 1.0, "global max pooling")]
        if op == "AveragePool":
            if any(dilation != 1 for dilation in a.get("dilations", [])):
                b.refuse(name, op, f"has dilations {list(a['dilations'])}; dilated average pooling "
                         "(opset 19) is not supported")
            return [b.linear(name, op, source, self._average_pool(a, in_shape))]
        if op in {"GlobalAveragePool", "ReduceMean", "ReduceSum"}:
            if op == "GlobalAveragePool":
                axes = list(range(2, len(in_shape)))
            else:
                axes = a.get("axes")
                if axes is None and len(node.input) > 1 and node.input[1]:
                    axes = [int(i) for i in self.constant(node, 1, "axes")]
                if not axes and not a.get("noop_with_empty_axes", 0):
                    axes = range(len(in_shape))  # no axes, or empty axes: every axis
            if op != "ReduceSum" and sorted(int(i) % len(in_shape) for i in axes) == list(range(2, len(in_shape))):  # the spatial axes
                return [b.linear(name, op, source, average_pool_map(
                    [(n, [(0, n, n)]) for n in in_shape[2:]], True))]
            count = math.prod(in_shape[i] for i in axes)
            factor = math.sqrt(count) if op == "ReduceSum" else 1.0 / math.sqrt(count)
            return [b.linear(name, op, source, FixedMap(
                math.nextafter(factor * (1 + 2.0**-50), math.inf), f"{op} over {count} entries"))]
        if op == "Pad":
            mode = a.get("mode", b"constant")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            mode = {"edge": "replicate", "wrap": "circular"}.get(mode, mode)
            pads = a.get("pads")
            if pads is None:
                pads = [int(p) for p in self.constant(node, 1, "pads")]
            rank = len(in_shape)
            # opset 18: the pads cover only the axes listed in the optional fourth input
            axes = (range(rank) if len(node.input) < 4 or not node.input[3]
                    else [int(axis) % rank for axis in self.constant(node, 3, "axes")])
            lo, hi = [0] * rank, [0] * rank
            for k, axis in enumerate(axes):
                lo[axis], hi[axis] = pads[k], pads[k + len(axes)]
            return [b.linear(name, op, source, padding_map(in_shape, list(zip(lo, hi)), mode, f"{mode} padding"))]
        if op in _NORMALIZATIONS:
            gamma = self.constants.get(node.input[1]) if len(node.input) > 1 else None
            return [b.normalization(name, op, source, gamma, a.get("epsilon", 1e-5))]
        if op == "Attention":
            b.refuse(name, op, ATTENTION_REASON)
        b.refuse(name, op, "is an ONNX operator with no known Lipschitz rule")

    def _gated_activation(self, node):
        """Recognize x·g(x) exported from SiLU, Mish or GELU: (x, activation, scale)."""
        for x, gate in (node.input, reversed(node.input)):
            chain, tensor = [], gate
            while tensor != x and tensor in self.producers and len(chain) < 4:
                producer = self.producers[tensor]
                dynamic = [i for i in producer.input if i in self.values]
                if len(dynamic) != 1:
                    break
                others = [self.constants.get(i) for i in producer.input if i not in self.values]
                chain.append((producer.op_type, *[float(np.asarray(c).ravel()[0]) for c in others
                                                  if c is not None and np.asarray(c).size == 1]))
                tensor = dynamic[0]
            if tensor != x:
                continue
            chain.reverse()  # from x to the gate
            if chain == [("Sigmoid",)]:
                return x, "silu", 1.0
            if chain == [("Softplus",), ("Tanh",)]:
                return x, "mish", 1.0
            if (len(chain) == 3 and chain[0][0] == "Div" and abs(chain[0][1] - math.sqrt(2)) < 1e-6
                    and chain[1] == ("Erf",) and chain[2] == ("Add", 1.0)):
                return x, "gelu", 2.0  # x·(1 + erf(x/√2)) = 2·GELU(x)
        return None

    def _conv(self, node, a, in_shape) -> ConvMap:
        kernel = self.constant(node, 1, "weight")
        spatial = tuple(in_shape[2:])
        d = len(spatial)
        k = kernel.shape[2:]
        strides = tuple(a.get("strides", [1] * d))
        dilation = tuple(a.get("dilations", [1] * d))
        transposed = node.op_type == "ConvTranspose"
        auto_pad = a.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if transposed or auto_pad == "VALID":
            pads = ((0, 0),) * d  # a transposed conv's cropping only lowers the norm
        elif auto_pad in {"SAME_UPPER", "SAME_LOWER"}:
            pads = tuple(same_padding(n, k[i], strides[i], dilation[i]) for i, n in enumerate(spatial))
            if auto_pad == "SAME_LOWER":
                pads = tuple((after, before) for before, after in pads)
        else:
            flat = a.get("pads", [0] * 2 * d)
            pads = tuple((flat[i], flat[i + d]) for i in range(d))
        return ConvMap(kernel=kernel, input_spatial=spatial, stride=strides, padding=pads,
                       dilation=dilation, groups=a.get("group", 1), channel_axis=1,
                       transposed=transposed, output_padding=(0,) * d if transposed else ())

    def _average_pool(self, a, in_shape) -> FixedMap:
        k = a["kernel_shape"]
        d = len(k)
        strides = a.get("strides", [1] * d)
        flat = a.get("pads", [0] * 2 * d)
        auto_pad = a.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        axes = []
        for i, n in enumerate(in_shape[2:]):
            if auto_pad in {"SAME_UPPER", "SAME_LOWER"}:
                before, after = same_padding(n, k[i], strides[i])
                if auto_pad == "SAME_LOWER":
                    before, after = after, before
            else:
                before, after = flat[i], flat[i + d]
            axes.append((n, torch_pool_windows(n, k[i], strides[i], before, after,
                                               bool(a.get("ceil_mode", 0)))))
        return average_pool_map(axes, bool(a.get("count_include_pad", 0)))


def _norm(array) -> float:
    return float(np.linalg.norm(np.ravel(array)))
