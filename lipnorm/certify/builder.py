"""Helpers that front ends share to add nodes to a :class:`~lipnorm.certify.graph.Graph`."""

from __future__ import annotations

import math

import numpy as np

from lipnorm.bounds import activation_lipschitz, activation_slope_range, round_up
from lipnorm.certify.errors import NotCertifiableError
from lipnorm.certify.graph import Concat, Graph, Linear, Lipschitz, Sum
from lipnorm.certify.layers import normalization_bound
from lipnorm.certify.linear import FixedMap, ScaleMap
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

    def user_rule(self, name: str, layer_type: str, layer, sources: list[str]) -> str | None:
        """Add a node for a user rule matching this layer; None when no rule matches.

        The rule bounds the layer as a map of all its input-dependent inputs together:
        a layer reading several is applied to their concatenation.
        """
        rule = lookup_rule(self.rules, name, layer_type)
        if rule is None or rule == EPSILON_RULE:
            return None
        bound = user_bound(rule, layer, name, layer_type)
        source = sources[0] if len(sources) == 1 else self.concat(f"{name}.inputs", layer_type, sources)
        return self.graph.add(name, layer_type, [source], Lipschitz(bound, "user rule"))

    def linear(self, name: str, layer_type: str, source: str, linear_map) -> str:
        return self.graph.add(name, layer_type, [source], Linear(linear_map))

    def lipschitz(self, name: str, layer_type: str, source: str, bound: float, method: str) -> str:
        return self.graph.add(name, layer_type, [source], Lipschitz(bound, method))

    def activation(self, name: str, layer_type: str, source: str, activation: str, **params) -> str:
        """Add an activation node; unknown activations are refused."""
        try:
            bound = activation_lipschitz(activation, **params)
            slope = activation_slope_range(activation, **params)
        except KeyError as error:
            raise NotCertifiableError(name, layer_type, f"uses an activation with no known "
                                      f"Lipschitz constant ({error.args[0]})") from None
        return self.graph.add(name, layer_type, [source],
                              Lipschitz(bound, f"activation {activation}", slope))

    def celu(self, name: str, layer_type: str, source: str, alpha: float) -> str:
        """CELU(α): 1-Lipschitz for α > 0; for α < 0 its slope e^{x/α} on x < 0 is unbounded."""
        if not alpha > 0:
            raise NotCertifiableError(name, layer_type, f"has alpha={alpha}; CELU is Lipschitz "
                                      "only for alpha > 0 (its slope is exp(x/alpha) for x < 0)")
        return self.activation(name, layer_type, source, "celu")

    def broadcast(self, name: str, layer_type: str, source: str, in_shape, out_shape) -> str:
        """An operand of an elementwise operation, broadcast to the output's shape.

        Broadcasting copies every entry the same number of times, numel(out)/numel(in),
        so its norm is the root of that. Returns ``source`` itself when nothing is copied.
        ``None`` dimensions (an unknown batch size) count as 1 on both sides.
        """
        copies = _numel(out_shape) // _numel(in_shape)
        if copies <= 1:
            return source
        return self.linear(f"{name}.broadcast", f"{layer_type} (broadcast)", source,
                           FixedMap(round_up(math.sqrt(copies)), f"broadcast to {copies} copies: √copies"))

    def reshape(self, name: str, layer_type: str, source: str, *, flat_identity: bool = False) -> str:
        """A reshape, permutation, slice or crop: norm ≤ 1 (blocks merging across it).

        ``flat_identity``: the layer keeps the row-major order of the entries (flatten,
        view, reshape, squeeze, unsqueeze), so it is the identity on flattened tensors.
        """
        if flat_identity:
            return self.linear(name, layer_type, source, FixedMap(1.0, "reshape (same entries)",
                                                                  flat_identity=True))
        return self.linear(name, layer_type, source, FixedMap(1.0, "reshape/permutation/slice"))

    def passthrough(self, name: str, layer_type: str, source: str) -> None:
        """A layer that returns its input (up to a constant shift): no node at all."""
        self.graph.alias(name, source)
        self.skipped.append((name, layer_type))

    def add_sum(self, name: str, layer_type: str, sources: list[str]) -> str:
        return self.graph.add(name, layer_type, sources, Sum())

    def difference(self, name: str, layer_type: str, sources: list[str], subtracted: list[bool]) -> str:
        """A sum whose operands flagged ``subtracted`` enter negated (``a − b``, or ``c − b``
        for a constant ``c``): the tight methods add the operands' maps, so the sign matters.
        """
        terms = [self.linear(f"{name}.negated{i}" if len(sources) > 1 else name, f"{layer_type} (negation)",
                             source, ScaleMap(np.asarray(-1.0), None)) if negated else source
                 for i, (source, negated) in enumerate(zip(sources, subtracted))]
        if len(terms) == 1:
            return terms[0]
        return self.add_sum(name, layer_type, terms)

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


def _numel(shape) -> int:
    return math.prod(1 if n is None else int(n) for n in shape)
