"""Logits of a torch, Keras or ONNX classifier on a batch of inputs, in the model's own dtype.

The inputs are cast to the dtype the model computes in (torch: its first floating
parameter; Keras: its input's dtype; ONNX: the graph input's element type) and fed in
batches; the logits come back as float64 NumPy arrays. Nothing here is certified: the
radii account for the evaluation's rounding with :data:`EVALUATION_TOLERANCE`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lipnorm.certify.formats import model_format
from lipnorm.certify.inputs import onnx_graph_input

__all__ = ["EVALUATION_TOLERANCE", "evaluate_logits", "input_dtype", "logit_function", "to_numpy"]

#: Stated bound of a model's evaluation error, relative to ``1 + max_j |f_j(x)|``, by the
#: dtype it computes in (about 2000 units in the last place for float32 and 64 for
#: float16): far above what a feed-forward classifier of moderate depth loses to rounding.
EVALUATION_TOLERANCE = {"float64": 2.0**-40, "float32": 2.0**-12, "float16": 2.0**-5, "bfloat16": 2.0**-2}


def to_numpy(array, what: str) -> np.ndarray:
    """A NumPy view of a NumPy, torch, TensorFlow or JAX array (moved to the host).

    Raises
    ------
    TypeError
        For an object that is not an array of numbers.
    """
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    try:
        result = np.asarray(array)
    except Exception as error:
        raise TypeError(f"{what} must be an array, got {type(array).__name__}") from error
    if result.dtype.kind not in "biuf":
        raise TypeError(f"{what} must hold real numbers, got dtype {result.dtype}")
    return result


def input_dtype(model) -> np.dtype:
    """The floating dtype the model computes in, as a NumPy dtype."""
    kind = model_format(model)
    if kind == "torch":
        import torch

        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return np.dtype(str(dtype).removeprefix("torch."))
    if kind == "keras":
        import keras

        inputs = getattr(model, "inputs", None)
        name = inputs[0].dtype if inputs else getattr(model, "compute_dtype", "float32")
        return np.dtype(keras.backend.standardize_dtype(name))
    element = onnx_graph_input(model).type.tensor_type.elem_type
    import onnx

    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(element))


def evaluate_logits(model, x: np.ndarray, *, batch_size: int = 256,
                    progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """The model's outputs on ``x``, batch by batch, as a float64 array ``(N, classes)``.

    Parameters
    ----------
    model : torch.nn.Module, keras.Model, onnx.ModelProto or path to a .onnx file
        In inference mode.
    x : ndarray, shape (N, *input_shape)
        Already in the model's dtype (:func:`input_dtype`).
    batch_size : int
    progress : callable, optional
        Called as ``progress(done, total)`` after each batch.

    Returns
    -------
    ndarray, shape (N, number of outputs), float64
    """
    run = logit_function(model)
    outputs = []
    for start in range(0, len(x), batch_size):
        out = np.asarray(run(x[start:start + batch_size]), dtype=np.float64)
        outputs.append(out.reshape(out.shape[0], -1))
        if progress is not None:
            progress(min(start + batch_size, len(x)), len(x))
    if not outputs:
        return np.zeros((0, 0))
    return np.concatenate(outputs)


def logit_function(model) -> Callable[[np.ndarray], np.ndarray]:
    """A function from a batch in the model's dtype to the model's outputs (one session for ONNX)."""
    kind = model_format(model)
    if kind == "torch":
        import torch

        if model.training and not isinstance(model, torch.fx.GraphModule):
            raise ValueError("the model is in training mode; call model.eval() first")

        device = next((p.device for p in model.parameters()), torch.device("cpu"))

        def run(batch):
            with torch.no_grad():
                return model(torch.from_numpy(np.ascontiguousarray(batch)).to(device)).cpu().numpy()
        return run
    if kind == "keras":
        import keras

        return lambda batch: keras.ops.convert_to_numpy(model(batch, training=False))
    import onnxruntime

    from lipnorm.certify.onnx_frontend import load_onnx

    proto = load_onnx(model)
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    declared = onnx_graph_input(proto).type.tensor_type.shape.dim
    step = declared[0].dim_value if declared and declared[0].HasField("dim_value") else None
    name = onnx_graph_input(proto).name

    def run(batch):
        # a graph exported with a fixed batch size takes the inputs that many at a time
        chunks = [batch] if step is None else [batch[i:i + step] for i in range(0, len(batch), step)]
        return np.concatenate([session.run(None, {name: np.ascontiguousarray(c)})[0] for c in chunks])
    return run
