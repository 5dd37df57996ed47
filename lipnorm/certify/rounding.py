"""Rounding-error bounds shared by the certificate's float64 computations.

``gamma(n)`` is Higham's γ_n = n·u/(1 − n·u) (u = 2⁻⁵³), doubled as a safety factor, as in
:mod:`lipnorm.certificates`: the relative error bound of a sum of n rounded products.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from lipnorm.bounds import round_up

__all__ = ["UNIT_ROUNDOFF", "frobenius_upper", "gamma", "sqrt_upper", "vector_norm_upper"]

UNIT_ROUNDOFF = 2.0**-53


def gamma(count: int) -> float:
    """2·γ_count: bounds the relative rounding of a dot product of ``count`` terms."""
    return 2 * count * UNIT_ROUNDOFF / (1 - count * UNIT_ROUNDOFF)


def frobenius_upper(matrix: np.ndarray) -> float:
    """An upper bound of the Frobenius norm of ``matrix`` (its computation's rounding included)."""
    return round_up(float(np.linalg.norm(np.ravel(matrix))) * (1 + gamma(np.size(matrix) + 1)))


def vector_norm_upper(vector: np.ndarray) -> float:
    """An upper bound of the Euclidean norm of a vector."""
    return frobenius_upper(vector)


def sqrt_upper(value: float) -> float:
    """The smallest float whose square is at least ``value`` (≥ 0)."""
    root = math.sqrt(value)
    while Fraction(root) ** 2 < Fraction(value):
        root = math.nextafter(root, math.inf)
    return root
