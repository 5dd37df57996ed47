"""lipnorm: the spectral norm of neural-network weights, for every array library.

``import lipnorm`` imports no deep-learning framework: each backend is loaded
only when an array or model of that framework is met.
"""

from lipnorm.certificates import SigmaInterval
from lipnorm.sigma import ConvergenceWarning, SigmaState, estimate_sigma, sigma_bounds

__version__ = "0.1.0"

__all__ = [
    "ConvergenceWarning",
    "SigmaInterval",
    "SigmaState",
    "__version__",
    "estimate_sigma",
    "sigma_bounds",
]
