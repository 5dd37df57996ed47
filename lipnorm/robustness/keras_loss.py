"""Margin-aware training loss for Keras 3 classifiers (any backend), meant to be certified.

The same loss as :mod:`lipnorm.robustness.torch_loss` (see there for the idea and the
references), written with ``keras.ops`` so it runs on every Keras backend: each wrong logit
is raised by ``eps · L_yj`` before the cross-entropy, or (``kind="hinge"``)
``max(0, eps · L_yj − (f_y − f_j))`` is penalised, with L_yj = ‖w_y − w_j‖ · body_bound
from the columns of the last Dense layer's kernel.
"""

from __future__ import annotations

import keras
from keras import ops

__all__ = ["MarginLoss", "pairwise_column_distances"]

KINDS = ("cross_entropy", "hinge")


def pairwise_column_distances(kernel) -> object:
    """``‖k_i − k_j‖`` for the columns of a ``(features, classes)`` Dense kernel, differentiably."""
    difference = ops.expand_dims(kernel, 2) - ops.expand_dims(kernel, 1)
    squared = ops.sum(ops.square(difference), axis=0)
    classes = ops.shape(kernel)[1]
    off_diagonal = 1.0 - ops.eye(classes, dtype=kernel.dtype)
    return ops.sqrt(ops.maximum(squared, 1e-30)) * off_diagonal


class MarginLoss(keras.losses.Loss):
    """Loss that trains the margins certified radius ``eps`` needs (integer labels).

    Parameters
    ----------
    eps : float
        The L2 radius to train for (> 0).
    last_layer : keras.layers.Dense
        The classifier's last layer (no activation: the model outputs logits).
    body_bound : float
        Lipschitz bound of the network before ``last_layer`` assumed while training.
    temperature : float
        The logits are divided by it before the cross-entropy.
    kind : {"cross_entropy", "hinge"}

    Example
    -------
    >>> model.compile("adam", loss=MarginLoss(0.5, model.layers[-1]))   # doctest: +SKIP
    """

    def __init__(self, eps: float, last_layer, *, body_bound: float = 1.0, temperature: float = 0.25,
                 kind: str = "cross_entropy", name: str = "margin_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        if not eps > 0 or not body_bound > 0 or not temperature > 0:
            raise ValueError(f"eps, body_bound and temperature must be positive, got {eps!r}, "
                             f"{body_bound!r}, {temperature!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if len(getattr(getattr(last_layer, "kernel", None), "shape", ())) != 2:
            raise TypeError("last_layer must be the classifier's last Dense layer (a 2-D kernel)")
        self.eps, self.last_layer, self.body_bound = float(eps), last_layer, float(body_bound)
        self.temperature, self.kind = float(temperature), kind

    def call(self, y_true, y_pred):
        """Per-sample loss of logits ``(batch, classes)`` with integer labels ``(batch,)``."""
        kernel = ops.cast(self.last_layer.kernel, y_pred.dtype)
        pairwise = pairwise_column_distances(kernel) * self.body_bound
        labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        required = self.eps * ops.take(pairwise, labels, axis=0)      # zero at the true class
        if self.kind == "hinge":
            true_logit = ops.take_along_axis(y_pred, ops.expand_dims(labels, 1), axis=1)
            return ops.sum(ops.relu(required - (true_logit - y_pred)), axis=1)
        return keras.losses.sparse_categorical_crossentropy(labels, (y_pred + required) / self.temperature,
                                                            from_logits=True)
