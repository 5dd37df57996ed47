"""The ladder: bound a graph by the product, then by each tighter method within its share of the time.

:func:`certify_graph` prepares a graph (:func:`lipnorm.certify.graph.prepare_graph`),
bounds every node and composes the bounds (the ``product`` method, always computed: it
caps the others), then runs the methods of :data:`lipnorm.certify.methods.LADDER` that
``method`` asks for, each within its share of the time budget (:func:`budget_shares`),
and reports the smallest certified bound in a :class:`Certificate`. A method that does
not apply, or whose result could not be checked, is recorded with the reason; nothing
that was not checked is ever reported.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from lipnorm.certify.certificate import Certificate, LayerBound
from lipnorm.certify.graph import Graph, prepare_graph
from lipnorm.certify.methods import (
    LADDER,
    METHODS,
    MethodContext,
    MethodRun,
    NotApplicable,
    TooLarge,
    method_minimum,
    method_runner,
)
from lipnorm.certify.methods.product import ProductProof, bound_nodes, product_bound, product_row_bounds

__all__ = ["SHARED_FRACTION", "SHARE_WEIGHTS", "LadderResult", "budget_shares", "certify_graph", "run_ladder"]


@dataclass
class LadderResult:
    """The runs of the ladder, and the best certified result.

    Attributes
    ----------
    runs : list of MethodRun
    method : str
        The method whose bound is reported (for output rows: that of the largest row bound).
    upper : float
    row_upper : ndarray or None
        Per output row, the smallest certified bound over the methods.
    proofs : dict of str to proof
        Each certified method's proof (``verify()`` recomputes its bound).
    """

    runs: list[MethodRun]
    method: str
    upper: float
    row_upper: np.ndarray | None
    proofs: dict

    def verify(self):
        """The reported bound (or row bounds) computed again from the stored proofs."""
        if self.row_upper is None:
            return self.proofs[self.method].verify()
        return np.min([np.asarray(proof.verify(), dtype=np.float64) for proof in self.proofs.values()], axis=0)

    def record(self, method: str, value, proof, seconds: float) -> None:
        """Add a certified run; keep it as the result where it is tighter (per row for rows)."""
        self.proofs[method] = proof
        note = getattr(proof, "note", "")
        if self.row_upper is None:
            self.runs.append(MethodRun(method, float(value), seconds, note))
            if value < self.upper:
                self.upper, self.method = float(value), method
            return
        value = np.asarray(value, dtype=np.float64)
        self.runs.append(MethodRun(method, float(np.max(value)), seconds, note))
        self.row_upper = np.minimum(self.row_upper, value)
        if float(np.max(self.row_upper)) < self.upper:
            self.upper, self.method = float(np.max(self.row_upper)), method


def certify_graph(graph: Graph, *, model_name: str, input_shape: tuple[int, ...] | None,
                  skipped: list[tuple[str, str]] | None = None, progress=None,
                  method: str = "product", time_budget: float = 60.0, rows=None) -> Certificate:
    """Merge, bound and compose a graph into a :class:`Certificate`.

    Parameters
    ----------
    graph : Graph
    model_name : str
        Shown in reports.
    input_shape : tuple of int or None
        The input shape (without batch) the bound holds for.
    skipped : list of (name, type), optional
        Layers that pass values through unchanged (dropout, identity, constant shifts):
        listed in the report with bound 1.
    progress : callable, optional
        Called as ``progress(done, total, layer_name)`` before each layer is bounded.
    method : {"product", "chain", "conv_sdp", "sdp", "auto"}
        The rung of the ladder to climb to (see :mod:`lipnorm.certify.methods`).
    time_budget : float
        Seconds the tighter methods may take, counted from the start and split between
        them (:func:`budget_shares`).
    rows : array_like, shape (p, output size), optional
        Also bound each functional ``x ↦ rows[i] · f(x)`` (``Certificate.row_upper``).

    Returns
    -------
    Certificate

    Raises
    ------
    ValueError
        For an unknown method, a time budget that is not positive, or rows that do not
        match the outputs; :class:`~lipnorm.certify.methods.TooLarge` when the method
        asked for by name cannot finish within the budget.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if not (isinstance(time_budget, (int, float)) and time_budget > 0):
        raise ValueError(f"time_budget must be a positive number of seconds, got {time_budget!r}")
    started = time.perf_counter()
    prepare_graph(graph)
    node_bounds = bound_nodes(graph, progress)
    product = product_bound(graph, node_bounds)
    if rows is not None:
        rows = _checked_rows(rows, graph)
    context = MethodContext(graph, product, node_bounds, rows, started + time_budget)
    ladder = run_ladder(context, method=method, started=started)
    layers = list(product.rows)
    for name, layer_type in skipped or []:
        layers.append(LayerBound(name, layer_type, 1.0, None, "passes values through", 0.0))
    return Certificate(
        model=model_name,
        input_shape=None if input_shape is None else tuple(input_shape),
        upper=ladder.upper,
        layers=layers,
        seconds=time.perf_counter() - started,
        method=ladder.method,
        ladder=tuple(ladder.runs),
        row_upper=None if ladder.row_upper is None else tuple(float(v) for v in ladder.row_upper),
        proof=ladder,
    )


