"""Convolution layers as linear operators, with exact and certified spectral norms.

``conv_operator`` builds the operator; ``ConvOperator.sigma_bounds`` gives a certified
interval for its norm (exact for circular padding, tight for zero padding), and
``ConvOperator.exact_sigma`` the exact norm of a circular convolution.
"""

from lipnorm.conv.operator import ConvOperator, conv_operator

__all__ = ["ConvOperator", "conv_operator"]
