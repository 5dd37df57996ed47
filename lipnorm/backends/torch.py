"""Spectral normalization for PyTorch: a drop-in for ``torch.nn.utils.parametrizations.spectral_norm``.

``spectral_norm(module)`` makes ``module.<name>`` read as ``W / sigma(W)``, where ``sigma`` is
a power-iteration estimate of the largest singular value, with torch's arguments, defaults
and semantics (``mode="matrix"``), or of the convolution's true operator norm
(``mode="operator"``). Differences from torch's parametrization:

* Linear and convolution layers scale their *output* by ``1/sigma`` instead of forming
  ``W / sigma`` where the weight is larger than the input (same values and gradients, no
  weight-sized temporaries), and otherwise fold the gradient through sigma into a custom
  backward;
* ``sigma`` comes from the power iteration's own last product (no third matrix-vector
  product in training);
* a zero weight gives a zero output, not NaN; the power iteration runs in float32 under
  autocast and for half-precision weights;
* modules can be deep-copied and pickled whole; checkpoints of torch's parametrization and
  legacy spectral norm (every version) load into them;
* complex weights are normalized as torch does (``sigma = u^H W v``) through ``W / sigma``;
* exported (``torch.onnx.export``, either exporter, or ``torch.export``), a layer is the
  plain layer run with ``W / sigma`` from the stored u, v, with no power-iteration step;
* torch's parametrization API (``module.parametrizations``) is absent, and its use raises an
  error that names lipnorm's equivalent.

The state follows torch's legacy layout: parameter ``<name>_orig`` (the same Parameter
object the module had), buffers ``<name>_u`` and ``<name>_v``.

References
----------
Miyato, Kataoka, Koyama, Yoshida, "Spectral Normalization for Generative Adversarial
Networks", ICLR 2018.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from ._torch_checkpoint import lipnorm_keys, migrate_keys_, restore_legacy_v_
from ._torch_constraint import SpectralConstraint
from ._torch_layer_maps import ConvMap, LinearMap
from ._torch_scaled_map import normalized_layer
from ._torch_sigma import MatrixView, OperatorView, SigmaView, exporting, inner, update_sigma_

__all__ = ["spectral_norm", "remove_spectral_norm", "sigma_of", "sigmas", "warm_up", "SpectralNormSpec",
           "SpectralConstraint"]

#: Power-iteration steps run when u, v are (re)initialized, as torch does (pytorch#51800).
WARMUP_ITERATIONS = 15
#: The same for operator mode (Golub-Kahan-Lanczos steps): the top of a convolution's
#: spectrum is dense, so iterations converge slower than on a matrix (on DCGAN/ResNet-shaped
#: convolutions, 15 power steps leave sigma 3-4% low, 30 Golub-Kahan steps 0.03-0.07%);
#: it runs once per input shape.
OPERATOR_WARMUP_ITERATIONS = 100

_MODES = ("matrix", "operator")
_OUTPUT_SCALED_CLASSES = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)


@dataclass(frozen=True)
class SpectralNormSpec:
    """How one tensor of a module is normalized (stored on the module, picklable).

    Attributes
    ----------
    mode : {"matrix", "operator"}
    dim : int
        Axis kept as rows of the matrix view (non-negative); unused by ``"operator"``.
    n_power_iterations : int
        Power-iteration steps per training forward.
    eps : float
        Lower clamp of sigma and of the norms in the iteration.
    """

    mode: str
    dim: int
    n_power_iterations: int
    eps: float


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1,
                  eps: float = 1e-12, dim: int | None = None, *, mode: str = "matrix",
                  input_shape: Sequence[int] | None = None) -> nn.Module:
    """Normalize ``module.<name>`` by its largest singular value, in place.

    Parameters
    ----------
    module : torch.nn.Module
        The module; ``Linear`` and ``Conv*d`` / ``ConvTranspose*d`` get the fast
        output-scaling path, any other module (``Embedding``, ``Bilinear``, ...) reads the
        normalized tensor from ``module.<name>`` as with torch.
    name : str
        Name of the parameter to normalize.
    n_power_iterations : int
        Power-iteration steps per training forward, at least 1.
    eps : float
        Positive; clamps sigma and the norms in the power iteration from below.
    dim : int, optional
        Axis that becomes the rows of the matrix view: 0, or 1 for ``ConvTranspose*d`` (torch's
        default). Matrix mode only.
    mode : {"matrix", "operator"}
        ``"matrix"``: sigma of ``W`` reshaped to ``(shape[dim], -1)``, exactly torch's SN.
        ``"operator"``: sigma of the convolution as a linear map on the layer's input (stride,
        padding, dilation and groups included), estimated by ``n_power_iterations + 1``
        Golub-Kahan-Lanczos steps through the convolution and its adjoint per training
        forward (from below, like every Krylov estimate); ``u`` and ``v`` are shaped like one output and one input and are created at
        the first forward (or now, from ``input_shape``), with ``OPERATOR_WARMUP_ITERATIONS``
        warm-up steps (``WARMUP_ITERATIONS`` in matrix mode).
    input_shape : sequence of int, optional
        Operator mode only: the shape of one input without the batch axis, ``(C, H, W)``.

    Returns
    -------
    torch.nn.Module
        ``module`` itself, now normalized.

    Raises
    ------
    TypeError
        ``module`` is not a ``torch.nn.Module``.
    ValueError
        No parameter ``name``; already normalized (by lipnorm or torch); bad
        ``n_power_iterations``, ``eps`` or ``mode``; operator mode on a non-convolution.
    IndexError
        ``dim`` out of range.

    Example
    -------
    >>> import torch
    >>> from lipnorm.backends.torch import spectral_norm, sigma_of
    >>> _ = torch.manual_seed(0)
    >>> layer = spectral_norm(torch.nn.Linear(20, 40))
    >>> float(torch.linalg.matrix_norm(layer.weight.detach(), 2)) <= 1.0 + 1e-3
    True
    """
    spec = _validated_spec(module, name, n_power_iterations, eps, dim, mode, input_shape)
    weight = module._parameters[name]
    _rename_entry(module._parameters, name, name + "_orig")
    if mode == "matrix":
        u, v = MatrixView(spec.dim).initial_vectors(weight.detach())
    else:
        u, v = weight.new_empty(0), weight.new_empty(0)
    module.register_buffer(name + "_u", u)
    module.register_buffer(name + "_v", v)
    module._spectral_norm_specs = {**getattr(module, "_spectral_norm_specs", {}), name: spec}
    _set_class(module)
    if mode == "matrix":
        _estimate_sigma(module, name, MatrixView(spec.dim), WARMUP_ITERATIONS)
    elif input_shape is not None:
        _initialize_operator_vectors(module, name, OperatorView(_conv_map(module)), tuple(input_shape))
    return module


def remove_spectral_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Undo ``spectral_norm``: ``module.<name>`` becomes a plain parameter holding ``W / sigma``.

    The parameter is the same object as before (updated in place), so optimizers that hold
    it stay valid. ``u`` and ``v`` are not updated.

    Parameters
    ----------
    module : torch.nn.Module
        A module normalized by ``spectral_norm``.
    name : str
        The normalized tensor's name.

    Returns
    -------
    torch.nn.Module
        ``module`` itself.

    Raises
    ------
    ValueError
        ``module.<name>`` is not normalized by lipnorm.
    RuntimeError
        Operator mode before the first forward (sigma is not known yet).

    Example
    -------
    >>> layer = spectral_norm(torch.nn.Linear(3, 4))
    >>> param = layer.weight_orig
    >>> remove_spectral_norm(layer).weight is param
    True
    """
    _spec_of(module, name)
    with torch.no_grad():
        normalized = _normalized_tensor(module, name)
        param = module._parameters[name + "_orig"]
        param.copy_(normalized)
    del module._buffers[name + "_u"], module._buffers[name + "_v"]
    _rename_entry(module._parameters, name + "_orig", name)
    specs = dict(module._spectral_norm_specs)
    del specs[name]
    module._spectral_norm_specs = specs
    _set_class(module)
    if not specs:
        del module._spectral_norm_specs
    return module