def run_ladder(context: MethodContext, *, method: str, started: float) -> LadderResult:
    """The product's result, then each method of the ladder up to ``method`` (all for ``"auto"``).

    Parameters
    ----------
    context : MethodContext
    method : {"product", "chain", "conv_sdp", "sdp", "auto"}
    started : float
        ``time.perf_counter()`` when certification started (the product's time counts from it).

    Returns
    -------
    LadderResult

    Raises
    ------
    TooLarge
        When the method named by ``method`` cannot finish within the budget (under
        ``"auto"``, or for a lower rung, the ladder records it and goes on).
    """
    graph, product, rows = context.graph, context.product, context.rows
    row_bounds = None if rows is None else product_row_bounds(graph, product, context.node_bounds, rows)
    upper = product.upper if rows is None else float(np.max(row_bounds))
    best = LadderResult([MethodRun("product", upper, time.perf_counter() - started)],
                        "product", upper, row_bounds, {"product": ProductProof(graph, rows)})
    last = len(LADDER) if method == "auto" else LADDER.index(method) + 1
    allowances = budget_shares(context, LADDER[1:last], context.deadline - started)
    for name in LADDER[1:last]:
        start = time.perf_counter()
        context.allowance = allowances[name]
        try:
            value, proof = method_runner(name)(context)
        except ValueError as error:  # it does not apply, or its result failed the check
            if isinstance(error, TooLarge) and name == method:
                raise
            best.runs.append(MethodRun(name, None, time.perf_counter() - start, _note(error)))
        else:
            best.record(name, value, proof, time.perf_counter() - start)
    return best


#: Each method's weight when the time budget is split between the methods that can run.
SHARE_WEIGHTS = {"chain": 1.0, "conv_sdp": 4.0, "sdp": 4.0}
#: Fraction of the time budget the methods split: the rest is kept for the product, the
#: views of the graph and the cost models' error.
SHARED_FRACTION = 0.9


def budget_shares(context: MethodContext, names, time_budget: float) -> dict[str, float]:
    """Seconds each method of ``names`` may plan for: shares of the time budget.

    The methods that can run split ``SHARED_FRACTION`` of the budget in proportion to
    :data:`SHARE_WEIGHTS`. A method cannot run where it does not apply or where its minimum
    (:func:`~lipnorm.certify.methods.method_minimum`, from its cost model) exceeds the
    share it is offered; it takes no share from the others, and its allowance is that offer
    (below its minimum: it refuses by itself, with its reason). The shares depend on the
    graph, the budget and the cost models only, not on the clock: a method whose work is
    fixed from its share gives the same result on a busy machine as on a quiet one.

    Parameters
    ----------
    context : MethodContext
    names : sequence of str
        The methods to run, in order.
    time_budget : float

    Returns
    -------
    dict of str to float
    """
    shared = SHARED_FRACTION * time_budget
    minimum = {}
    for name in names:
        try:
            minimum[name] = method_minimum(name, context)
        except NotApplicable:
            minimum[name] = math.inf
    offered = {name: shared for name in names}
    running = [name for name in names if minimum[name] <= shared]
    while running:
        total = sum(SHARE_WEIGHTS[name] for name in running)
        offered.update({name: shared * SHARE_WEIGHTS[name] / total for name in running})
        kept = [name for name in running if minimum[name] <= offered[name]]
        if kept == running:
            break
        running = kept
    return offered


def _note(error: Exception) -> str:
    """The ladder's note for a method that gave no bound."""
    if isinstance(error, NotApplicable) and not isinstance(error, TooLarge):
        return f"not applicable ({error})"
    return str(error)


def _checked_rows(rows, graph: Graph):
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[0] == 0 or not np.all(np.isfinite(rows)):
        raise ValueError(f"rows must be a finite 2-D array (p, output size), got shape {rows.shape}")
    sizes = [graph.shapes.get(o) for o in graph.outputs]
    if all(s is not None for s in sizes):
        size = sum(math.prod(s[1:]) for s in sizes)
        if rows.shape[1] != size:
            raise ValueError(f"rows have {rows.shape[1]} columns but the model has {size} outputs")
    return rows
