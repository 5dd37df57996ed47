"""PyTorch front end: ``torch.fx`` graph (or module order for a plain Sequential) → Graph.

Imports torch at its top; :func:`lipnorm.certify.certify` loads it only for torch models.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from lipnorm.bounds import max_pool_lipschitz
from lipnorm.certify.builder import ATTENTION_REASON, GraphBuilder
from lipnorm.certify.errors import NotCertifiableError
from lipnorm.certify.layers import (
    adaptive_pool_windows,
    average_pool_map,
    batch_norm_map,
    max_pool_bound,
    padding_map,
    selection_map,
    torch_pool_windows,
)
from lipnorm.certify.linear import ConvMap, DenseMap, FixedMap, ScaleMap
from lipnorm.certify.rules import lookup_rule

__all__ = ["build_graph"]

_ACTIVATION_MODULES = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid",
    nn.Hardtanh: "hardtanh", nn.Hardsigmoid: "hard_sigmoid", nn.Hardswish: "hard_swish",
    nn.Softplus: "softplus", nn.Softsign: "softsign", nn.LogSigmoid: "log_sigmoid",
    nn.Tanhshrink: "tanhshrink", nn.Softshrink: "softshrink",
    nn.SiLU: "silu", nn.Mish: "mish", nn.SELU: "selu", nn.Softmax: "softmax",
    nn.Softmax2d: "softmax", nn.Identity: None,
}
_ACTIVATION_FUNCTIONS = {
    "relu": "relu", "relu_": "relu", "relu6": "relu6", "tanh": "tanh", "sigmoid": "sigmoid",
    "hardtanh": "hardtanh", "hardsigmoid": "hard_sigmoid", "hardswish": "hard_swish",
    "softplus": "softplus", "softsign": "softsign", "logsigmoid": "log_sigmoid",
    "silu": "silu", "mish": "mish", "selu": "selu", "softmax": "softmax",
    "tanhshrink": "tanhshrink", "softshrink": "softshrink",
}
_RESHAPES = {"flatten", "reshape", "view", "permute", "transpose", "squeeze", "unsqueeze",
             "getitem", "narrow", "chunk", "split", "unbind", "movedim", "t", "flip", "roll",
             "expand_as_shape"}
#: Reshapes that keep the row-major order of the entries.
_FLAT_IDENTITIES = {"flatten", "reshape", "view", "squeeze", "unsqueeze"}
_PASSTHROUGH = {"contiguous", "clone", "dropout", "alpha_dropout", "feature_alpha_dropout",
                "dropout1d", "dropout2d", "dropout3d", "float", "detach", "to", "type_as",
                "_to_copy", "alias", "lift_fresh_copy"}
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout)
_NORMALIZATIONS = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                   nn.InstanceNorm3d, nn.RMSNorm)
_ACTIVE_DROPOUT_REASON = ("applies dropout (training mode), which is random and has no "
                         "Lipschitz constant; call model.eval() or pass training=False")
_ATTENTION = (nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoderLayer,
              nn.TransformerDecoderLayer, nn.TransformerEncoder, nn.TransformerDecoder)


def build_graph(model: nn.Module, input_shape: tuple[int, ...], rules=None):
    """Translate a PyTorch module into a graph of bounded nodes.

    Parameters
    ----------
    model : torch.nn.Module
        In eval mode.
    input_shape : tuple of int
        Shape of one input, without the batch axis.
    rules : mapping, optional
        See :func:`lipnorm.certify.certify`.

    Returns
    -------
    (GraphBuilder, tuple of int)
        The graph and the input shape it holds for.

    Raises
    ------
    NotCertifiableError
        For a layer without a sound rule, or a model that cannot be traced.
    """
    input_shape = tuple(int(n) for n in input_shape)
    return _build(model, input_shape, rules), input_shape


def _build(model: nn.Module, input_shape: tuple[int, ...], rules) -> GraphBuilder:
    if model.training and not isinstance(model, fx.GraphModule):
        raise ValueError("the model is in training mode (BatchNorm and dropout use batch "
                         "statistics); call model.eval() before certifying")
    example = torch.randn((1, *input_shape), generator=torch.Generator().manual_seed(0),
                          dtype=_parameter_dtype(model))
    tracer = _Tracer(rules)
    if tracer.is_leaf_module(model, ""):
        model = nn.Sequential(model)  # keep a lone layer as one module call
    if isinstance(model, fx.GraphModule):
        traced = model  # already a graph (e.g. torch.export's ExportedProgram.module())
    else:
        try:
            traced = fx.GraphModule(model, tracer.trace(model))
        except Exception as error:  # tracing raises many exception types on control flow
            if isinstance(model, nn.Sequential):
                return _sequential_graph(model, example, rules)
            raise _untraceable(model, rules, error) from error
    with torch.no_grad():
        ShapeProp(traced).propagate(example)
    translator = _FxTranslator(traced, rules)
    for node in traced.graph.nodes:
        translator.translate(node)
    return translator.builder


def _parameter_dtype(model: nn.Module) -> torch.dtype:
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


class _Tracer(fx.Tracer):
    """Keeps modules with a user rule (and lipnorm's SN layers) as single leaves."""

    def __init__(self, rules):
        super().__init__()
        self.rules = rules

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if lookup_rule(self.rules, qualified_name, type(module).__name__) is not None:
            return True
        if isinstance(module, _ATTENTION):
            return True
        if type(module).__module__.startswith("lipnorm.") and isinstance(
            module, (nn.Linear, nn.modules.conv._ConvNd)
        ):
            return True  # lipnorm's spectrally normalized layers: `.weight` reads W/σ
        return super().is_leaf_module(module, qualified_name)


def _untraceable(model: nn.Module, rules, error: Exception) -> NotCertifiableError:
    """Name the innermost submodule that torch.fx cannot trace."""
    culprit, culprit_type = "<model>", type(model).__name__
    for name, module in model.named_modules():
        if not name or lookup_rule(rules, name, type(module).__name__) is not None:
            continue
        try:
            _Tracer(rules).trace(module)
        except Exception:
            culprit, culprit_type = name, type(module).__name__
    return NotCertifiableError(
        culprit, culprit_type,
        f"cannot be traced by torch.fx ({type(error).__name__}: {str(error).splitlines()[0]}); "
        "data-dependent control flow has no static graph to bound",
    )


def _sequential_graph(model: nn.Sequential, example: torch.Tensor, rules) -> GraphBuilder:
    """Module order for a plain Sequential whose children fx cannot trace through."""
    builder = GraphBuilder(rules)
    translator = _ModuleTranslator(builder)
    source = builder.graph.input_name
    x = example
    with torch.no_grad():
        for name, module in _flat_children(model):
            y = module(x)
            source = translator.module(name, module, [source], tuple(x.shape), tuple(y.shape))
            builder.graph.record_shape(source, tuple(y.shape))
            x = y
    builder.graph.outputs = [source]
    return builder


def _flat_children(model: nn.Sequential, prefix: str = ""):
    for name, child in model.named_children():
        full = f"{prefix}{name}"
        if type(child) is nn.Sequential:
            yield from _flat_children(child, full + ".")
        else:
            yield full, child


class _ModuleTranslator:
    """Translates one leaf module, given its input and output shapes."""

    def __init__(self, builder: GraphBuilder):
        self.builder = builder

    def module(self, name: str, module: nn.Module, sources: list[str], in_shape, out_shape) -> str:
        b = self.builder
        kind = type(module).__name__
        added = b.user_rule(name, kind, module, sources)
        if added is not None:
            return added
        if isinstance(module, _ATTENTION):
            b.refuse(name, kind, ATTENTION_REASON)
        if len(sources) > 1:
            b.refuse(name, kind, "reads several input-dependent tensors")
        source = sources[0]
        rank = len(in_shape)
        if isinstance(module, nn.Linear):
            return b.linear(name, kind, source, DenseMap(_numpy(module.weight), rank - 1))
        if isinstance(module, nn.modules.conv._ConvNd):
            return self._conv(name, kind, module, source, in_shape)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.training:
                b.refuse(name, kind, "is in training mode (batch statistics); call model.eval()")
            if module.running_var is None:
                b.refuse(name, kind, "uses batch statistics even in eval mode "
                         "(track_running_stats=False), so it is not a fixed map")
            return b.linear(name, kind, source, batch_norm_map(
                None if module.weight is None else _numpy(module.weight),
                _numpy(module.running_var), module.eps, 1))
        if type(module) in _ACTIVATION_MODULES:
            activation = _ACTIVATION_MODULES[type(module)]
            if activation is None:
                b.passthrough(name, kind, source)
                return source
            return b.activation(name, kind, source, activation)
        if isinstance(module, nn.LeakyReLU):
            return b.activation(name, kind, source, "leaky_relu", negative_slope=module.negative_slope)
        if isinstance(module, nn.CELU):
            return b.celu(name, kind, source, module.alpha)
        if isinstance(module, nn.ELU):
            return b.activation(name, kind, source, "elu", alpha=module.alpha)
        if isinstance(module, nn.PReLU):
            return b.activation(name, kind, source, "prelu",
                                slopes=_numpy(module.weight))
        if isinstance(module, nn.GELU):
            return b.activation(name, kind, source,
                                "gelu_tanh" if module.approximate == "tanh" else "gelu")
        if isinstance(module, _DROPOUT):
            if module.training and module.p > 0:
                b.refuse(name, kind, _ACTIVE_DROPOUT_REASON)
            b.passthrough(name, kind, source)
            return source
        if isinstance(module, (nn.Flatten, nn.Unflatten)):
            return b.reshape(name, kind, source, flat_identity=True)
        if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            d = rank - 2
            return b.lipschitz(name, kind, source, max_pool_lipschitz(
                _tuple(module.kernel_size, d), _tuple(module.stride or module.kernel_size, d),
                _tuple(module.dilation, d)), "max pooling √m")
        if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            if getattr(module, "divisor_override", None):
                b.refuse(name, kind, "uses divisor_override, which lipnorm does not model")
            d = rank - 2
            k, s, p = (_tuple(v, d) for v in (module.kernel_size, module.stride or module.kernel_size,
                                              module.padding))
            axes = [(n, torch_pool_windows(n, k[i], s[i], p[i], p[i], module.ceil_mode))
                    for i, n in enumerate(in_shape[2:])]
            return b.linear(name, kind, source, average_pool_map(axes, module.count_include_pad))
        if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
            axes = [(n, adaptive_pool_windows(n, o)) for n, o in zip(in_shape[2:], out_shape[2:])]
            return b.linear(name, kind, source, average_pool_map(axes, True))
        if isinstance(module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
            axes = [(n, adaptive_pool_windows(n, o)) for n, o in zip(in_shape[2:], out_shape[2:])]
            return b.lipschitz(name, kind, source, max_pool_bound(axes), "max pooling √m")
        if isinstance(module, nn.modules.padding._ReflectionPadNd | nn.modules.padding._ReplicationPadNd
                      | nn.modules.padding._ConstantPadNd | nn.modules.padding._CircularPadNd):
            mode = ("reflect" if isinstance(module, nn.modules.padding._ReflectionPadNd) else
                    "replicate" if isinstance(module, nn.modules.padding._ReplicationPadNd) else
                    "circular" if isinstance(module, nn.modules.padding._CircularPadNd) else "constant")
            return b.linear(name, kind, source, _pad_map(in_shape, module.padding, mode))
        if isinstance(module, nn.Upsample) and module.mode == "nearest":
            sources = [np.floor(np.arange(o) * (n / o)).astype(int)
                       for n, o in zip(in_shape[2:], out_shape[2:])]
            return b.linear(name, kind, source, selection_map(sources, in_shape[2:],
                                                              "nearest upsampling √copies"))
        if isinstance(module, _NORMALIZATIONS):
            gamma = getattr(module, "weight", None)
            eps = module.eps
            if eps is None:  # RMSNorm's default: the machine epsilon of the dtype it runs in
                eps = torch.finfo(torch.float32 if gamma is None else gamma.dtype).eps
            return b.normalization(name, kind, source, None if gamma is None else _numpy(gamma), eps)
        b.refuse(name, kind)

    def _conv(self, name, kind, module, source, in_shape) -> str:
        b = self.builder
        d = len(in_shape) - 2
        spatial = tuple(in_shape[2:])
        k, s, dil = _tuple(module.kernel_size, d), _tuple(module.stride, d), _tuple(module.dilation, d)
        transposed = module.transposed
        if isinstance(module.padding, str):
            if module.padding == "valid":
                pads = ((0, 0),) * d
            else:  # "same": stride 1, total dilation·(k−1), extra on the right
                pads = tuple(((dil[i] * (k[i] - 1)) // 2,
                              dil[i] * (k[i] - 1) - (dil[i] * (k[i] - 1)) // 2) for i in range(d))
        else:
            pads = tuple((p, p) for p in _tuple(module.padding, d))
        if not transposed and module.padding_mode != "zeros":
            mode = {"reflect": "reflect", "replicate": "replicate", "circular": "circular"}[
                module.padding_mode]
            flat = [p for pair in reversed(pads) for p in pair]
            source = b.linear(f"{name}.pad", f"{kind}.padding_mode={mode}", source,
                              _pad_map(in_shape, tuple(flat), mode))
            spatial = tuple(n + a + c for n, (a, c) in zip(spatial, pads))
            b.graph.record_shape(source, (*in_shape[:2], *spatial))
            pads = ((0, 0),) * d
        return b.linear(name, kind, source, ConvMap(
            kernel=_numpy(module.weight), input_spatial=spatial, stride=s, padding=pads,
            dilation=dil, groups=module.groups, channel_axis=1, transposed=transposed,
            output_padding=_tuple(module.output_padding, d) if transposed else ()))


class _FxTranslator:
    """Walks a shape-annotated fx graph."""

    def __init__(self, traced: fx.GraphModule, rules):
        self.traced = traced
        self.builder = GraphBuilder(rules)
        self.modules = _ModuleTranslator(self.builder)
        self.dynamic: dict[str, str] = {}  # fx node name -> graph node name
        self.constants: dict[str, object] = {}
        self.seen_input = False

    def translate(self, node: fx.Node) -> None:
        b = self.builder
        if node.op == "placeholder":
            if self.seen_input:
                b.refuse(node.name, "placeholder", "is a second model input; certify supports one")
            self.seen_input = True
            self.dynamic[node.name] = b.graph.input_name
            return
        if node.op == "get_attr":
            self.constants[node.name] = _fetch_attr(self.traced, node.target)
            return
        if node.op == "output":
            outputs = [self.dynamic[n.name] for n in _flatten_nodes(node.args[0]) if n.name in self.dynamic]
            b.graph.outputs = outputs
            return
        sources = [self.dynamic[n.name] for n in _flatten_nodes((node.args, node.kwargs))
                   if n.name in self.dynamic]
        if not sources or not _is_tensor(node):
            return  # constant, or shape arithmetic
        name = str(node.target) if node.op == "call_module" else node.name
        if node.op == "call_module":
            module = self.traced.get_submodule(node.target)
            in_shape = _shape(node.args[0])
            self.dynamic[node.name] = self.modules.module(name, module, sources, in_shape, _shape(node))
        else:
            self.dynamic[node.name] = self._function(node, name, sources)
        b.graph.record_shape(self.dynamic[node.name], _shape(node))

    def _function(self, node: fx.Node, name: str, sources: list[str]) -> str:
        b = self.builder
        target = _target_name(node.target)
        kind = target
        args, kwargs = node.args, node.kwargs
        if target in {"add", "iadd", "sub", "isub"}:
            if kwargs.get("alpha", 1) != 1 and not (len(sources) == 1 and self._is_dynamic(args[0])):
                b.refuse(name, kind, "scales an input-dependent operand by alpha; write the scaling "
                         "as a separate multiplication")
            operands = self._broadcast_operands(node, name, kind)
            subtracted = [False] * len(operands)
            if target in {"sub", "isub"}:
                other = args[1] if len(args) > 1 else kwargs.get("other")
                subtracted = [n is other for n in _flatten_nodes((node.args, node.kwargs)) if self._is_dynamic(n)]
            if len(operands) > 1 or any(subtracted):
                return b.difference(name, kind, operands, subtracted)
            if operands[0] != sources[0]:  # shifted by a larger constant: the copies remain
                return operands[0]
            b.passthrough(name, f"{kind} (constant shift)", sources[0])
            return sources[0]
        if target in {"mul", "imul", "truediv", "div", "neg"}:
            if len(sources) > 1:
                b.refuse(name, kind, "multiplies two inputs-dependent tensors, which is not "
                         "globally Lipschitz")
            if kwargs.get("rounding_mode") is not None:
                b.refuse(name, kind, "rounds its result, which is discontinuous")
            factor = self._constant_factor(node, target)
            return b.linear(name, kind, self._broadcast_operands(node, name, kind)[0], factor)
        if target in {"cat", "concat", "concatenate", "stack", "hstack", "vstack"}:
            return b.concat(name, kind, sources)
        if target == "getitem" and isinstance(args[0].meta["tensor_meta"], TensorMetadata):
            return b.linear(name, kind, sources[0], self._indexing_map(node))
        if target in _RESHAPES:
            return b.reshape(name, kind, sources[0], flat_identity=target in _FLAT_IDENTITIES)
        if target in _PASSTHROUGH:
            if not _meta(node).dtype.is_floating_point:
                b.refuse(name, kind, "converts to a non-floating dtype, which rounds (discontinuous)")
            if "dropout" in target and self._dropout_is_active(node, name, kind):
                b.refuse(name, kind, _ACTIVE_DROPOUT_REASON)
            b.passthrough(name, kind, sources[0])
            return sources[0]
        if target in {"mean", "sum"}:
            dims = args[1] if len(args) > 1 else kwargs.get("dim")
            shape = _shape(args[0])
            dims = [dims] if isinstance(dims, int) else list(dims or ())
            if not dims:  # no dims, or an empty list: torch reduces over every axis
                dims = range(len(shape))
            count = math.prod(shape[d] for d in dims)
            factor = 1 / math.sqrt(count) if target == "mean" else math.sqrt(count)
            return b.linear(name, kind, sources[0], FixedMap(
                _round_up_ratio(factor), f"{target} over {count} entries"))
        if target in _ACTIVATION_FUNCTIONS:
            return b.activation(name, kind, sources[0], _ACTIVATION_FUNCTIONS[target])
        if target in {"leaky_relu", "leaky_relu_"}:
            slope = args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)
            return b.activation(name, kind, sources[0], "leaky_relu", negative_slope=slope)
        if target in {"celu", "celu_"}:
            return b.celu(name, kind, sources[0], args[1] if len(args) > 1 else kwargs.get("alpha", 1.0))
        if target in {"elu", "elu_"}:
            return b.activation(name, kind, sources[0], "elu",
                                alpha=args[1] if len(args) > 1 else kwargs.get("alpha", 1.0))
        if target == "gelu":
            return b.activation(name, kind, sources[0],
                                "gelu_tanh" if kwargs.get("approximate") == "tanh" else "gelu")
        if target in {"max_pool1d", "max_pool2d", "max_pool3d", "adaptive_avg_pool1d",
                      "adaptive_avg_pool2d", "adaptive_avg_pool3d", "avg_pool1d", "avg_pool2d",
                      "avg_pool3d", "pad", "linear", "dropout"}:
            return self._functional_layer(node, name, target, sources[0])
        if target in {"conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d",
                      "conv_transpose2d", "conv_transpose3d"}:
            return self._functional_conv(node, name, target, sources[0])
        if target in {"batch_norm", "_native_batch_norm_legit_no_training"}:
            return self._functional_batch_norm(node, name, target, sources[0])
        if target == "max_pool2d_with_indices":
            return self._functional_layer(node, name, "max_pool2d", sources[0])
        if target == "scaled_dot_product_attention":
            b.refuse(name, kind, ATTENTION_REASON)
        b.refuse(name, kind, "is an operation with no known Lipschitz rule")

    def _functional_layer(self, node, name, target, source):
        """Functional calls with the same meaning as a module: build that module."""
        args, kwargs = node.args, node.kwargs
        in_shape, out_shape = _shape(args[0]), _shape(node)
        if target.startswith("max_pool"):
            module = getattr(nn, f"MaxPool{target[-2:]}")(*args[1:], **kwargs)
        elif target.startswith("avg_pool"):
            module = getattr(nn, f"AvgPool{target[-2:]}")(*args[1:], **kwargs)
        elif target.startswith("adaptive_avg_pool"):
            module = getattr(nn, f"AdaptiveAvgPool{target[-2:]}")(*args[1:], **kwargs)
        elif target == "pad":
            pads = args[1] if len(args) > 1 else kwargs["pad"]
            mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
            return self.builder.linear(name, target, source, _pad_map(in_shape, pads, mode))
        else:  # linear
            weight = self._constant_arg(node, 1, "weight")
            return self.builder.linear(name, target, source, DenseMap(weight, len(in_shape) - 1))
        return self.modules.module(name, module, [source], in_shape, out_shape)

    def _functional_conv(self, node, name, target, source):
        """F.conv*d / aten.conv*d / aten.convolution with a constant kernel."""
        args = list(node.args) + [None] * 9
        kwargs = node.kwargs
        in_shape = _shape(node.args[0])
        d = len(in_shape) - 2
        kernel = self._constant_arg(node, 1, "weight")
        transposed = target.startswith("conv_transpose")
        if target == "convolution":  # (x, w, b, stride, padding, dilation, transposed, output_padding, groups)
            stride, padding, dilation = args[3], args[4], args[5]
            transposed, output_padding, groups = bool(args[6]), args[7], args[8]
        elif transposed:  # (x, w, b, stride, padding, output_padding, groups, dilation)
            stride, padding, output_padding = args[3], args[4], args[5]
            groups, dilation = args[6], args[7]
        else:  # (x, w, b, stride, padding, dilation, groups)
            stride, padding, dilation, groups = args[3], args[4], args[5], args[6]
            output_padding = 0
        stride = kwargs.get("stride", stride if stride is not None else 1)
        padding = kwargs.get("padding", padding if padding is not None else 0)
        dilation = kwargs.get("dilation", dilation if dilation is not None else 1)
        groups = kwargs.get("groups", groups if groups is not None else 1)
        if isinstance(padding, str):
            self.builder.refuse(name, target, "uses string padding in functional form; use the module")
        return self.builder.linear(name, target, source, ConvMap(
            kernel=kernel, input_spatial=tuple(in_shape[2:]), stride=_tuple(stride, d),
            padding=tuple((p, p) for p in _tuple(padding, d)), dilation=_tuple(dilation, d),
            groups=int(groups), channel_axis=1, transposed=transposed,
            output_padding=_tuple(output_padding or 0, d) if transposed else ()))

    def _functional_batch_norm(self, node, name, target, source):
        """F.batch_norm, torch.batch_norm (aten's argument order) or the exported
        _native_batch_norm_legit_no_training, read by argument name."""
        named = self._named_arguments(node, name, target)
        if named.get("training"):
            self.builder.refuse(name, target, "runs in training mode (batch statistics)")
        gamma = None if named.get("weight") is None else self._constant(node, named["weight"], "weight")
        return self.builder.linear(name, target, source, batch_norm_map(
            gamma, self._constant(node, named["running_var"], "running_var"), named["eps"], 1))

    def _named_arguments(self, node, name, target) -> dict:
        """A call's arguments by parameter name, defaults included."""
        arguments = node.normalized_arguments(self.traced, normalize_to_only_use_kwargs=True)
        if arguments is None:
            self.builder.refuse(name, target, "has arguments lipnorm cannot match to a signature")
        return arguments.kwargs

    def _dropout_is_active(self, node, name, target) -> bool:
        named = self._named_arguments(node, name, target)
        return bool(named.get("training", named.get("train"))) and named.get("p", 0.5) > 0

    def _indexing_map(self, node) -> FixedMap:
        """Indexing a tensor: √(most copies of one entry), from indexing the entries' positions.

        Basic indexing (integers, slices, None) copies nothing; advanced indexing copies
        an entry once per repetition of its index.
        """
        in_shape = _shape(node.args[0])
        positions = torch.arange(math.prod(in_shape)).reshape(in_shape)
        index = fx.node.map_arg(node.args[1], lambda n: self._constant_tensor(node, n, "index"))
        taken = positions[index].reshape(-1).numpy()
        return selection_map([taken], [positions.numel()], "indexing √copies")

    def _broadcast_operands(self, node, name, kind) -> list[str]:
        """The input-dependent operands of an elementwise call, broadcast to its output's shape."""
        return [self.builder.broadcast(name, kind, self.dynamic[n.name], _shape(n), _shape(node))
                for n in _flatten_nodes((node.args, node.kwargs)) if self._is_dynamic(n)]

    def _is_dynamic(self, value) -> bool:
        return isinstance(value, fx.Node) and value.name in self.dynamic

    def _constant_arg(self, node, index, keyword):
        value = node.args[index] if len(node.args) > index else node.kwargs.get(keyword)
        return self._constant(node, value, keyword)

    def _constant(self, node, value, what) -> np.ndarray:
        return _numpy(self._constant_tensor(node, value, what))

    def _constant_tensor(self, node, value, what):
        if isinstance(value, fx.Node) and value.name in self.constants:
            return self.constants[value.name]
        self.builder.refuse(node.name, str(node.target), f"has a {what} that is not a constant")

    def _constant_factor(self, node, target):
        """The constant operand of a multiplication/division as a ScaleMap or FixedMap."""
        if target == "neg":
            return ScaleMap(np.asarray(-1.0), None)
        others = [a for a in node.args if not (isinstance(a, fx.Node) and a.name in self.dynamic)]
        value = others[0] if others else None
        if isinstance(value, fx.Node):
            value = self.constants.get(value.name)
        if isinstance(value, torch.Tensor):
            value = _numpy(value)
        if value is None or isinstance(value, fx.Node):
            self.builder.refuse(node.name, target, "multiplies by a value lipnorm cannot resolve")
        value = np.asarray(value, dtype=np.float64)
        divides = target in {"truediv", "div"}
        numerator = node.args[0]
        if divides and not (isinstance(numerator, fx.Node) and numerator.name in self.dynamic):
            self.builder.refuse(node.name, target, "divides by an input-dependent tensor, "
                                "which is not globally Lipschitz")
        if divides:
            if np.any(value == 0):
                self.builder.refuse(node.name, target, "divides by zero")
            value = 1.0 / value
            if value.ndim == 0:
                return ScaleMap(value, None, error=float(abs(value)) * 2.0**-52)
        if value.ndim == 0:
            return ScaleMap(value, None)
        return FixedMap(_round_up_ratio(float(np.max(np.abs(value))) * (1 + 2.0**-51)),
                        "max |constant factor|")


def _target_name(target) -> str:
    """A call's name: method name, function name, or an aten op's name without namespace."""
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def _round_up_ratio(value: float) -> float:
    return math.nextafter(value * (1 + 2.0**-50), math.inf)


def _pad_map(in_shape, pads, mode) -> FixedMap:
    """F.pad order: pads = (last_before, last_after, second_last_before, ...)."""
    pairs = [(0, 0)] * len(in_shape)
    for i in range(len(pads) // 2):
        pairs[len(in_shape) - 1 - i] = (pads[2 * i], pads[2 * i + 1])
    return padding_map(in_shape, pairs, mode)


def _is_tensor(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None


def _shape(node) -> tuple[int, ...]:
    return tuple(_meta(node).shape)


def _meta(node) -> TensorMetadata:
    meta = node.meta.get("tensor_meta")
    while not isinstance(meta, TensorMetadata):  # a tuple of outputs: the first one
        meta = meta[0]
    return meta


def _flatten_nodes(value):
    if isinstance(value, fx.Node):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _flatten_nodes(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _flatten_nodes(item)


def _fetch_attr(module: nn.Module, target: str):
    value = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _numpy(tensor) -> np.ndarray:
    array = tensor.detach().cpu().to(torch.float64).numpy() if isinstance(tensor, torch.Tensor) \
        else np.asarray(tensor, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError("a weight has NaN or infinite entries; no finite bound exists")
    return array


def _tuple(value, d: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * d
