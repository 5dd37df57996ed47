"""The bounding methods: interchangeable strategies over one prepared graph.

``product``
    Every layer bounded on its own, the bounds composed (:mod:`.product`). Any graph.
``chain``
    Loop transformation over certified norms of chains of linear maps (:mod:`.chain`).
    Needs the dense view of the graph (:mod:`lipnorm.certify.network`): every linear
    layer between two nonlinear ones held as a matrix. Never looser than ``product``.
``conv_sdp``
    LipSDP-Neuron on the torus view (:mod:`lipnorm.certify.torus`), one multiplier per
    channel, block-structured over a tree of frequencies, checked exactly
    (:mod:`.conv_sdp`). Needs the torus view (convolutions, BatchNorm, average pooling,
    residual sums, dense heads) with every nonlinear layer an activation with a slope
    range (not max pooling), whatever the image size.
``sdp``
    LipSDP-Neuron with slope ranges, multipliers optimised and then checked exactly
    (:mod:`.sdp`). Needs the dense view, and a network small enough for the time budget.

Every method but ``product`` is a module of this package with a function
``run(context: MethodContext) -> (bound, proof)``: the bound is certified (one value per
row when ``context.rows`` is given) and ``proof.verify()`` computes it again. A method
that cannot bound the graph raises :class:`NotApplicable` (or :class:`TooLarge`) with
the reason; the ladder (:mod:`lipnorm.certify.ladder`) records it and goes on. A method
plans its work for ``context.share()`` seconds; one that needs a minimum to be worth
running also has ``minimum_seconds(context) -> float`` (raising :class:`NotApplicable`
where it does not apply), so that the ladder shares the budget among the methods that can
run. A new method is one more module here and one more name in :data:`LADDER`.
"""

from __future__ import annotations

import importlib
import math
import time
from dataclasses import dataclass, field

import numpy as np

from lipnorm.certify.graph import Graph

__all__ = ["LADDER", "METHODS", "MethodContext", "MethodRun", "NotApplicable", "TooLarge", "method_minimum",
           "method_runner"]

#: The methods, loosest first: ``method=name`` climbs the ladder up to ``name``.
LADDER = ("product", "chain", "conv_sdp", "sdp")
#: What ``certify(method=...)`` accepts: a rung of the ladder, or ``"auto"`` (all of them).
METHODS = (*LADDER, "auto")


class NotApplicable(ValueError):
    """A method cannot bound this graph (a layer it cannot read, a view it cannot build).

    The ladder records the message and goes on with the next method.
    """


class TooLarge(NotApplicable):
    """The method would not finish within the time budget; the message names size and budget.

    Raised to the caller when the method was asked for by name, recorded under ``"auto"``.
    """


@dataclass(frozen=True)
class MethodRun:
    """One method's attempt at a graph.

    Attributes
    ----------
    method : str
    upper : float or None
        The certified bound (for output rows: the largest row bound); None where the
        method did not apply or its result could not be checked.
    seconds : float
    note : str
        Why the method did not apply, or what it did.
    """

    method: str
    upper: float | None
    seconds: float
    note: str = ""


@dataclass
class MethodContext:
    """What every method reads: the graph, the product's results, the rows, the clock.

    Attributes
    ----------
    graph : Graph
        Pruned and merged (:func:`lipnorm.certify.graph.prepare_graph`).
    product : ProductResult
        The product method's result (``product.cumulative[name]`` bounds the map from the
        input to each node: an independent cap for the tighter methods).
    node_bounds : dict of str to NodeBound
        Each unary node's own bound.
    rows : ndarray, shape (p, output size), or None
        Bound the functionals ``x ↦ rows[i] · f(x)`` instead of ``f``.
    deadline : float
        ``time.perf_counter()`` value by which the methods must be done: a guard that stops
        an optimisation early where the machine is slower than the cost models assume.
    allowance : float
        Seconds the running method may plan for: its share of the time budget, set by the
        ladder (:func:`lipnorm.certify.ladder.run_ladder`). Methods fix their work (a chain
        plan, a number of optimisation steps) from it and their cost model, not from the
        clock, so that their result does not depend on how busy the machine is.
    views : dict
        Views of the graph built by one method and kept for the next (see :meth:`view`).
    """

    graph: Graph
    product: object
    node_bounds: dict
    rows: np.ndarray | None
    deadline: float
    allowance: float = math.inf
    views: dict = field(default_factory=dict)

    def remaining(self) -> float:
        """Seconds left before the deadline (never negative)."""
        return max(self.deadline - time.perf_counter(), 0.0)

    def share(self) -> float:
        """Seconds the running method plans for: its allowance, or what is left before the
        deadline where that is less (a method before it overran)."""
        return min(self.allowance, self.remaining())

    def view(self, name: str, build):
        """The view ``name`` of the graph, built once by ``build(self)`` and kept.

        A view that could not be built is remembered too: its :class:`NotApplicable` is
        raised again to every method that asks for it.
        """
        if name not in self.views:
            try:
                self.views[name] = build(self)
            except NotApplicable as error:
                self.views[name] = error
        value = self.views[name]
        if isinstance(value, NotApplicable):
            raise value
        return value

    def dense_network(self):
        """The dense view (:func:`lipnorm.certify.network.dense_network`), built once."""
        return self.view("dense", _build_dense_network)

    def torus_network(self):
        """The torus view (:func:`lipnorm.certify.torus_builder.torus_network`), built once."""
        return self.view("torus", _build_torus_network)


def _build_dense_network(context: MethodContext):
    from lipnorm.certify.network import NotDensifiable, dense_network

    try:
        return dense_network(context.graph, context.node_bounds)
    except NotDensifiable as error:
        raise NotApplicable(f"no dense view: {error}") from error


def _build_torus_network(context: MethodContext):
    from lipnorm.certify.torus import NotOnTorus
    from lipnorm.certify.torus_builder import torus_network

    try:
        return torus_network(context.graph, context.node_bounds)
    except NotOnTorus as error:
        raise NotApplicable(f"no torus view: {error}") from error


def method_runner(name: str):
    """The ``run`` function of the method ``name`` (a rung of :data:`LADDER` but ``product``)."""
    return _module(name).run


def method_minimum(name: str, context: MethodContext) -> float:
    """Seconds the method ``name`` needs at least to be worth running on the context's graph
    (0 for a method without a minimum).

    Raises
    ------
    NotApplicable
        Where the method cannot bound the graph.
    """
    minimum = getattr(_module(name), "minimum_seconds", None)
    return 0.0 if minimum is None else float(minimum(context))


def _module(name: str):
    if name not in LADDER or name == "product":
        raise ValueError(f"no method module for {name!r}")
    return importlib.import_module(f"{__name__}.{name}")
