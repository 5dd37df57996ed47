"""Certify a network's Lipschitz upper bound (PyTorch, Keras, ONNX), with a lower bound.

Importing this package imports no framework; the front end for a model's format is
imported when :func:`certify` meets such a model.
"""

from lipnorm.certify.api import certify
from lipnorm.certify.certificate import Certificate, LayerBound
from lipnorm.certify.errors import NotCertifiableError
from lipnorm.certify.lower import LowerBound, lipschitz_lower_bound

__all__ = [
    "Certificate",
    "LayerBound",
    "LowerBound",
    "NotCertifiableError",
    "certify",
    "lipschitz_lower_bound",
]
