"""The chain method: the loop transformation (:mod:`lipnorm.certify.loop`) on the views of a graph.

Two views hold the linear maps between nonlinear layers: the dense view
(:mod:`lipnorm.certify.network`: matrices, exact zero padding, networks whose layers fit in
matrices) and the torus view (:mod:`lipnorm.certify.torus`: strided circular convolutions
evaluated fiber by fiber, :mod:`lipnorm.certify.fibers`, at any image size, with per-channel
scalings where the chains fit in memory, :mod:`lipnorm.certify.scaling`). :func:`run`
estimates each view's work from shapes alone, runs the dense view where it fits its share
of the budget and the torus view with chains reaching as far back as the rest allows, and
reports the smaller bound with a note saying which view gave it.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import numpy as np

from lipnorm.certify.fibers import FiberAlgebra, FiberCost
from lipnorm.certify.loop import ChainProof, chain_bound, chain_norms, chain_plan, loop_bound
from lipnorm.certify.methods import NotApplicable, TooLarge
from lipnorm.certify.network import DenseAlgebra, DenseCost
from lipnorm.certify.scaling import certified_norms, held_chains, optimise_scalings

__all__ = ["ChainViews", "run"]

#: Floating-point rates assumed when judging what fits the time budget (measured on a busy
#: 2-core CPU: the torus view's complex products and certificates, the dense view's real ones).
_TORUS_FLOPS_PER_SECOND = 6e9
_DENSE_FLOPS_PER_SECOND = 1.5e10
#: How far back the torus view's chains may reach, tried in this order (None: to the input).
_SPANS = (None, 8, 6, 4, 3, 2, 1)
#: Share of the remaining budget the dense view may take when the torus view runs too.
_DENSE_SHARE = 0.5
#: Share of the remaining budget the torus view's chains may be estimated to take (estimates
#: are rough on a shared machine).
_TORUS_SHARE = 0.7
#: Per-channel scalings are optimised when every chain fits in this many complex entries
#: (512 MiB) and the time left after the chains (counted this many times: formed once,
#: certified twice) allows at least the fewest steps; the number of steps is fixed from the
#: estimate before they start (so a network and a budget always give the same bound).
_MAX_SCALED_ENTRIES = 2**25
_SCALING_TIME_FACTOR = 1.8
_SCALING_FLOPS_PER_ENTRY = 100.0  # one optimisation step, per held complex entry (measured)
_SCALING_STEPS = 30
_MIN_SCALING_STEPS = 5
#: Below this relative gain of the scalings' estimate the plain bound is certified as well.
_CLEAR_GAIN = 0.05


@dataclass
class ChainViews:
    """The chain bounds of the views that ran, and what the others did (:attr:`note`).

    Attributes
    ----------
    proofs : list of ChainProof
    values : list of float or ndarray
    notes : list of str
    """

    proofs: list
    values: list
    notes: list

    @property
    def note(self) -> str:
        """Which view gave the bound, and what each view did (shown in the ladder)."""
        return "; ".join(self.notes)

    def verify(self):
        """The smallest bound (per row for rows) of the views, each computed again."""
        values = [np.asarray(proof.verify(), dtype=np.float64) for proof in self.proofs]
        best = np.min(values, axis=0)
        return float(best) if best.ndim == 0 else best


def run(context):
    """The chain bound of the context's graph, from the torus view and the dense view
    (:mod:`lipnorm.certify.methods`).

    The dense view (exact zero padding, matrices) runs when its estimated work fits the
    method's share of the budget (``context.share()``; half of it when the torus view runs
    too); the torus view (convolutions kept as convolutions) runs with its chains reaching
    as far back, and as many scaling steps, as its estimated work in what is left of the
    share allows (estimates, not the clock: the same network and budget give the same
    bound). The smaller bound counts (per row for rows); the note says which view gave it
    and why a view did not run.

    Raises
    ------
    NotApplicable
        Neither view can hold the graph.
    TooLarge
        No view fits the budget.
    """
    views, notes, too_large = [], [], []
    try:
        torus = context.torus_network()
    except NotApplicable as error:
        torus, notes = None, [str(error)]
    budget = context.share()
    allowed = budget * (_DENSE_SHARE if torus is not None else 1.0)
    seconds = _dense_seconds_before(torus) if torus is not None else 0.0
    dense = None
    if seconds <= allowed:
        try:
            dense = context.dense_network()
        except NotApplicable as error:
            notes.append(str(error))
    if dense is not None:
        seconds = _dense_seconds(dense)
    if seconds > allowed:
        reason = f"dense view: about {seconds:.0f} s of chain work, more than the {allowed:.0f} s the time budget leaves it"
        too_large.append(reason)
        if dense is None and seconds > context.remaining():  # later rungs, heavier, cannot use it either
            context.views.setdefault("dense", TooLarge(f"no dense view within the budget ({reason})"))
    elif dense is not None:
        views.append(_dense_run(context, dense))
        budget -= seconds  # its estimate, not the clock: the torus plan does not depend on the load
    if torus is not None:
        left = min(budget, context.remaining())
        plan, seconds, entries = _torus_plan(torus, left * _TORUS_SHARE)
        if plan is None:
            too_large.append(f"torus view: about {seconds:.0f} s of work even with the shortest chains, "
                             f"more than the {left:.0f} s left")
        else:
            views.append(_torus_run(context, torus, plan, seconds, entries, left))
    if not views:
        if too_large:
            raise TooLarge("; ".join(too_large + notes))
        raise NotApplicable("; ".join(notes))
    values = [value for value, _, _ in views]
    best = int(np.argmin([float(np.max(v)) for v in values]))
    ordered = [views[best]] + views[:best] + views[best + 1:]
    labels = [f"{note} (the bound)" if i == 0 and len(views) > 1 else note
              for i, (_, _, note) in enumerate(ordered)]
    proof = ChainViews([p for _, p, _ in views], values, labels + too_large + notes)
    combined = np.min([np.asarray(v, dtype=np.float64) for v in values], axis=0)
    return (float(combined) if combined.ndim == 0 else combined), proof


def _dense_seconds_before(torus) -> float:
    """The dense view's estimated seconds from the torus view's structure (its windows are
    the dense view's tensors), before the dense view is built."""
    def shape_of(paths, source: int):
        space = torus.source_space(source)
        if all(not path.convs for path in paths):
            return None
        target = next(path.convs[-1].target for path in paths if path.convs)
        return (target.channels * math.prod(target.window), space.channels * math.prod(space.window))

    return chain_norms(torus, DenseCost(torus, shape_of), chain_plan(torus)).flops / _DENSE_FLOPS_PER_SECOND


def _dense_seconds(network) -> float:
    return chain_norms(network, DenseCost(network), chain_plan(network)).flops / _DENSE_FLOPS_PER_SECOND


def _dense_run(context, network):
    start = time.perf_counter()
    caps = [context.product.cumulative[unit.input_node] for unit in network.units]
    value, proof = chain_bound(network, DenseAlgebra, caps, context.rows, local_caps=False)
    return value, proof, f"dense view: {float(np.max(value)):.6g} in {time.perf_counter() - start:.1f} s"


def _torus_plan(network, seconds_left: float):
    """The plan whose chains reach furthest back within the time left, its estimated seconds
    and the complex entries of all its chains."""
    seconds, entries = float("inf"), 0
    for span in _SPANS:
        plan = chain_plan(network, span)
        cost = chain_norms(network, FiberCost(network), plan)
        seconds, entries = cost.flops / _TORUS_FLOPS_PER_SECOND, cost.entries
        if seconds <= seconds_left:
            return plan, seconds, entries
    return None, seconds, entries


def _torus_run(context, network, plan, seconds: float, entries: int, left: float):
    """The torus view's bound: with per-channel scalings where every chain fits in memory
    and the ``left`` seconds allow optimising them (:mod:`lipnorm.certify.scaling`), the smaller
    of the scaled and the plain bound; else the plain loop transformation chunk by chunk."""
    start = time.perf_counter()
    caps = [float("inf")] * len(network.units)
    reach = ("chains from the input" if all(a == 0 for a in plan.anchors)
             else f"chains anchored up to {max(t + 1 - a for t, a in enumerate(plan.anchors))} units back")
    grid = "×".join(str(n) for n in network.input_space.grid)
    fibers = "×".join(str(n) for n in network.fiber_grid)
    described = f"torus view (input grid {grid}, {fibers} fibers, {reach}"
    step_seconds = entries * _SCALING_FLOPS_PER_ENTRY / _TORUS_FLOPS_PER_SECOND
    spare = _TORUS_SHARE * left - _SCALING_TIME_FACTOR * seconds
    steps = min(_SCALING_STEPS, int(spare / step_seconds)) if step_seconds > 0 and spare > 0 else 0
    if entries <= _MAX_SCALED_ENTRIES and steps >= _MIN_SCALING_STEPS:
        held = held_chains(network, plan)
        scalings, estimate, unscaled = optimise_scalings(network, plan, held, steps=steps)
        # the plain bound is certified too unless the scalings' estimate is clearly lower
        options = (scalings,) if estimate <= (1 - _CLEAR_GAIN) * unscaled else (scalings, None)
        candidates = []
        for chosen in options:
            value = loop_bound(network, plan, certified_norms(network, held, chosen), caps, context.rows)
            candidates.append((float(np.max(value)), value, chosen))
        _, value, chosen = min(candidates, key=lambda c: c[0])
        factory = functools.partial(FiberAlgebra, scalings=chosen)
        proof = ChainProof(network, factory, plan, caps, context.rows, "torus")
        scaled = ", per-channel scalings" if chosen is not None else ", per-channel scalings did not help"
        return value, proof, (f"{described}{scaled}): {float(np.max(value)):.6g} in "
                              f"{time.perf_counter() - start:.1f} s (unscaled about {unscaled:.6g})")
    value, proof = chain_bound(network, FiberAlgebra, caps, context.rows, plan=plan, view="torus")
    return value, proof, f"{described}): {float(np.max(value)):.6g} in {time.perf_counter() - start:.1f} s"
