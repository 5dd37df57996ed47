"""The graph IR of bounded nodes that every front end produces, and its composition.

A :class:`Graph` is a DAG of :class:`Node` in topological order, starting at one input.
Each node is one of

* ``Linear(map)``: a linear (or affine) layer, see :mod:`lipnorm.certify.linear`;
* ``Lipschitz(bound, method)``: a nonlinear layer with a known constant (activation,
  max pooling, a user rule);
* ``Sum()``: the sum of its inputs (residual addition);
* ``Concat()``: the concatenation of its inputs.

:func:`certify_graph` merges adjacent linear maps, bounds every node, and propagates
L(node) — an upper bound of the Lipschitz constant of the map from the model's input to
that node's output — through the DAG: a unary node multiplies, a sum adds, a
concatenation takes the root of the sum of squares. Several graph outputs are treated
as one concatenated output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from lipnorm.bounds import compose, concatenation, residual_sum
from lipnorm.certify.certificate import Certificate, LayerBound
from lipnorm.certify.linear import LinearMap, certified_norm, merge

__all__ = ["Concat", "Graph", "Input", "Linear", "Lipschitz", "Node", "Sum", "certify_graph"]


@dataclass(frozen=True)
class Input:
    """The model's input."""


@dataclass(frozen=True)
class Linear:
    """A linear layer; its map may be merged with its linear neighbours."""

    map: LinearMap


@dataclass(frozen=True)
class Lipschitz:
    """A layer with a known Lipschitz bound."""

    bound: float
    method: str


@dataclass(frozen=True)
class Sum:
    """Elementwise sum (or difference) of the inputs."""


@dataclass(frozen=True)
class Concat:
    """Concatenation of the inputs."""


Op = Input | Linear | Lipschitz | Sum | Concat


@dataclass
class Node:
    """One layer of the model.

    Attributes
    ----------
    name : str
        Unique name (the layer's name in the model).
    layer_type : str
        The layer's class or op name, shown in reports.
    inputs : list of str
        Names of the nodes whose outputs this node reads.
    op : Op
    merged : list of str
        Names of layers whose linear maps were merged into this node.
    """

    name: str
    layer_type: str
    inputs: list[str]
    op: Op
    merged: list[str] = field(default_factory=list)


class Graph:
    """A DAG of nodes, added in topological order by a front end.

    Parameters
    ----------
    input_name : str
        Name of the input node (created here).

    Example
    -------
    >>> g = Graph("x")
    >>> g.add("relu", "ReLU", ["x"], Lipschitz(1.0, "activation"))
    'relu'
    >>> g.outputs = ["relu"]
    """

    def __init__(self, input_name: str = "input"):
        self.input_name = input_name
        self.nodes: dict[str, Node] = {input_name: Node(input_name, "Input", [], Input())}
        self.outputs: list[str] = []
        self.aliases: dict[str, str] = {}

    def add(self, name: str, layer_type: str, inputs: list[str], op: Op) -> str:
        """Append a node reading ``inputs``; returns its (unique) name."""
        inputs = [self.resolve(i) for i in inputs]
        for source in inputs:
            if source not in self.nodes:
                raise KeyError(f"node {name!r} reads {source!r}, which is not in the graph yet")
        unique, n = name, 1
        while unique in self.nodes:
            n += 1
            unique = f"{name}_{n}"
        self.nodes[unique] = Node(unique, layer_type, list(inputs), op)
        return unique

    def alias(self, name: str, target: str) -> None:
        """Make ``name`` refer to ``target`` (a layer that passes its input through)."""
        self.aliases[name] = self.resolve(target)

    def resolve(self, name: str) -> str:
        """The node a name refers to, following aliases."""
        while name in self.aliases:
            name = self.aliases[name]
        return name


