"""The input a model takes: one sample's shape, and a check that names it beside the shape given.

Certified radii and the lower-bound search feed a model the user's arrays; an array of the
wrong shape should fail with both shapes named, not with an error from deep inside a layer
(``mat1 and mat2 shapes cannot be multiplied``). Keras and ONNX models declare their input;
a torch model is read from the layer that takes its input, and is run once on a sample of
the given shape, so a mismatch further in (a spatial size a later linear layer cannot take)
is reported the same way.
"""

from __future__ import annotations

from lipnorm.certify.formats import model_format

__all__ = ["check_input_shape", "expected_input_shape", "format_shape", "onnx_graph_input"]

#: A shape entry any size fits.
ANY = None


def expected_input_shape(model) -> tuple | None:
    """One input's shape without the batch axis, as far as the model fixes it.

    Parameters
    ----------
    model : torch.nn.Module, keras.Model, onnx.ModelProto or path to a .onnx file

    Returns
    -------
    tuple or None
        Entries are sizes, or None where any size fits; a leading ``...`` stands for any
        number of leading axes (a torch model that opens with a linear layer fixes only the
        last axis). None when the model fixes nothing: a torch model whose input goes to
        another kind of layer first, a Keras model without a declared input.

    Example
    -------
    >>> import torch                                                   # doctest: +SKIP
    >>> expected_input_shape(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)))  # doctest: +SKIP
    (3, None, None)
    """
    kind = model_format(model)
    if kind == "keras":
        inputs = getattr(model, "inputs", None)
        return tuple(inputs[0].shape[1:]) if inputs else None
    if kind == "onnx":
        dims = onnx_graph_input(model).type.tensor_type.shape.dim
        return tuple(d.dim_value if d.HasField("dim_value") else ANY for d in dims[1:])
    return _torch_first_layer_shape(model)


def onnx_graph_input(model):
    """The ``ValueInfoProto`` of an ONNX model's (first) input that is not an initializer.

    Parameters
    ----------
    model : onnx.ModelProto or path to a .onnx file
    """
    from lipnorm.certify.onnx_frontend import load_onnx

    graph = load_onnx(model).graph
    initializers = {tensor.name for tensor in graph.initializer}
    return next(i for i in graph.input if i.name not in initializers)


def check_input_shape(model, shape, given: str = "x has samples of shape") -> None:
    """Refuse samples of ``shape`` that ``model`` cannot take, naming both shapes.

    Parameters
    ----------
    model : torch.nn.Module, keras.Model, onnx.ModelProto or path to a .onnx file
    shape : tuple of int
        One sample's shape, without the batch axis.
    given : str
        How the error introduces ``shape``: ``"x has samples of shape"``, ``"input_shape is"``.

    Raises
    ------
    ValueError
        ``shape`` does not fit :func:`expected_input_shape`; for a torch model, also when
        the model fails on one sample of ``shape`` (torch's message is kept).
    """
    shape = tuple(int(n) for n in shape)
    expected = expected_input_shape(model)
    if expected is not None and not _fits(shape, expected):
        raise ValueError(f"the model takes samples of shape {format_shape(expected)}, {given} {shape}")
    if model_format(model) == "torch":
        _run_torch_once(model, shape, given, expected)


def format_shape(shape: tuple) -> str:
    """A shape as text, ``None`` entries as ``any`` and a leading ``...`` kept: ``(..., 64)``."""
    entries = ["..." if entry is Ellipsis else "any" if entry is ANY else str(entry) for entry in shape]
    return f"({entries[0]},)" if len(entries) == 1 else f"({', '.join(entries)})"


def _fits(shape: tuple[int, ...], expected: tuple) -> bool:
    if expected and expected[0] is Ellipsis:
        fixed = expected[1:]
        return len(shape) >= len(fixed) and _fits(shape[len(shape) - len(fixed):], fixed)
    return len(shape) == len(expected) and all(e is ANY or e == n for e, n in zip(expected, shape))


def _torch_first_layer_shape(model) -> tuple | None:
    """The input a torch model's first layer fixes: channels and rank of a convolution, the
    features of a linear layer (following ``nn.Sequential`` to its first layer)."""
    from torch import nn

    first = model
    while isinstance(first, nn.Sequential) and len(first) > 0:
        first = first[0]
    if isinstance(first, nn.Linear):
        return (Ellipsis, first.in_features)
    if isinstance(first, nn.modules.conv._ConvNd):
        return (first.in_channels, *([ANY] * len(first.kernel_size)))
    return None


def _run_torch_once(model, shape: tuple[int, ...], given: str, expected: tuple | None) -> None:
    """Run the model on one zero sample of ``shape``; a failure becomes a ValueError naming it.

    A model in training mode is not run (it would update BatchNorm statistics and spectral
    norms); the callers refuse it.
    """
    import torch

    if model.training:
        return
    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = torch.float32 if parameter is None else parameter.dtype
    device = torch.device("cpu") if parameter is None else parameter.device
    try:
        with torch.no_grad():
            model(torch.zeros((1, *shape), dtype=dtype, device=device))
    except (RuntimeError, ValueError, IndexError) as error:
        where = "" if expected is None else (f" its first layer takes samples of shape "
                                             f"{format_shape(expected)}, and the model fails on this one:")
        raise ValueError(f"{given} {shape}, which the model does not take:{where} {error}") from error
