"""The empirical side: accuracy under a standard L2 attack from foolbox.

Torch models and Keras models (on the TensorFlow or torch backend, which foolbox can
differentiate) are attacked with foolbox's ``L2PGD`` (projected gradient descent in the L2
ball, random start). ONNX graphs give foolbox no gradients and are not attacked. An attack's success is an upper bound on
robust accuracy, so ``certified <= empirical <= clean`` at every eps.

Reference: J. Rauber, R. Zimmermann, M. Bethge, W. Brendel, "Foolbox Native: fast adversarial
attacks to benchmark the robustness of machine learning models in PyTorch, TensorFlow, and
JAX", JOSS 5(53), 2020.
"""

from __future__ import annotations

import numpy as np

from lipnorm.certify.formats import model_format

__all__ = ["ATTACKS", "attack_success", "check_attackable"]

#: The attack used for each model format.
ATTACKS = {"torch": "foolbox L2PGD", "keras": "foolbox L2PGD"}


def attack_success(model, inputs: np.ndarray, labels: np.ndarray, eps: np.ndarray, *,
                   domain: tuple[float, float] | None = None, steps: int = 100,
                   seed: int = 0) -> np.ndarray:
    """Where the attack finds an input within each ``eps`` that the model misclassifies.

    Parameters
    ----------
    model : torch.nn.Module, keras.Model, onnx.ModelProto or path to a .onnx file
    inputs : ndarray, shape (N, *input_shape)
        In the model's dtype.
    labels : ndarray of int64, shape (N,)
    eps : ndarray, shape (E,)
        L2 radii.
    domain : (float, float), optional
        Box the adversarial inputs stay in (e.g. ``(0, 1)`` for images); default: a box
        wider than every L2 ball around the inputs, i.e. no constraint.
    steps : int
        Iterations of the attack.
    seed : int
        Seed of the random starts.

    Returns
    -------
    ndarray of bool, shape (N, E)
        True where an adversarial input was found (always True for a misclassified sample).

    Raises
    ------
    ImportError
        Without foolbox (the message says how to install it).
    ValueError
        For an ONNX model, or Keras on a backend other than TensorFlow and torch.
    """
    try:
        import foolbox
    except ImportError as error:
        raise ImportError("attack=True needs foolbox: pip install foolbox") from error
    eps = np.asarray(eps, dtype=np.float64).reshape(-1)
    if domain is None:
        reach = float(np.max(eps, initial=0.0)) + 1.0
        domain = (float(np.min(inputs)) - reach, float(np.max(inputs)) + reach)
    check_attackable(model)
    kind = model_format(model)
    attack = foolbox.attacks.L2PGD(steps=steps)
    if kind == "torch" or _keras_backend() == "torch":
        import torch

        torch.manual_seed(seed)
        fmodel = foolbox.PyTorchModel(model, bounds=domain, device="cpu")
        x, y = torch.from_numpy(inputs), torch.from_numpy(labels)
    elif _keras_backend() == "tensorflow":
        import tensorflow as tf

        tf.random.set_seed(seed)
        fmodel = foolbox.TensorFlowModel(model, bounds=domain, device="/cpu:0")
        x, y = tf.constant(inputs), tf.constant(labels)
    else:
        raise ValueError(f"attack=True supports Keras on the TensorFlow and torch backends, not "
                         f"{_keras_backend()!r}")
    _, _, success = attack(fmodel, x, y, epsilons=[float(e) for e in eps])
    return np.asarray(success.cpu() if hasattr(success, "cpu") else success).T.astype(bool)


def check_attackable(model) -> None:
    """Refuse, before any work, a model the attack cannot differentiate (ONNX).

    Raises
    ------
    ValueError
    """
    if model_format(model) == "onnx":
        raise ValueError("attack=True needs a differentiable model: attack the torch or Keras model the "
                         "ONNX file was exported from (foolbox has no gradients of an ONNX graph)")


def _keras_backend() -> str:
    import keras

    return keras.backend.backend()
