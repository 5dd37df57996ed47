"""Which tensors a spectral constraint acts on, and the matrices (or operator) each one is.

A *target* is one parameter and how its norm is read:

``"matrix"``
    one matrix: a Linear weight, any other 2-D parameter, or a convolution kernel by
    torch's reshaped view (axis ``dim`` as rows, the rest flattened, as torch's spectral
    norm does);
``"stack"``
    a parameter of three or more axes that is not a convolution kernel (MoE experts,
    per-head weights): a stack of matrices over its leading axes, each capped on its own;
``"operator"``
    a convolution kernel read as the convolution itself on a given input shape
    (:func:`lipnorm.conv_operator`), stride, padding, dilation and groups included.

Embeddings, and every parameter with fewer than two axes (biases, norms' scales), are left
out of a module's targets unless named in ``include``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from lipnorm.conv import ConvOperator, conv_operator

__all__ = ["Target", "discover_targets"]

MODES = ("matrix", "operator")
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


@dataclasses.dataclass
class Target:
    """One constrained parameter.

    Attributes
    ----------
    name : str
        Its qualified name (``"blocks.0.attn.weight"``), or ``"param<i>"`` for an unnamed
        parameter given directly.
    param : torch.nn.Parameter
    kind : {"matrix", "stack", "operator"}
    dim : int
        ``"matrix"`` only: the axis kept as rows (1 for a transposed convolution's kernel).
    conv : dict, optional
        ``"operator"`` only: the keyword arguments of :func:`lipnorm.conv_operator` besides
        the kernel (``input_shape``, ``stride``, ``padding``, ...).
    """

    name: str
    param: nn.Parameter
    kind: str
    dim: int = 0
    conv: dict | None = None

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(m, n)`` of each matrix (``"matrix"`` and ``"stack"`` kinds)."""
        shape = tuple(self.param.shape)
        if self.kind == "stack":
            return shape[-2], shape[-1]
        rows = shape[self.dim]
        return rows, math.prod(shape) // rows

    @property
    def count(self) -> int:
        """How many matrices the parameter holds (1 unless it is a stack)."""
        return math.prod(self.param.shape[:-2]) if self.kind == "stack" else 1

    @property
    def index_shape(self) -> tuple[int, ...]:
        """The shape of the per-matrix results of a stack (``()`` for one matrix)."""
        return tuple(self.param.shape[:-2]) if self.kind == "stack" else ()

    def matrices(self) -> torch.Tensor:
        """The parameter's values as a ``(count, m, n)`` tensor (a view where possible)."""
        data = self.param.detach()
        if self.kind == "matrix":
            data = data.movedim(self.dim, 0)
        return data.reshape(self.count, *self.matrix_shape)

    def is_view(self, matrices: torch.Tensor) -> bool:
        """Whether ``matrices`` (from :meth:`matrices`) shares the parameter's memory."""
        return matrices.untyped_storage().data_ptr() == self.param.untyped_storage().data_ptr()

    def store(self, matrices: torch.Tensor) -> None:
        """Write all ``(count, m, n)`` matrices back into the parameter, in place."""
        with torch.no_grad():
            data = self.param.detach()
            if self.kind == "matrix":
                data = data.movedim(self.dim, 0)
            data.copy_(matrices.reshape(data.shape))

    def write_(self, rows: list[int], values: torch.Tensor) -> None:
        """Write ``(len(rows), m, n)`` values into matrices ``rows`` of the parameter, in place."""
        with torch.no_grad():
            matrices = self.matrices()
            view = self.is_view(matrices)
            if not view:
                matrices = matrices.clone()
            matrices[torch.as_tensor(rows, device=values.device)] = values
            if not view:
                self.store(matrices)

    def operator(self, kernel: torch.Tensor | None = None) -> ConvOperator:
        """``"operator"`` only: the convolution of ``kernel`` (default: the parameter)."""
        return conv_operator(self.param.detach() if kernel is None else kernel, **self.conv)

    def describe(self) -> str:
        """A short description, as in the constraint's ``repr``."""
        if self.kind == "stack":
            return f"{self.name}: stack of {self.count} matrices {self.matrix_shape[0]}x{self.matrix_shape[1]}"
        if self.kind == "operator":
            return f"{self.name}: convolution on inputs {tuple(self.conv['input_shape'])}"
        return f"{self.name}: matrix {self.matrix_shape[0]}x{self.matrix_shape[1]}"


def discover_targets(module_or_params, *, include: Sequence[str] = (), exclude: Sequence[str] = (),
                     mode: str = "matrix", input_shape=None) -> list[Target]:
    """The targets of a module (by the rules of the module docstring) or of given parameters.

    Parameters
    ----------
    module_or_params : torch.nn.Module or iterable
        A module, or parameters given directly: ``Parameter`` objects or ``(name,
        Parameter)`` pairs (``module.named_parameters()`` filtered, say), each of at least
        two axes; those of three or more axes are stacks.
    include, exclude : sequence of str
        Module only: qualified parameter names to add (embeddings, or any other tensor of at
        least two axes) or to leave out.
    mode : {"matrix", "operator"}
        How convolution kernels are read.
    input_shape : sequence of int or mapping of str to sequence of int, optional
        ``mode="operator"``: the shape of one input without the batch axis, ``(C, *spatial)``,
        of every convolution, or a mapping from each convolution's qualified module name to
        its input shape.

    Returns
    -------
    list of Target
        In the order of ``named_parameters()``; a parameter shared by several modules once.

    Raises
    ------
    TypeError
        Not a module nor an iterable of parameters.
    ValueError
        A named parameter with fewer than two axes, or complex; an unknown name in
        ``include``/``exclude``; an unknown ``mode``; ``mode="operator"`` without the input
        shape of a convolution, on a padding it does not support, or with parameters given
        directly; no parameter to constrain.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be 'matrix' or 'operator', got {mode!r}")
    if isinstance(module_or_params, nn.Module):
        targets = _module_targets(module_or_params, tuple(include), tuple(exclude), mode, input_shape)
    else:
        if include or exclude:
            raise ValueError("include= and exclude= apply to a module; with parameters given directly, "
                             "pass exactly the ones to constrain")
        if mode == "operator" or input_shape is not None:
            raise ValueError("mode='operator' reads each convolution from its module: pass the model, "
                             "not its parameters")
        targets = _explicit_targets(module_or_params)
    if not targets:
        raise ValueError("nothing to constrain: no Linear or convolution weight and no parameter of at "
                         "least two axes (embeddings are left out unless named in include=)")
    for target in targets:
        if target.param.is_complex() or not target.param.is_floating_point():
            raise ValueError(f"parameter {target.name!r} is {target.param.dtype}; spectral constraints "
                             "apply to real floating-point weights")
    return targets


def _explicit_targets(params) -> list[Target]:
    if isinstance(params, torch.Tensor) or not isinstance(params, Iterable):
        raise TypeError("SpectralConstraint expects a torch.nn.Module or an iterable of parameters "
                        f"(or of (name, parameter) pairs), got {type(params).__name__}")
    targets, seen = [], set()
    for position, item in enumerate(params):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, param = item
        else:
            name, param = f"param{position}", item
        if not isinstance(param, nn.Parameter):
            raise TypeError(f"{name!r} is a {type(param).__name__}, not a torch.nn.Parameter")
        if id(param) in seen:
            continue
        seen.add(id(param))
        _require_matrix(name, param)
        targets.append(Target(name, param, "stack" if param.ndim >= 3 else "matrix"))
    return targets


def _require_matrix(name: str, param: torch.Tensor) -> None:
    if param.ndim < 2:
        raise ValueError(f"parameter {name!r} has shape {tuple(param.shape)}: a spectral constraint "
                         "needs a matrix (two axes or more); leave biases and norms' scales out")


def _module_targets(module, include, exclude, mode, input_shape) -> list[Target]:
    owners = {}  # qualified name -> (owning module, its module name, parameter name)
    seen = set()
    for module_name, sub in module.named_modules():
        for param_name, param in sub.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            owners[f"{module_name}.{param_name}" if module_name else param_name] = (sub, module_name, param_name)
    for name in (*include, *exclude):
        if name not in owners:
            raise ValueError(f"{type(module).__name__} has no parameter {name!r}; its parameters of two "
                             f"axes or more: {', '.join(n for n, o in owners.items() if _param(o).ndim >= 2)}")
    shapes = _input_shapes(module, mode, input_shape)
    targets = []
    for name, (sub, module_name, param_name) in owners.items():
        param = sub._parameters[param_name]
        if name in exclude:
            continue
        if name in include:
            _require_matrix(name, param)
        elif param.ndim < 2 or isinstance(sub, _EMBEDDINGS):
            continue
        targets.append(_target_of(name, param, sub, module_name, param_name, mode, shapes))
    return targets


def _param(owner) -> torch.Tensor:
    sub, _, param_name = owner
    return sub._parameters[param_name]


def _target_of(name, param, sub, module_name, param_name, mode, shapes) -> Target:
    if isinstance(sub, _ConvNd) and param_name == "weight":
        if mode == "operator":
            if module_name not in shapes:
                raise ValueError(f"mode='operator' needs the input shape of convolution {module_name!r} "
                                 f"({type(sub).__name__}): pass input_shape={{{module_name!r}: (C, *spatial)}}")
            return Target(name, param, "operator", conv=_conv_arguments(sub, module_name, shapes[module_name]))
        return Target(name, param, "matrix", dim=1 if isinstance(sub, _ConvTransposeNd) else 0)
    return Target(name, param, "stack" if param.ndim >= 3 else "matrix")


def _input_shapes(module, mode, input_shape) -> dict[str, tuple[int, ...]]:
    """The input shape of every convolution, by qualified module name (operator mode)."""
    if mode != "operator":
        if input_shape is not None:
            raise ValueError("input_shape is only used by mode='operator'; drop it for mode='matrix'")
        return {}
    convs = [name for name, sub in module.named_modules() if isinstance(sub, _ConvNd)]
    if input_shape is None:
        return {}
    if isinstance(input_shape, Mapping):
        unknown = sorted(set(input_shape) - set(convs))
        if unknown:
            raise ValueError(f"input_shape names {unknown}, which are not convolutions of "
                             f"{type(module).__name__}; its convolutions: {convs}")
        return {name: tuple(int(s) for s in shape) for name, shape in input_shape.items()}
    return {name: tuple(int(s) for s in input_shape) for name in convs}


def _conv_arguments(conv: _ConvNd, name: str, input_shape: tuple[int, ...]) -> dict:
    """The arguments of :func:`lipnorm.conv_operator` for ``conv`` on inputs of ``input_shape``."""
    nd = len(conv.kernel_size)
    if len(input_shape) != nd + 1:
        raise ValueError(f"the input shape of convolution {name!r} must be (C, *spatial) with {nd + 1} "
                         f"entries, got {input_shape}")
    pads = conv._reversed_padding_repeated_twice
    pairs = [(pads[2 * i], pads[2 * i + 1]) for i in reversed(range(nd))]
    if conv.padding_mode == "circular":
        extents = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
        if any(lo + hi != extent or s != 1 for (lo, hi), extent, s in zip(pairs, extents, conv.stride)):
            raise ValueError(f"mode='operator' reads a circular convolution ({name!r}) only with stride 1 and "
                             "padding that keeps the size (2*padding = dilation*(kernel-1)); use mode='matrix'")
        padding = "circular"
    elif conv.padding_mode == "zeros":
        padding = pairs
    else:
        raise ValueError(f"mode='operator' supports zero and circular padding; {name!r} has "
                         f"padding_mode={conv.padding_mode!r}: use mode='matrix'")
    transposed = isinstance(conv, _ConvTransposeNd)
    return {"input_shape": input_shape, "stride": tuple(conv.stride), "padding": padding,
            "dilation": tuple(conv.dilation), "groups": conv.groups, "transposed": transposed,
            "output_padding": tuple(conv.output_padding) if transposed else 0}
