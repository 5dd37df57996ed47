"""The ladder of sound methods that bound a graph, and the choice among them.

``product``
    Every layer bounded on its own, the bounds composed (:mod:`.product`). Any graph.
``chain``
    Loop transformation over certified norms of chains of linear maps (:mod:`.chain`).
    Needs the dense view of the graph (:mod:`lipnorm.certify.network`): every linear
    layer between two nonlinear ones held as a matrix. Never looser than ``product``.
``sdp``
    LipSDP-Neuron with slope ranges, multipliers optimised and then checked exactly
    (:mod:`.sdp`). Needs the dense view, and a network small enough for the time budget.
``auto``
    ``product``, then each tighter method that applies while time remains; the smallest
    certified bound is reported.

A method that does not apply (a layer it cannot handle, a network too large) is recorded
in the ladder with the reason, and the next one is tried; nothing that was not checked
is ever reported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from lipnorm.bounds import compose
from lipnorm.certify.graph import Graph
from lipnorm.certify.rounding import vector_norm_upper

__all__ = ["LADDER", "MethodRun", "run_ladder"]

#: The methods, loosest first.
LADDER = ("product", "chain", "sdp")
METHODS = (*LADDER, "auto")


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


def run_ladder(graph: Graph, product, node_bounds, *, method: str, time_budget: float,
               rows: np.ndarray | None, started: float) -> LadderResult:
    """Run ``product`` (given) and the tighter methods ``method`` asks for.

    Parameters
    ----------
    graph : Graph
        Pruned and merged.
    product : ProductResult
        The product method's result (always computed first).
    node_bounds : dict
        Each node's own bound.
    method : {"product", "chain", "sdp", "auto"}
    time_budget : float
        Seconds, counted from ``started``.
    rows : ndarray, shape (p, output size), optional
        Bound the functionals ``rows[i] · f`` instead of ``f``.
    started : float
        ``time.perf_counter()`` when certification started.

    Returns
    -------
    LadderResult

    Raises
    ------
    SdpTooLarge
        When ``method="sdp"`` and the SDP is too large for the time budget (under
        ``"auto"`` the ladder records this and keeps the tighter of the other bounds).
    """
    from lipnorm.certify.methods.product import ProductProof, product_row_bounds

    row_bounds = None if rows is None else product_row_bounds(graph, product, node_bounds, rows)
    upper = product.upper if rows is None else float(np.max(row_bounds))
    best = LadderResult([MethodRun("product", upper, time.perf_counter() - started)],
                        "product", upper, row_bounds, {"product": ProductProof(graph, rows)})
    wanted = {"product": (), "chain": ("chain",), "sdp": ("chain", "sdp"), "auto": ("chain", "sdp")}[method]
    if not wanted:
        return best
    from lipnorm.certify.network import NotDensifiable, dense_network

    start = time.perf_counter()
    try:
        network = dense_network(graph, node_bounds)
    except NotDensifiable as error:
        return _not_applicable(best, wanted, f"no dense view: {error}", start)
    caps = [product.cumulative[unit.input_node] for unit in network.units]
    if "chain" in wanted:
        from lipnorm.certify.methods.chain import chain_bound

        value, proof = chain_bound(network, caps, rows)
        _record(best, "chain", value, proof, time.perf_counter() - start, rows)
    if "sdp" in wanted:
        from lipnorm.certify.methods.sdp import SdpTooLarge, sdp_bound

        start = time.perf_counter()
        remaining = time_budget - (start - started)
        try:
            if rows is None:
                value, proof = sdp_bound(network, time_budget=max(remaining, 0.0))
            else:
                value, proof = _sdp_rows(network, rows, remaining)
        except ValueError as error:  # too large for the budget, or no multipliers passed the check
            if method == "sdp" and isinstance(error, SdpTooLarge):
                raise
            best.runs.append(MethodRun("sdp", None, time.perf_counter() - start, str(error)))
        else:
            _record(best, "sdp", value, proof, time.perf_counter() - start, rows)
    return best


def _sdp_rows(network, rows, budget: float):
    """Row bounds from the SDP: ‖row‖ times the whole output's bound, then one SDP per row
    (warm-started from the previous one) while the budget lasts; the smaller bound counts."""
    from lipnorm.certify.methods.sdp import SdpTooLarge, sdp_bound

    began = time.perf_counter()
    whole, whole_proof = sdp_bound(network, time_budget=budget / 2)
    proofs: list = [None] * len(rows)
    values = [compose([vector_norm_upper(row), whole]) for row in rows]
    start = whole_proof.multipliers
    for index, row in enumerate(rows):
        share = (budget - (time.perf_counter() - began)) / (len(rows) - index)
        try:
            value, proof = sdp_bound(network, time_budget=share, row=row, start=start)
        except SdpTooLarge:
            break
        except ValueError:  # this row's multipliers failed the check: its cap stands
            continue
        if value < values[index]:
            values[index], proofs[index] = value, proof
        start = proof.multipliers
    return np.array(values), _RowProofs(whole_proof, proofs, rows)


@dataclass
class _RowProofs:
    """SDP proofs of output rows: the whole output's, and a row's own where it was tighter."""

    whole: object
    proofs: list
    rows: np.ndarray

    def verify(self) -> np.ndarray:
        whole = self.whole.verify()
        return np.array([compose([vector_norm_upper(row), whole]) if proof is None else proof.verify()
                         for row, proof in zip(self.rows, self.proofs)])


def _record(best: LadderResult, method: str, value, proof, seconds: float, rows) -> None:
    """Add a run; keep it as the result where it is tighter (per row for output rows)."""
    best.proofs[method] = proof
    if rows is None:
        best.runs.append(MethodRun(method, float(value), seconds))
        if value < best.upper:
            best.upper, best.method = float(value), method
        return
    value = np.asarray(value, dtype=np.float64)
    best.runs.append(MethodRun(method, float(np.max(value)), seconds))
    best.row_upper = np.minimum(best.row_upper, value)
    if float(np.max(best.row_upper)) < best.upper:
        best.upper, best.method = float(np.max(best.row_upper)), method


def _not_applicable(best: LadderResult, wanted, reason: str, start: float) -> LadderResult:
    for name in wanted:
        best.runs.append(MethodRun(name, None, time.perf_counter() - start, f"not applicable ({reason})"))
    return best
