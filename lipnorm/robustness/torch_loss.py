"""Margin-aware training loss for PyTorch classifiers meant to be certified.

Cross-entropy leaves a Lipschitz network small margins; this loss asks every logit
difference f_y − f_j to exceed ``eps · L_yj``, the margin that certifies radius ``eps``.
It raises each wrong logit by ``eps · L_yj`` before the cross-entropy (GloRo-style,
Leino et al. 2021; Tsuzuku et al. 2018), or (``kind="hinge"``) penalises
``max(0, eps · L_yj − (f_y − f_j))``. During training L_yj is ``‖w_y − w_j‖ · body_bound``,
from the last linear layer's rows and a bound of the body before it (1 for a body of
spectrally normalized layers and 1-Lipschitz activations): differentiable and cheap. The
radii of the trained model come from :func:`lipnorm.certified_radius`, which certifies the
bounds instead of assuming them.

References
----------
K. Leino, Z. Wang, M. Fredrikson, "Globally-Robust Neural Networks", ICML 2021, §3.
Y. Tsuzuku, I. Sato, M. Sugiyama, "Lipschitz-Margin Training", NeurIPS 2018, §4.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MarginLoss", "pairwise_row_distances"]

KINDS = ("cross_entropy", "hinge")


def pairwise_row_distances(weight: torch.Tensor) -> torch.Tensor:
    """``‖w_i − w_j‖`` for the rows of a ``(classes, features)`` weight, differentiably.

    The square root is taken of the squared distance clamped away from 0 so the diagonal
    (0) has a finite gradient.
    """
    squared = (weight[:, None, :] - weight[None, :, :]).square().sum(dim=-1)
    off_diagonal = 1 - torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return torch.sqrt(squared.clamp_min(torch.finfo(weight.dtype).tiny)) * off_diagonal


class MarginLoss(nn.Module):
    """Loss that trains the margins certified radius ``eps`` needs.

    Parameters
    ----------
    eps : float
        The L2 radius to train for (> 0); usually somewhat above the radius to certify.
    last_layer : torch.nn.Linear
        The classifier's last layer (its weight gives the rows w_y).
    body_bound : float
        Lipschitz bound of the network before ``last_layer`` assumed while training.
    temperature : float
        The logits are divided by it before the cross-entropy (Lipschitz networks have
        small logits; a temperature below 1 sharpens the softmax).
    kind : {"cross_entropy", "hinge"}

    Example
    -------
    >>> loss = MarginLoss(1.0, model[-1])                        # doctest: +SKIP
    >>> loss(model(images), labels).backward()                   # doctest: +SKIP
    """

    def __init__(self, eps: float, last_layer: nn.Linear, *, body_bound: float = 1.0,
                 temperature: float = 0.25, kind: str = "cross_entropy"):
        super().__init__()
        if not eps > 0 or not body_bound > 0 or not temperature > 0:
            raise ValueError(f"eps, body_bound and temperature must be positive, got {eps!r}, "
                             f"{body_bound!r}, {temperature!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not isinstance(getattr(last_layer, "weight", None), torch.Tensor) or last_layer.weight.ndim != 2:
            raise TypeError("last_layer must be the classifier's last linear layer (a 2-D weight)")
        self.eps, self.last_layer, self.body_bound = float(eps), last_layer, float(body_bound)
        self.temperature, self.kind = float(temperature), kind

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The mean loss of a batch of logits ``(batch, classes)`` with int labels ``(batch,)``."""
        pairwise = pairwise_row_distances(self.last_layer.weight) * self.body_bound
        required = self.eps * pairwise[labels]          # zero at the true class
        if self.kind == "hinge":
            margins = logits.gather(1, labels[:, None]) - logits
            return torch.relu(required - margins).sum(dim=1).mean()
        return nn.functional.cross_entropy((logits + required) / self.temperature, labels)
