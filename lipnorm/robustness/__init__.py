"""Certified robustness: per-sample L2 radii, certified accuracy, a report beside an attack.

Importing this package imports no framework; the model's own framework is imported when
a function meets the model (and foolbox only for ``attack=True``). The margin losses for
training live in :mod:`lipnorm.robustness.torch_loss` and :mod:`lipnorm.robustness.keras_loss`,
which import their framework.
"""

from lipnorm.robustness.bounds import LogitBounds, logit_bounds
from lipnorm.robustness.radii import CertifiedPredictions, certified_accuracy, certified_radius
from lipnorm.robustness.report import RobustnessReport, robustness

__all__ = [
    "CertifiedPredictions",
    "LogitBounds",
    "RobustnessReport",
    "certified_accuracy",
    "certified_radius",
    "logit_bounds",
    "robustness",
]
