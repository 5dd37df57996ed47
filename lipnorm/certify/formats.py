"""Which framework a model comes from, told without importing any."""

from __future__ import annotations

__all__ = ["model_format"]


def model_format(model) -> str:
    """``"torch"``, ``"keras"`` or ``"onnx"``, from the modules of the model's classes.

    Nothing is imported: a user's subclass of ``torch.nn.Module`` has ``torch.nn...`` in
    its method resolution order.

    Parameters
    ----------
    model : torch.nn.Module, keras.Model, onnx.ModelProto, or a path to a ``.onnx`` file

    Returns
    -------
    str

    Raises
    ------
    TypeError
        For any other object.
    """
    modules = [cls.__module__ or "" for cls in type(model).__mro__]
    if isinstance(model, str) or hasattr(model, "__fspath__"):
        if str(model).endswith(".onnx"):
            return "onnx"
        raise TypeError(f"certify() reads model files ending in .onnx only, got {str(model)!r}; "
                        "load other formats first (from lipnorm.certify.cli import load_model)")
    for prefix, kind in (("torch", "torch"), ("keras", "keras"), ("tf_keras", "keras"),
                         ("onnx", "onnx")):
        if any(module == prefix or module.startswith(prefix + ".") for module in modules):
            return kind
    raise TypeError(
        f"certify() takes a torch.nn.Module, a keras.Model or an ONNX model, got {type(model)!r}"
    )
