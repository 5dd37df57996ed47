"""The loop transformation over certified norms of chains of linear maps, for any view.

Each unit's derivative is split as D = m·I + Δ with m the midpoint of its slope range and
‖Δ‖ ≤ r its half-width (an opaque unit: m = 0, r = its bound). Call ``P_{t←s}`` the map
from source ``s`` (the input, or a unit's output) to target ``t`` (a unit's input, or the
output) with every unit in between replaced by its midpoint: a *linear* map, a sum over
the paths of the DAG of products of consecutive linear layers. Expanding the true
Jacobian unit by unit in topological order gives, exactly,

    J_t = P_{t←a} J_a + Σ_j P_{t←w_j} Δ_j J_{z_j}

for any *anchor* ``a`` that every path from the input to ``t`` passes through (the input
itself, or the output of a unit that dominates ``t``; the sum runs over the units after
it), so with L_j ≥ ‖J_{z_j}‖ (the bound of the map from the input to unit j's input)

    ‖J_t‖ ≤ ‖P_{t←a}‖ L(a) + Σ_j ‖P_{t←w_j}‖ r_j L_j,      L(w_c) = (|m_c| + r_c) L_c,

every norm certified (float64, rounding included). Anchored at the input this is the
loop transformation of LipLT; an anchor closer to ``t`` needs fewer and smaller chains and
sees less of the cancellation between consecutive layers (:func:`chain_plan`). At every
unit the bound is also capped by ``Σ_s ‖B_{t←s}‖ L(s)`` over the direct blocks (the
product's step) and by an independent cap (the product method's bound of the unit's
input, where it holds), so it is never looser than the product.

The recursion is written once, over a view's block operations (:class:`ChainAlgebra`):
the dense view (:mod:`lipnorm.certify.network`, matrices) and the torus view
(:mod:`lipnorm.certify.fibers`, strided circular convolutions fiber by fiber). The
method that runs it on a graph is :mod:`lipnorm.certify.methods.chain`.

References
----------
.. [1] Fazlyab, Entesari, Roy, Chellappa, "Certified robustness via dynamic margin
   maximization and improved Lipschitz regularization" (LipLT), NeurIPS 2023, section 3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from lipnorm.bounds import compose, residual_sum
from lipnorm.certify.rounding import vector_norm_upper

__all__ = ["ChainAlgebra", "ChainPlan", "ChainProof", "chain_bound", "chain_norms", "chain_plan", "loop_bound",
           "loop_bound_gradient"]


class ChainAlgebra(Protocol):
    """The block operations of a view that the loop transformation runs on.

    ``parts()`` splits the work (the dense view: one part; the torus view: chunks of
    fibers); blocks live within a part. ``record(key, block, part)`` adds a block's share
    of the certified norm kept under ``key``; ``norm(key)`` is that bound once every part
    was recorded (0 for a key never recorded).
    """

    def parts(self): ...

    def evaluate(self, block, source: int, part): ...

    def compose(self, left, right, scale: float): ...

    def add(self, left, right): ...

    def record(self, key, block, part) -> None: ...

    def norm(self, key) -> float: ...

    def row_norms(self, key, rows: np.ndarray) -> np.ndarray | None: ...


@dataclass(frozen=True)
class ChainPlan:
    """Which chains the loop transformation forms.

    Attributes
    ----------
    anchors : list of int
        For each target (every unit's input, then the output), its anchor source (0: the
        input; ``c + 1``: unit c's output, which dominates the target).
    sources : list of list of int
        For each target, the anchor and the later sources whose chains to it are formed.
    """

    anchors: list[int]
    sources: list[list[int]]


def _inputs(network, target: int) -> dict:
    units = network.units
    return units[target].inputs if target < len(units) else network.output


def chain_plan(network, span: int | None = None) -> ChainPlan:
    """The chains to form, anchored at most ``span`` units back (None: at the input).

    Parameters
    ----------
    network : DenseNetwork or TorusNetwork
    span : int, optional
        A target's anchor is the latest dominating unit output at least ``span`` units
        before it (the input when there is none).

    Returns
    -------
    ChainPlan
    """
    count = len(network.units)
    dominators: list[set[int]] = []  # per target: the sources every path to it passes through
    source_dominators = {0: {0}}
    reaches: list[set[int]] = []  # per target: the sources with a path to it
    source_reaches = {0: {0}}
    for target in range(count + 1):
        direct = list(_inputs(network, target))
        common = set.intersection(*(source_dominators[s] for s in direct)) if direct else {0}
        dominators.append(common)
        reaches.append(set().union(*(source_reaches[s] for s in direct)) if direct else {0})
        if target < count:
            source_dominators[target + 1] = common | {target + 1}
            source_reaches[target + 1] = reaches[target] | {target + 1}
    anchors = []
    for target in range(count + 1):
        allowed = [s for s in dominators[target] if span is None and s == 0 or span is not None and s <= target + 1 - span]
        anchors.append(max(allowed) if allowed else 0)
    for target in reversed(range(count + 1)):  # an anchor never after a direct successor's
        for source in _inputs(network, target):
            if source > 0:
                unit = source - 1
                anchors[unit] = min(anchors[unit], anchors[target])
    sources = [[anchors[t]] + sorted(s for s in reaches[t] if s > anchors[t]) for t in range(count + 1)]
    return ChainPlan(anchors, sources)


def chain_norms(network, algebra: ChainAlgebra, plan: ChainPlan) -> ChainAlgebra:
    """Form every chain of the plan, part by part, and record its norm with the algebra.

    Records ``("direct", t, s)`` for every direct block and ``("chain", t, s)`` for every
    chain ``P_{t←s}`` of the plan (target ``t = len(units)`` is the output).

    Parameters
    ----------
    network : DenseNetwork or TorusNetwork
    algebra : ChainAlgebra
    plan : ChainPlan

    Returns
    -------
    ChainAlgebra
        ``algebra``, with everything recorded.
    """
    units = network.units
    count = len(units)
    last_use = {}
    for target in range(count + 1):
        for source in _inputs(network, target):
            if source > 0:
                last_use[source - 1] = target
    for part in algebra.parts():
        chains = {}
        for target in range(count + 1):
            direct = {s: algebra.evaluate(b, s, part) for s, b in _inputs(network, target).items()}
            for source, block in direct.items():
                algebra.record(("direct", target, source), block, part)
            for source in plan.sources[target]:
                block = direct.get(source)
                for unit in range(source, target):  # the units after the source that feed the target
                    inner = chains.get((unit, source))
                    if unit + 1 not in direct or inner is None or units[unit].midpoint == 0:
                        continue
                    term = algebra.compose(direct[unit + 1], inner, units[unit].midpoint)
                    block = term if block is None else algebra.add(block, term)
                if block is None:
                    continue
                algebra.record(("chain", target, source), block, part)
                if target < count:
                    chains[(target, source)] = block
            for key in [key for key in chains if last_use.get(key[0], count) <= target]:
                del chains[key]
    return algebra


@dataclass
class ChainProof:
    """What the chain bound rests on, to compute it again (:meth:`verify`).

    Attributes
    ----------
    network : DenseNetwork or TorusNetwork
    algebra_factory : callable
        ``algebra_factory(network)`` gives a fresh :class:`ChainAlgebra` of the view.
    plan : ChainPlan
    unit_caps : list of float
        An independent upper bound of each unit's input bound L_j (inf where none).
    rows : ndarray or None
        Output rows whose functionals were bounded, if any.
    view : str
        Which view the bound came from (shown in the ladder's note).
    local_caps : bool
        As for :func:`chain_bound`.
    """

    network: object
    algebra_factory: object
    plan: ChainPlan
    unit_caps: list[float]
    rows: np.ndarray | None = None
    view: str = "dense"
    local_caps: bool = True

    def verify(self):
        """The bound computed again from the stored network (every norm certified anew)."""
        return chain_bound(self.network, self.algebra_factory, self.unit_caps, self.rows,
                           plan=self.plan, view=self.view, local_caps=self.local_caps)[0]


def chain_bound(network, algebra_factory, unit_caps: list[float], rows: np.ndarray | None = None, *,
                plan: ChainPlan | None = None, view: str = "dense", local_caps: bool = True):
    """The loop-transformation bound of a network held in a view.

    Parameters
    ----------
    network : DenseNetwork or TorusNetwork
    algebra_factory : callable
        ``algebra_factory(network)``: the view's :class:`ChainAlgebra`.
    unit_caps : list of float
        For each unit, an upper bound of the Lipschitz constant of the map from the input
        to the unit's input known independently (inf where none); the smaller bound is used.
    rows : ndarray, shape (p, output size), optional
        Bound the functionals ``x ↦ rows[i] · f(x)`` instead of ``f``.
    plan : ChainPlan, optional
        The chains to form (default: anchored at the input, :func:`chain_plan`).
    view : str
        Shown in notes.
    local_caps : bool
        Cap each unit by the product's step over its direct blocks (their norms certified
        too); needed where ``unit_caps`` do not hold for the view's units (the torus view).

    Returns
    -------
    (float or ndarray, ChainProof)
        The bound of the output (one per row when ``rows`` is given) and its proof.
    """
    plan = plan or chain_plan(network)
    algebra = chain_norms(network, algebra_factory(network), plan)
    proof = ChainProof(network, algebra_factory, plan, list(unit_caps), rows, view, local_caps)
    return loop_bound(network, plan, algebra, unit_caps, rows, local_caps=local_caps), proof


def loop_bound(network, plan: ChainPlan, algebra, unit_caps: list[float], rows: np.ndarray | None = None, *,
               local_caps: bool = True):
    """The loop transformation's bound from recorded chain norms (the module docstring).

    Parameters
    ----------
    network : DenseNetwork or TorusNetwork
    plan : ChainPlan
    algebra : ChainAlgebra
        With every chain of ``plan`` recorded (:func:`chain_norms`).
    unit_caps, rows, local_caps
        As for :func:`chain_bound`.

    Returns
    -------
    float or ndarray
        The bound of the output, or of each row's functional.
    """
    units = network.units
    count = len(units)
    bounds: list[float] = []

    def lipschitz(source: int) -> float:
        if source == 0:
            return 1.0
        unit = units[source - 1]
        return compose([abs(unit.midpoint) + unit.radius, bounds[source - 1]])

    def combine(target: int, norm) -> float:
        anchor = plan.anchors[target]
        terms = [compose([norm(anchor), lipschitz(anchor)])]
        for source in plan.sources[target]:
            unit = source - 1
            if source != anchor and units[unit].radius > 0:
                value = norm(source)
                if value > 0:
                    terms.append(compose([value, units[unit].radius, bounds[unit]]))
        return residual_sum(terms)

    for target in range(count + 1):
        loop = combine(target, lambda s, t=target: algebra.norm(("chain", t, s)))
        local = residual_sum([compose([algebra.norm(("direct", target, s)), lipschitz(s)])
                              for s in _inputs(network, target)]) if local_caps else float("inf")
        cap = unit_caps[target] if target < count else float("inf")
        bound = min(loop, local, cap)
        if target < count:
            bounds.append(bound)
    whole = bound
    if rows is None:
        return whole
    rows = np.asarray(rows, dtype=np.float64)
    per_source = {s: algebra.row_norms(("chain", count, s), rows) for s in plan.sources[count]}
    row_bounds = []
    for i, row in enumerate(rows):
        capped = compose([vector_norm_upper(row), whole])  # ‖row · f‖ ≤ ‖row‖ L(f)
        if any(values is None for values in per_source.values()):
            row_bounds.append(capped)
            continue
        row_bounds.append(min(combine(count, lambda s, i=i: float(per_source[s][i])), capped))
    return np.array(row_bounds)


def loop_bound_gradient(network, plan: ChainPlan, norms: dict, *, local_caps: bool = True):
    """The loop transformation's bound in plain arithmetic, and its gradient in the norms.

    For proposing (the scalings of :mod:`lipnorm.certify.scaling`), not for certifying:
    no rounding is bounded. Where a minimum is taken, the gradient follows the branch that
    attains it.

    Parameters
    ----------
    network : DenseNetwork or TorusNetwork
    plan : ChainPlan
    norms : dict
        ``("chain" | "direct", target, source)`` to a norm (missing: 0).

    Returns
    -------
    (float, dict)
        The bound and ``∂bound/∂norms[key]`` for every key it depends on.
    """
    units = network.units
    count = len(units)
    values: list[float] = []
    tape = []  # per target: (branch, terms) with terms (key, factor, source whose bound multiplies it)
    for target in range(count + 1):
        anchor = plan.anchors[target]
        branches = []
        loop = [(("chain", target, anchor), None, anchor)]
        loop += [(("chain", target, s), units[s - 1].radius, s) for s in plan.sources[target]
                 if s != anchor and units[s - 1].radius > 0]
        branches.append(("loop", loop))
        if local_caps:
            branches.append(("local", [(("direct", target, s), None, s) for s in _inputs(network, target)]))
        best = None
        for name, terms in branches:
            total = sum(norms.get(key, 0.0) * _factor(units, values, factor, source) for key, factor, source in terms)
            if best is None or total < best[0]:
                best = (total, terms)
        values.append(best[0])
        tape.append(best[1])
    gradient: dict = {}
    adjoint = [0.0] * (count + 1)
    adjoint[count] = 1.0
    for target in reversed(range(count + 1)):
        weight = adjoint[target]
        if weight == 0.0:
            continue
        for key, factor, source in tape[target]:
            norm = norms.get(key, 0.0)
            gradient[key] = gradient.get(key, 0.0) + weight * _factor(units, values, factor, source)
            if source > 0:  # the source's bound multiplies this norm
                scale = units[source - 1].radius if factor is not None else abs(units[source - 1].midpoint) + units[source - 1].radius
                adjoint[source - 1] += weight * norm * scale
    return values[count], gradient


def _factor(units, values, factor, source) -> float:
    """What multiplies a norm in the recursion: r_j L_j (``factor`` = r_j), or L(source)."""
    if factor is not None:
        return factor * values[source - 1]
    if source == 0:
        return 1.0
    unit = units[source - 1]
    return (abs(unit.midpoint) + unit.radius) * values[source - 1]