def sigma_of(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """Return the current sigma estimate ``<u, A v>`` of ``module.<name>_orig`` (no update).

    Parameters
    ----------
    module : torch.nn.Module
        A module normalized by ``spectral_norm``.
    name : str
        The normalized tensor's name.

    Returns
    -------
    torch.Tensor
        0-d, detached, float32 (float64 for float64 and complex128 weights); for complex
        weights the real part of ``u^H A v`` (real up to rounding once u, v have converged).

    Raises
    ------
    ValueError
        ``module.<name>`` is not normalized by lipnorm.
    RuntimeError
        Operator mode before the first forward.

    Example
    -------
    >>> layer = spectral_norm(torch.nn.Linear(8, 8))
    >>> bool(sigma_of(layer) > 0)
    True
    """
    spec = _spec_of(module, name)
    with torch.no_grad():
        sigma = _estimate_sigma(module, name, _view_of(module, spec, name), 0)[2]
    return sigma.real if sigma.is_complex() else sigma


def sigmas(model: nn.Module) -> dict[str, float]:
    """Return ``{"<submodule>.<name>": sigma}`` for every tensor normalized by ``spectral_norm``.

    Operator-mode layers that have not seen an input yet are left out.

    Example
    -------
    >>> net = torch.nn.Sequential(spectral_norm(torch.nn.Linear(4, 4)), torch.nn.ReLU())
    >>> list(sigmas(net))
    ['0.weight']
    """
    return {
        f"{prefix}.{name}" if prefix else name: float(sigma_of(sub, name))
        for prefix, sub, name, _ in _initialized_tensors(model)
    }


def warm_up(model: nn.Module, iterations: int = WARMUP_ITERATIONS) -> None:
    """Run power-iteration steps on every tensor of ``model`` normalized by ``spectral_norm``.

    One step per training forward lets ``u``, ``v`` lag behind weights that move fast (a
    large learning rate), so the sigma inference divides by can sit below the weight's
    true norm. Call this at the end of training, or after loading new weights, so that
    inference divides by a converged sigma. ``u``, ``v`` are updated in place; operator-mode
    layers that have not seen an input yet are skipped.

    Parameters
    ----------
    model : torch.nn.Module
    iterations : int
        Steps per normalized tensor, at least 1.

    Example
    -------
    >>> net = torch.nn.Sequential(spectral_norm(torch.nn.Linear(4, 4)))
    >>> with torch.no_grad():
    ...     _ = net[0].weight_orig.mul_(3.0)
    >>> warm_up(net, 50)
    >>> round(float(torch.linalg.matrix_norm(net[0].weight.detach(), 2)), 4)
    1.0
    """
    iterations = _positive_integer(iterations, "iterations")
    for _, sub, name, spec in _initialized_tensors(model):
        _estimate_sigma(sub, name, _view_of(sub, spec, name), iterations)


def _initialized_tensors(model: nn.Module):
    """``(prefix, submodule, name, spec)`` of every normalized tensor whose u, v exist
    (operator-mode layers get theirs at their first input)."""
    for prefix, sub in model.named_modules():
        for name, spec in getattr(sub, "_spectral_norm_specs", {}).items():
            if spec.mode == "matrix" or getattr(sub, name + "_u").numel() > 0:
                yield prefix, sub, name, spec


# --------------------------------------------------------------------------- validation


def _positive_integer(value, name: str) -> int:
    """``value`` as an int, for a Python or NumPy integer >= 1 (not a bool); else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _validated_spec(module, name, n_power_iterations, eps, dim, mode, input_shape) -> SpectralNormSpec:
    if not isinstance(module, nn.Module):
        raise TypeError(f"spectral_norm expects a torch.nn.Module, got {type(module).__name__}")
    kind = type(module).__name__
    if name in getattr(module, "_spectral_norm_specs", {}):
        raise ValueError(f"{kind}.{name} already has spectral norm; call "
                         f"remove_spectral_norm(module, {name!r}) before registering it again")
    if torch.nn.utils.parametrize.is_parametrized(module, name):
        raise ValueError(f"{kind}.{name} is parametrized by torch (torch.nn.utils.parametrize); remove it "
                         f"with torch.nn.utils.parametrize.remove_parametrizations(module, {name!r}) first")
    if any(type(hook).__name__ == "SpectralNorm" and getattr(hook, "name", None) == name
           for hook in module._forward_pre_hooks.values()):
        raise ValueError(f"{kind}.{name} has torch's legacy spectral norm; remove it with "
                         f"torch.nn.utils.remove_spectral_norm(module, {name!r}) first")
    if not isinstance(module._parameters.get(name), nn.Parameter):
        params = ", ".join(module._parameters) or "none"
        raise ValueError(f"{kind} has no parameter named {name!r} (its parameters: {params}); "
                         f"pass name=... to pick one")
    n_power_iterations = _positive_integer(n_power_iterations, "n_power_iterations")
    if isinstance(eps, bool) or not (isinstance(eps, numbers.Real) and eps > 0):
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if mode not in _MODES:
        raise ValueError(f"mode must be 'matrix' or 'operator', got {mode!r}")
    ndim = module._parameters[name].ndim
    if mode == "operator":
        _check_operator_mode(module, name, dim)
        if input_shape is not None and len(input_shape) != ndim - 1:
            raise ValueError(f"input_shape must be one input without the batch axis, (C, *spatial) with "
                             f"{ndim - 1} entries, got {tuple(input_shape)}")
        return SpectralNormSpec("operator", 0, n_power_iterations, float(eps))
    if input_shape is not None:
        raise ValueError("input_shape is only used by mode='operator'; drop it for mode='matrix'")
    if dim is None:
        dim = 1 if isinstance(module, _ConvTransposeNd) else 0
    if not -max(ndim, 1) <= dim < max(ndim, 1):
        raise IndexError(f"dim must be in [{-max(ndim, 1)}, {max(ndim, 1) - 1}] for {kind}.{name} "
                         f"of shape {tuple(module._parameters[name].shape)}, got {dim}")
    return SpectralNormSpec("matrix", dim % max(ndim, 1), n_power_iterations, float(eps))


def _check_operator_mode(module, name, dim):
    kind = type(module).__name__
    if not isinstance(module, _ConvNd) or name != "weight":
        raise ValueError(f"mode='operator' normalizes a convolution's weight (Conv1d/2d/3d, "
                         f"ConvTranspose1d/2d/3d); {kind}.{name} is not one: use mode='matrix'")
    if _output_scaled_class(type(module)) is None:
        raise ValueError(f"mode='operator' needs the stock forward of a convolution; {kind} overrides it")
    if dim is not None:
        raise ValueError("dim is not used by mode='operator' (the operator acts on whole inputs); drop it")
    if module._parameters[name].is_complex():
        raise ValueError(f"mode='operator' does not support complex weights ({kind}.{name} is "
                         f"{module._parameters[name].dtype}); use mode='matrix'")
    _, pre_pad = _conv_padding(module)
    if pre_pad is not None:
        raise ValueError(f"mode='operator' supports zero padding given as integers or symmetric 'same'; "
                         f"{kind} has padding={module.padding!r}, padding_mode={module.padding_mode!r}: "
                         f"use mode='matrix' or zero padding")


def _spec_of(module, name) -> SpectralNormSpec:
    spec = getattr(module, "_spectral_norm_specs", {}).get(name)
    if spec is None:
        raise ValueError(f"{type(module).__name__}.{name} has no lipnorm spectral norm; "
                         f"register it with spectral_norm(module, {name!r})")
    return spec


# --------------------------------------------------------------------------- module class


class _SpectralNormMixin:
    """Forward, checkpoint loading and pickling of a module with spectrally normalized tensors."""

    def forward(self, *args, **kwargs):
        if type(self)._output_scaled and not self.weight_orig.is_complex():
            return _output_scaled_forward(self, *args, **kwargs)
        if self.training and not exporting():
            for name, spec in self._spectral_norm_specs.items():
                _estimate_sigma(self, name, _view_of(self, spec, name), spec.n_power_iterations)
        return super().forward(*args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name, spec in self._spectral_norm_specs.items():
            migrate_keys_(state_dict, prefix, name)
            restore_legacy_v_(state_dict, prefix, name, MatrixView(spec.dim))
            if spec.mode == "operator":
                _adopt_operator_vector_shapes(self, state_dict, prefix, name)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self):
        names = ", ".join(repr(name) for name in self._spectral_norm_specs)
        first = next(iter(self._spectral_norm_specs))
        note = (f"spectral_norm=[{names}] by lipnorm: undo with lipnorm.backends.torch."
                f"remove_spectral_norm(module, {first!r})")
        return ", ".join(filter(None, [super().extra_repr(), note]))

    def __getattr__(self, attribute):
        if attribute == "parametrizations":  # code written for torch.nn.utils.parametrize
            name = next(iter(self._spectral_norm_specs))
            raise AttributeError(
                f"{type(self).__name__} is normalized by lipnorm, not torch.nn.utils.parametrize, so it has "
                f"no .parametrizations: the original tensor is module.{name}_orig, u and v are "
                f"module.{name}_u and module.{name}_v, and lipnorm.backends.torch.remove_spectral_norm"
                f"(module, {name!r}) replaces remove_parametrizations")
        return super().__getattr__(attribute)

    def __reduce_ex__(self, protocol):
        return (_rebuild_normalized_module, (type(self)._spectral_norm_base, tuple(self._spectral_norm_specs)),
                self.__getstate__())


_NORMALIZED_CLASSES: dict[tuple[type, frozenset], type] = {}


def _normalized_class(base: type, names: frozenset) -> type:
    """Return (cached) ``base`` subclass whose attributes ``names`` read as normalized tensors."""
    key = (base, names)
    if key not in _NORMALIZED_CLASSES:
        attrs = {name: _normalized_property(name) for name in names}
        attrs["_spectral_norm_base"] = base
        attrs["_output_scaled"] = names == {"weight"} and _output_scaled_class(base) is not None
        _NORMALIZED_CLASSES[key] = type(f"SpectralNorm{base.__name__}", (_SpectralNormMixin, base), attrs)
    return _NORMALIZED_CLASSES[key]


def _normalized_property(name: str) -> property:
    def read(module):
        return _normalized_tensor(module, name)

    def write(module, value):
        raise AttributeError(f"{type(module).__name__}.{name} is spectrally normalized; assign to "
                             f"{name}_orig, or call remove_spectral_norm(module, {name!r}) first")

    return property(read, write, doc=f"``{name}_orig / sigma`` (computed on read, no u, v update).")


def _rebuild_normalized_module(base: type, names: tuple[str, ...]) -> nn.Module:
    cls = _normalized_class(base, frozenset(names))
    return cls.__new__(cls)


def _set_class(module: nn.Module) -> None:
    base = getattr(type(module), "_spectral_norm_base", type(module))
    names = frozenset(getattr(module, "_spectral_norm_specs", {}))
    module.__class__ = _normalized_class(base, names) if names else base


def _output_scaled_class(cls: type) -> type | None:
    """Return the stock class whose forward ``cls`` uses unchanged, if it gets output scaling."""
    for stock in _OUTPUT_SCALED_CLASSES:
        if (issubclass(cls, stock) and cls.forward is stock.forward
                and getattr(cls, "_conv_forward", None) is getattr(stock, "_conv_forward", None)):
            return stock
    return None


def _rename_entry(entries: dict, old: str, new: str) -> None:
    """Rename a key of a module's ``_parameters`` keeping its position (parameter order)."""
    items = [(new if key == old else key, value) for key, value in entries.items()]
    entries.clear()
    entries.update(items)


# --------------------------------------------------------------------------- sigma


def _iteration_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _view_of(module, spec: SpectralNormSpec, name: str) -> SigmaView:
    if spec.mode == "matrix":
        return MatrixView(spec.dim)
    if getattr(module, name + "_u").numel() == 0:
        raise RuntimeError(f"{type(module).__name__}.{name} uses mode='operator', whose u, v are shaped like "
                           f"the layer's input: run one forward first, or pass input_shape= to spectral_norm")
    return OperatorView(_conv_map(module, _vectors_output_padding(module)))


def _vectors_output_padding(module) -> tuple[int, ...] | None:
    """Return the output padding of the operator whose u, v the buffers hold, None for a
    convolution (a transposed one called with ``output_size`` may differ from its own)."""
    if not isinstance(module, _ConvTransposeNd):
        return None
    unpadded = _conv_map(module, (0,) * len(module.kernel_size)).output_spatial_shape(
        tuple(module.weight_v.shape[2:]), tuple(module.weight_orig.shape[2:]))
    return tuple(size - base for size, base in zip(module.weight_u.shape[2:], unpadded))


def _estimate_sigma(module, name: str, view: SigmaView, n_iterations: int):
    """Update the buffers by ``n_iterations`` steps (0: none; see ``update_sigma_``); return clones and sigma.

    Returns
    -------
    (u, v, sigma)
        Clones of the buffers in the iteration dtype (constants for autograd) and the
        unclamped 0-d ``sigma = <u, A v>`` at the current weight, without gradient.
    """
    spec = module._spectral_norm_specs[name]
    weight = getattr(module, name + "_orig")
    u_buffer, v_buffer = getattr(module, name + "_u"), getattr(module, name + "_v")
    dtype = _iteration_dtype(weight.dtype)
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        operand = view.operand(weight.detach().to(dtype))
        u, v = u_buffer.to(dtype), v_buffer.to(dtype)
        if n_iterations:
            sigma = update_sigma_(view, operand, u, v, n_iterations, spec.eps)
            if u_buffer.dtype != dtype:
                u_buffer.copy_(u)
                v_buffer.copy_(v)
        else:
            sigma = inner(u, view.matvec(operand, v))
    return u.clone(), v.clone(), sigma


def _normalized_tensor(module, name: str) -> torch.Tensor:
    """Return ``W / sigma`` with ``sigma = <u, A v>`` differentiable in ``W`` (torch's formula)."""
    spec = module._spectral_norm_specs[name]
    view = _view_of(module, spec, name)
    weight = getattr(module, name + "_orig")
    dtype = _iteration_dtype(weight.dtype)
    u = getattr(module, name + "_u").to(dtype, copy=True)
    v = getattr(module, name + "_v").to(dtype, copy=True)
    with torch.autocast(weight.device.type, enabled=False):
        sigma = _clamped(inner(u, view.matvec(view.operand(weight.to(dtype)), v)), spec.eps)
    if torch.onnx.is_in_onnx_export() and torch.jit.is_tracing():
        # The TorchScript exporter folds W / <number> into the weight, but not the products
        # sigma comes from: give it sigma as the number the stored u, v give.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return weight / sigma.item()
    return weight / sigma.to(weight.dtype)


def _clamped(sigma: torch.Tensor, eps: float) -> torch.Tensor:
    """``sigma`` clamped below by ``eps``; a complex ``sigma`` of modulus ``<= eps`` becomes ``eps``."""
    if sigma.is_complex():
        return torch.where(sigma.abs() > eps, sigma, torch.full_like(sigma, eps))
    return sigma.clamp_min(eps)


def _initialize_operator_vectors(module, name: str, view: OperatorView, input_shape: tuple[int, ...]) -> None:
    """Create operator-mode u, v for inputs of ``input_shape`` and run the warm-up iterations."""
    weight = getattr(module, name + "_orig").detach()
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        u, v = view.initial_vectors(weight.to(_iteration_dtype(weight.dtype)), input_shape)
    _reshape_buffer_(module, name + "_u", u)
    _reshape_buffer_(module, name + "_v", v)
    _estimate_sigma(module, name, view, OPERATOR_WARMUP_ITERATIONS)


def _reshape_buffer_(module, key: str, value: torch.Tensor) -> None:
    """Give buffer ``key`` the shape and values of ``value``, keeping the tensor object
    (DistributedDataParallel and optimizers hold references to buffers)."""
    buffer = module._buffers[key]
    with torch.no_grad():
        buffer.set_(value.to(dtype=buffer.dtype, device=buffer.device).clone())


def _adopt_operator_vector_shapes(module, state_dict, prefix: str, name: str) -> None:
    """Before loading an operator-mode checkpoint, give u, v the incoming shapes.

    Matrix-shaped vectors (from torch's SN or lipnorm's matrix mode) are dropped: u, v are
    re-created at the next forward.
    """
    keys = lipnorm_keys(prefix, name)
    incoming = state_dict.get(keys["u"])
    if not isinstance(incoming, torch.Tensor):
        return
    weight = getattr(module, name + "_orig")
    if incoming.ndim != weight.ndim:
        incoming = state_dict[keys["u"]] = state_dict[keys["v"]] = weight.new_empty(0)
    for role in ("u", "v"):
        _reshape_buffer_(module, name + "_" + role, weight.new_empty(state_dict[keys[role]].shape))


# --------------------------------------------------------------------------- fast forward


def _conv_padding(module: _ConvNd) -> tuple[tuple[int, ...], list[int] | None]:
    """Return ``(padding, pre_pad)``: integer padding for the convolution, and ``F.pad``
    amounts to apply first (non-zero padding modes, asymmetric ``'same'``), or None."""
    zeros = (0,) * len(module.kernel_size)
    if module.padding_mode != "zeros":
        return zeros, list(module._reversed_padding_repeated_twice)
    if isinstance(module.padding, str):
        pads = module._reversed_padding_repeated_twice
        left, right = pads[0::2], pads[1::2]
        if list(left) == list(right):
            return tuple(reversed(left)), None
        return zeros, list(pads)
    return tuple(module.padding), None


def _conv_map(module: _ConvNd, output_padding: Sequence[int] | None = None) -> ConvMap:
    padding, _ = _conv_padding(module)
    transposed = isinstance(module, _ConvTransposeNd)
    if output_padding is None:
        output_padding = module.output_padding if transposed else (0,) * len(module.kernel_size)
    return ConvMap(tuple(module.stride), padding, tuple(module.dilation), transposed,
                   tuple(output_padding), module.groups)


def _output_scaled_forward(module, input: torch.Tensor, output_size: Sequence[int] | None = None):
    """Forward of a normalized Linear / Conv / ConvTranspose: ``A_W(x) / sigma + b``.

    While the model is exported (``torch.onnx.export``, ``torch.export``) it is the plain
    layer run with ``W / sigma`` from the stored ``u``, ``v`` (no update), which an exporter
    writes as the layer's own operator with its weight scaled.
    """
    spec = module._spectral_norm_specs["weight"]
    export = exporting()
    if isinstance(module, nn.Linear):
        x, layer_map, unbatched = input, LinearMap(), False
    else:
        nd = len(module.kernel_size)
        unbatched = input.ndim == nd + 1
        x = input.unsqueeze(0) if unbatched else input
        output_padding = None
        if isinstance(module, _ConvTransposeNd):
            output_padding = module._output_padding(input, output_size, module.stride, module.padding,
                                                    module.kernel_size, nd, module.dilation)
        _, pre_pad = _conv_padding(module)
        if pre_pad is not None:
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, pre_pad, mode=mode)
        layer_map = _conv_map(module, output_padding)
    if spec.mode == "matrix":
        view = MatrixView(spec.dim)
    else:
        view = OperatorView(layer_map)
        # A new input size, or for a transposed convolution a new output_size, is a new operator.
        output_spatial = layer_map.output_spatial_shape(tuple(x.shape[2:]), tuple(module.weight_orig.shape[2:]))
        if (tuple(module.weight_v.shape[1:]) != tuple(x.shape[1:])
                or tuple(module.weight_u.shape[2:]) != output_spatial):
            if export:  # (sizes are tensors while tracing)
                raise ValueError(
                    f"{type(module).__name__} uses mode='operator' with u, v for inputs of shape "
                    f"{tuple(map(int, module.weight_v.shape[1:]))}, and is exported on inputs of shape "
                    f"{tuple(map(int, x.shape[1:]))}: "
                    f"its sigma depends on the input size; run the model once in eval mode on an input "
                    f"of the exported size before exporting")
            _initialize_operator_vectors(module, "weight", view, tuple(x.shape[1:]))
    if export:
        y = layer_map.apply(x, _normalized_tensor(module, "weight"), module.bias)
    else:
        u, v, sigma = _estimate_sigma(module, "weight", view, spec.n_power_iterations if module.training else 0)
        y = normalized_layer(x, module.weight_orig, module.bias, sigma.clamp_min(spec.eps), u, v, layer_map, view)
    return y.squeeze(0) if unbatched else y
