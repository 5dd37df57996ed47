"""The product method: bound every node, compose the bounds along the graph.

L(node), an upper bound of the Lipschitz constant of the map from the model's input to
that node's output, propagates through the DAG: a unary node multiplies, a sum adds, a
concatenation takes the root of the sum of squares. Several graph outputs are treated
as one concatenated output. Sound for any graph, and the baseline every tighter method
is compared with (and never looser than, see :mod:`lipnorm.certify.methods`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from lipnorm.bounds import compose, concatenation, residual_sum, round_up
from lipnorm.certify.certificate import LayerBound
from lipnorm.certify.graph import Concat, Graph, Input, Linear, Sum
from lipnorm.certify.linear import DenseMap, certified_norm
from lipnorm.certify.rounding import gamma, vector_norm_upper

__all__ = ["NodeBound", "ProductProof", "ProductResult", "bound_nodes", "product_bound", "product_row_bounds"]


@dataclass(frozen=True)
class NodeBound:
    """A node's own bound: an upper bound of its Lipschitz constant (its norm, if linear).

    Attributes
    ----------
    upper : float
    method : str
    lower : float or None
        A certified lower bound of a linear node's norm, where one was computed.
    seconds : float
    """

    upper: float
    method: str
    lower: float | None
    seconds: float


@dataclass(frozen=True)
class ProductResult:
    """What :func:`product_bound` found.

    Attributes
    ----------
    upper : float
        The product bound of the whole graph (outputs concatenated).
    cumulative : dict of str to float
        L(node) for every node.
    rows : list of LayerBound
        The per-layer report.
    """

    upper: float
    cumulative: dict[str, float]
    rows: list[LayerBound]


def bound_nodes(graph: Graph, progress=None) -> dict[str, NodeBound]:
    """The own bound of every unary node of a merged graph (linear maps certified).

    Parameters
    ----------
    graph : Graph
        Pruned and merged (:func:`lipnorm.certify.graph.prepare_graph`).
    progress : callable, optional
        Called as ``progress(done, total, layer_name)`` before each layer is bounded.

    Returns
    -------
    dict of str to NodeBound
        For every node that is neither the input, a sum nor a concatenation.
    """
    bounds: dict[str, NodeBound] = {}
    for index, node in enumerate(graph.nodes.values()):
        if progress is not None:
            progress(index, len(graph.nodes), node.name)
        op = node.op
        if isinstance(op, (Input, Sum, Concat)):
            continue
        if len(node.inputs) != 1:
            raise ValueError(f"node {node.name!r} ({node.layer_type}) must have one input")
        start = time.perf_counter()
        if isinstance(op, Linear):
            upper, method, lower = certified_norm(op.map)
        else:
            upper, method, lower = op.bound, op.method, None
        bounds[node.name] = NodeBound(upper, method, lower, time.perf_counter() - start)
    return bounds


def product_bound(graph: Graph, node_bounds: dict[str, NodeBound]) -> ProductResult:
    """Compose the node bounds along the graph.

    Parameters
    ----------
    graph : Graph
        Pruned and merged.
    node_bounds : dict of str to NodeBound
        From :func:`bound_nodes`.

    Returns
    -------
    ProductResult
    """
    cumulative: dict[str, float] = {}
    rows: list[LayerBound] = []
    for node in graph.nodes.values():
        op = node.op
        incoming = [cumulative[i] for i in node.inputs]
        if isinstance(op, Input):
            cumulative[node.name] = 1.0
            continue
        if isinstance(op, Sum):
            bound, method = residual_sum(incoming), "sum of branch bounds"
            cumulative[node.name] = bound
            rows.append(LayerBound(node.name, node.layer_type, bound, bound, method, 0.0,
                                   composition=" + ".join(f"{value:.6g}" for value in incoming)))
            continue
        if isinstance(op, Concat):
            bound, method = concatenation(incoming), "√Σ L² over branches"
            cumulative[node.name] = bound
            rows.append(LayerBound(node.name, node.layer_type, bound, bound, method, 0.0,
                                   composition="√(" + " + ".join(f"{value:.6g}²" for value in incoming) + ")"))
            continue
        own = node_bounds[node.name]
        cumulative[node.name] = compose([own.upper, incoming[0]])
        rows.append(LayerBound(node.name, node.layer_type, own.upper, cumulative[node.name],
                               own.method, own.seconds, merged=tuple(node.merged), lower=own.lower))
    return ProductResult(output_bound(graph, cumulative), cumulative, rows)


def output_bound(graph: Graph, cumulative: dict[str, float]) -> float:
    """The bound of the graph's outputs, concatenated, from per-node bounds."""
    outputs = graph.outputs
    return cumulative[outputs[0]] if len(outputs) == 1 else concatenation(cumulative[o] for o in outputs)


def product_row_bounds(graph: Graph, product: ProductResult, node_bounds, rows: np.ndarray) -> np.ndarray:
    """Product bounds of the functionals ``x ↦ rows[i] · f(x)``.

    Where the output is a dense layer on the last axis of a vector (a classifier's logits),
    each row is combined with it first: ``‖rowsᵢ W‖ · L(its input)`` (for the logit
    difference of classes y, j that is ``‖w_y − w_j‖ · L``); otherwise ``‖rowsᵢ‖ · L(f)``.

    Parameters
    ----------
    graph : Graph
    product : ProductResult
    node_bounds : dict
    rows : ndarray, shape (p, output size)

    Returns
    -------
    ndarray, shape (p,)
    """
    rows = np.asarray(rows, dtype=np.float64)
    row_norms = [vector_norm_upper(r) for r in rows]
    last = graph.nodes[graph.outputs[0]] if len(graph.outputs) == 1 else None
    shape = graph.shapes.get(last.name) if last is not None else None
    if (last is not None and isinstance(last.op, Linear) and isinstance(last.op.map, DenseMap)
            and shape is not None and len(shape) == 2 and last.op.map.axis % 2 == 1):
        weight, error = last.op.map.weight, last.op.map.error
        combined = rows @ weight
        rounding = gamma(weight.shape[0] + 1) * np.linalg.norm(np.abs(rows) @ np.abs(weight), axis=1)
        norms = np.linalg.norm(combined, axis=1) * (1 + 2.0**-40) + rounding
        incoming = product.cumulative[last.inputs[0]]
        return np.array([compose([round_up(float(n) + r * error), incoming]) for n, r in zip(norms, row_norms)])
    return np.array([compose([r, product.upper]) for r in row_norms])


@dataclass
class ProductProof:
    """The graph the product bound was computed on, to compute it again."""

    graph: Graph
    rows: np.ndarray | None = None

    def verify(self):
        """The product bound (or row bounds) computed again, every layer bounded anew."""
        node_bounds = bound_nodes(self.graph)
        result = product_bound(self.graph, node_bounds)
        if self.rows is None:
            return result.upper
        return product_row_bounds(self.graph, result, node_bounds, self.rows)
