"""lipnorm: the spectral norm of neural-network weights, for every array library.

``import lipnorm`` imports no deep-learning framework: each backend is loaded
only when an array or model of that framework is met.
"""

from lipnorm.certificates import SigmaInterval
from lipnorm.certify import (
    Certificate,
    NotCertifiableError,
    certify,
    lipschitz_lower_bound,
)
from lipnorm.conv import conv_operator
from lipnorm.robustness import RobustnessReport, certified_accuracy, certified_radius, robustness
from lipnorm.sigma import ConvergenceWarning, SigmaState, estimate_sigma, sigma_bounds

__version__ = "0.1.0"

__all__ = [
    "Certificate",
    "ConvergenceWarning",
    "NotCertifiableError",
    "RobustnessReport",
    "SigmaInterval",
    "SigmaState",
    "__version__",
    "certified_accuracy",
    "certified_radius",
    "certify",
    "conv_operator",
    "estimate_sigma",
    "lipschitz_lower_bound",
    "robustness",
    "sigma_bounds",
]
