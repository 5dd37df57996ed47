"""Certified bounds of a classifier's logit differences, computed once per model.

For classes y < j the functional ``x ↦ f_y(x) − f_j(x)`` is the row ``e_y − e_j`` applied
to the logits; one :func:`lipnorm.certify` call with all these rows bounds every pair (the
product method combines the rows with the last dense layer, ‖w_y − w_j‖·L_body; ``chain``
and ``sdp`` are tighter where they apply). A second call bounds the whole output, the
global L of the form margin / (√2 L) that other libraries use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lipnorm.bounds import round_up
from lipnorm.certify.api import certify
from lipnorm.certify.certificate import Certificate

__all__ = ["LogitBounds", "logit_bounds", "pair_rows", "sqrt2_times"]


@dataclass(frozen=True)
class LogitBounds:
    """Certified Lipschitz bounds of the logit differences of one classifier.

    Attributes
    ----------
    pairwise : ndarray, shape (classes, classes)
        ``pairwise[y, j]`` bounds the Lipschitz constant of ``f_y − f_j`` (symmetric, zero
        diagonal): the smaller of the pair's certified bound and √2·``global_upper``.
    global_upper : float
        Certified bound of the Lipschitz constant of the whole output ``f``.
    input_shape : tuple of int
        One input's shape (without batch) the bounds hold for.
    pairwise_certificate, global_certificate : Certificate
        The two certificates the bounds come from (``verify()`` checks them again).
    """

    pairwise: np.ndarray
    global_upper: float
    input_shape: tuple[int, ...]
    pairwise_certificate: Certificate
    global_certificate: Certificate

    @property
    def classes(self) -> int:
        """Number of outputs of the classifier."""
        return self.pairwise.shape[0]

    def global_pairwise(self) -> np.ndarray:
        """√2·L for every pair, the bound the global-L radius uses (zero diagonal)."""
        return np.full_like(self.pairwise, sqrt2_times(self.global_upper)) * (1 - np.eye(self.classes))


def sqrt2_times(value: float) -> float:
    """√2·value rounded up: the bound of every f_y − f_j from a bound of f."""
    return round_up(math.sqrt(2.0) * value * (1 + 2.0**-52))


def pair_rows(classes: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Rows ``e_y − e_j`` for every pair y < j, and the pairs in the same order."""
    pairs = [(y, j) for y in range(classes) for j in range(y + 1, classes)]
    rows = np.zeros((len(pairs), classes))
    for index, (y, j) in enumerate(pairs):
        rows[index, y], rows[index, j] = 1.0, -1.0
    return rows, pairs


def logit_bounds(model, input_shape, classes: int, *, method: str = "auto", time_budget: float = 10.0,
                 rules=None) -> LogitBounds:
    """Certify the pairwise and the global bounds of a classifier's logit differences.

    Parameters
    ----------
    model : torch.nn.Module, keras.Model, onnx.ModelProto or path to a .onnx file
    input_shape : tuple of int
        One input's shape without batch, in the model's layout.
    classes : int
        Number of outputs (at least 2).
    method, time_budget, rules
        As for :func:`lipnorm.certify`; each of the two certificates gets ``time_budget``.

    Returns
    -------
    LogitBounds

    Raises
    ------
    NotCertifiableError
        From :func:`lipnorm.certify`, unchanged, for a model it refuses.
    """
    rows, pairs = pair_rows(classes)
    pairwise_certificate = certify(model, input_shape, method=method, time_budget=time_budget,
                                   rules=rules, rows=rows)
    global_certificate = certify(model, input_shape, method=method, time_budget=time_budget, rules=rules)
    ceiling = sqrt2_times(float(global_certificate.upper))
    pairwise = np.zeros((classes, classes))
    for (y, j), value in zip(pairs, pairwise_certificate.row_upper):
        pairwise[y, j] = pairwise[j, y] = min(float(value), ceiling)
    return LogitBounds(pairwise, float(global_certificate.upper), tuple(int(n) for n in input_shape),
                       pairwise_certificate, global_certificate)
