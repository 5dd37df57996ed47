"""What the loop transformation needs of a nonlinear unit, in every view of a network.

A unit φ with slopes in ``[a, b]`` is split as ``φ(z) = m z + ψ(z)`` with the midpoint
``m = (a + b)/2`` and ``ψ`` Lipschitz with constant ``(b − a)/2``; a unit known only by its
Lipschitz bound (max pooling, a user rule) has ``m = 0`` and ``ψ = φ``. The dense view
(:class:`lipnorm.certify.network.Unit`) and the torus view
(:class:`lipnorm.certify.torus.TorusUnit`) share these two numbers through :class:`LoopUnit`.
"""

from __future__ import annotations

__all__ = ["LoopUnit"]


class LoopUnit:
    """Midpoint and radius of a unit with attributes ``slope`` (``(a, b)`` or None) and
    ``bound`` (its Lipschitz bound)."""

    slope: tuple[float, float] | None
    bound: float

    @property
    def midpoint(self) -> float:
        """m = (a + b)/2 of the loop transformation (0 for an opaque unit)."""
        return 0.0 if self.slope is None else (self.slope[0] + self.slope[1]) / 2

    @property
    def radius(self) -> float:
        """Lipschitz bound of ψ(z) = φ(z) − m z: (b − a)/2, or the bound of an opaque unit."""
        return self.bound if self.slope is None else (self.slope[1] - self.slope[0]) / 2
