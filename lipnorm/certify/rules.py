"""User-supplied rules: bounds for layers lipnorm cannot bound itself.

``rules`` maps a layer's name or its type name to either a float (a Lipschitz bound the
user vouches for), a callable ``layer -> float``, or the string ``"epsilon"`` to accept
the (huge) global bound max|γ|/√ε of a LayerNorm/GroupNorm/InstanceNorm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from lipnorm.certify.errors import NotCertifiableError

__all__ = ["EPSILON_RULE", "Rules", "lookup_rule", "user_bound"]

EPSILON_RULE = "epsilon"

Rules = Mapping[str, "float | Callable[[object], float] | str"]


def lookup_rule(rules: Rules | None, name: str, layer_type: str):
    """The rule for a layer, by name first, then by type name; None if there is none."""
    if not rules:
        return None
    if name in rules:
        return rules[name]
    return rules.get(layer_type)


def user_bound(rule, layer, name: str, layer_type: str) -> float:
    """Evaluate a float or callable rule into a checked bound.

    Raises
    ------
    NotCertifiableError
        If the rule gives something that is not a finite non-negative number.
    """
    value = rule(layer) if callable(rule) else rule
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise NotCertifiableError(
            name, layer_type, f"has a rule that gave {value!r}, not a finite non-negative bound"
        )
    return value
