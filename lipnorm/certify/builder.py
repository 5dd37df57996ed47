"""Helpers that front ends share to add nodes to a :class:`~lipnorm.certify.graph.Graph`."""

from __future__ import annotations

from lipnorm.bounds import activation_lipschitz
from lipnorm.certify.errors import NotCertifiableError
from lipnorm.certify.graph import Concat, Graph, Linear, Lipschitz, Sum
from lipnorm.certify.layers import normalization_bound
from lipnorm.certify.linear import FixedMap
from lipnorm.certify.rules import EPSILON_RULE, Rules, lookup_rule, user_bound

__all__ = ["GraphBuilder"]

ATTENTION_REASON = (
    "is dot-product attention, which is not globally Lipschitz (Kim, Papamakarios, Mnih, "
    "ICML 2021)"
)
NORMALIZATION_REASON = (
    "is a normalization over features whose only global bound is max|γ|/√ε (≈316·max|γ| at "
    "ε=1e-5); pass rules={{{name!r}: 'epsilon'}} to accept that bound"
)


class GraphBuilder:
    """A graph under construction plus the user's rules and the list of skipped layers.

    Parameters
    ----------
    rules : mapping, optional
        See :mod:`lipnorm.certify.rules`.
    """

    def __init__(self, rules: Rules | None):
        self.graph = Graph("input")
        self.rules = rules
        self.skipped: list[tuple[str, str]] = []

    def user_rule(self, name: str, layer_type: str, layer, source: str) -> str | None:
        """Add a node for a user rule matching this layer; None when no rule matches."""
        rule = lookup_rule(self.rules, name, layer_type)
        if rule is None or rule == EPSILON_RULE:
            return None
        bound = user_bound(rule, layer, name, layer_type)
        return self.graph.add(name, layer_type, [source], Lipschitz(bound, "user rule"))

    def linear(self, name: str, layer_type: str, source: str, linear_map) -> str:
        return self.graph.add(name, layer_type, [source], Linear(linear_map))

    def lipschitz(self, name: str, layer_type: str, source: str, bound: float, method: str) -> str:
        return self.graph.add(name, layer_type, [source], Lipschitz(bound, method))

    def activation(self, name: str, layer_type: str, source: str, activation: str, **params) -> str:
        """Add an activation node; unknown activations are refused."""
        try:
            bound = activation_lipschitz(activation, **params)
        except KeyError as error:
            raise NotCertifiableError(name, layer_type, f"uses an activation with no known "
                                      f"Lipschitz constant ({error.args[0]})") from None
        return self.lipschitz(name, layer_type, source, bound, f"activation {activation}")

    def reshape(self, name: str, layer_type: str, source: str) -> str:
        """A reshape, permutation, slice or crop: norm ≤ 1 (blocks merging across it)."""
        return self.linear(name, layer_type, source, FixedMap(1.0, "reshape/permutation/slice"))

    def passthrough(self, name: str, layer_type: str, source: str) -> None:
        """A layer that returns its input (up to a constant shift): no node at all."""
        self.graph.alias(name, source)
        self.skipped.append((name, layer_type))

    def add_sum(self, name: str, layer_type: str, sources: list[str]) -> str:
        return self.graph.add(name, layer_type, sources, Sum())

    def concat(self, name: str, layer_type: str, sources: list[str]) -> str:
        return self.graph.add(name, layer_type, sources, Concat())

    def normalization(self, name: str, layer_type: str, source: str, gamma, eps: float) -> str:
        """LayerNorm/GroupNorm/InstanceNorm: refused unless the user opted in."""
        if lookup_rule(self.rules, name, layer_type) != EPSILON_RULE:
            raise NotCertifiableError(name, layer_type, NORMALIZATION_REASON.format(name=name))
        return self.lipschitz(name, layer_type, source, normalization_bound(gamma, eps),
                              "max|γ|/√ε (opt-in)")

    @staticmethod
    def refuse(name: str, layer_type: str, reason: str = "has no known Lipschitz rule"):
        raise NotCertifiableError(name, layer_type, reason)