def certify_graph(graph: Graph, *, model_name: str, input_shape: tuple[int, ...] | None,
                  skipped: list[tuple[str, str]] | None = None, progress=None) -> Certificate:
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

    Returns
    -------
    Certificate
    """
    outputs = [graph.resolve(o) for o in graph.outputs]
    if not outputs:
        raise ValueError("the graph has no outputs")
    _prune_unused(graph, outputs)
    _merge_linear_chains(graph, outputs)
    total_start = time.perf_counter()
    lipschitz: dict[str, float] = {}
    rows: list[LayerBound] = []
    for index, node in enumerate(graph.nodes.values()):
        if progress is not None:
            progress(index, len(graph.nodes), node.name)
        start = time.perf_counter()
        op = node.op
        incoming = [lipschitz[i] for i in node.inputs]
        composition, own_lower = "", None
        if isinstance(op, Input):
            lipschitz[node.name] = 1.0
            continue
        if isinstance(op, Sum):
            bound, method = residual_sum(incoming), "sum of branch bounds"
            lipschitz[node.name] = bound
            composition = " + ".join(f"{value:.6g}" for value in incoming)
        elif isinstance(op, Concat):
            bound, method = concatenation(incoming), "√Σ L² over branches"
            lipschitz[node.name] = bound
            composition = "√(" + " + ".join(f"{value:.6g}²" for value in incoming) + ")"
        else:
            if len(incoming) != 1:
                raise ValueError(f"node {node.name!r} ({node.layer_type}) must have one input")
            if isinstance(op, Linear):
                bound, method, own_lower = certified_norm(op.map)
            else:
                bound, method = op.bound, op.method
            lipschitz[node.name] = compose([bound, incoming[0]])
        rows.append(
            LayerBound(
                name=node.name,
                layer_type=node.layer_type,
                bound=bound,
                cumulative=lipschitz[node.name],
                method=method,
                seconds=time.perf_counter() - start,
                merged=tuple(node.merged),
                composition=composition,
                lower=own_lower,
            )
        )
    for name, layer_type in skipped or []:
        rows.append(LayerBound(name, layer_type, 1.0, None, "passes values through", 0.0))
    upper = lipschitz[outputs[0]] if len(outputs) == 1 else concatenation(
        lipschitz[o] for o in outputs
    )
    return Certificate(
        model=model_name,
        input_shape=None if input_shape is None else tuple(input_shape),
        upper=upper,
        layers=rows,
        seconds=time.perf_counter() - total_start,
    )


def _prune_unused(graph: Graph, outputs: list[str]) -> None:
    """Drop nodes that no output depends on (e.g. a gate folded into an activation)."""
    needed, stack = set(), list(outputs)
    while stack:
        name = stack.pop()
        if name not in needed:
            needed.add(name)
            stack.extend(graph.nodes[name].inputs)
    for name in [n for n in graph.nodes if n not in needed and n != graph.input_name]:
        del graph.nodes[name]


def _merge_linear_chains(graph: Graph, outputs: list[str]) -> None:
    """Fold each linear node into its linear successor when it feeds nothing else."""
    consumers: dict[str, list[str]] = {name: [] for name in graph.nodes}
    for node in graph.nodes.values():
        for source in node.inputs:
            consumers[source].append(node.name)
    for node in list(graph.nodes.values()):
        if not isinstance(node.op, Linear) or len(node.inputs) != 1:
            continue
        previous = graph.nodes[node.inputs[0]]
        if (
            not isinstance(previous.op, Linear)
            or consumers[previous.name] != [node.name]
            or previous.name in outputs
        ):
            continue
        merged = merge(previous.op.map, node.op.map)
        if merged is None:
            continue
        node.op = Linear(merged)
        node.layer_type = f"{previous.layer_type}+{node.layer_type}"
        node.merged = [*previous.merged, previous.name, *node.merged]
        node.inputs = list(previous.inputs)
        for source in previous.inputs:
            consumers[source] = [node.name if c == previous.name else c for c in consumers[source]]
        del graph.nodes[previous.name]
