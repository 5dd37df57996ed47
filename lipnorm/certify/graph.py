"""The graph IR of bounded nodes that every front end produces, and its composition.

A :class:`Graph` is a DAG of :class:`Node` in topological order, starting at one input.
Each node is one of

* ``Linear(map)``: a linear (or affine) layer, see :mod:`lipnorm.certify.linear`;
* ``Lipschitz(bound, method)``: a nonlinear layer with a known constant (activation,
  max pooling, a user rule);
* ``Sum()``: the sum of its inputs (residual addition);
* ``Concat()``: the concatenation of its inputs.

:func:`prepare_graph` merges adjacent linear maps and drops unused nodes; the bounding
methods (:mod:`lipnorm.certify.methods`) read the result, and the ladder
(:mod:`lipnorm.certify.ladder`) runs them. This module imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lipnorm.certify.linear import DenseMap, LinearMap, ScaleMap, merge

__all__ = ["Concat", "Graph", "Input", "Linear", "Lipschitz", "Node", "Sum", "inferred_shapes", "prepare_graph"]


@dataclass(frozen=True)
class Input:
    """The model's input."""


@dataclass(frozen=True)
class Linear:
    """A linear layer; its map may be merged with its linear neighbours."""

    map: LinearMap


@dataclass(frozen=True)
class Lipschitz:
    """A layer with a known Lipschitz bound.

    Attributes
    ----------
    bound : float
        Upper bound of the layer's Lipschitz constant.
    method : str
        How the bound was obtained (shown in reports).
    slope : (float, float) or None
        For an elementwise activation, a certified interval ``[a, b]`` containing its
        derivative everywhere (``bound = max(|a|, |b|)``); the tight methods use it.
        None for any other nonlinear layer (max pooling, softmax, a user rule), which
        they treat through its bound alone.
    """

    bound: float
    method: str
    slope: tuple[float, float] | None = None


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
        #: Output shape of nodes (batch axis included, of size 1), where the front end knows it.
        self.shapes: dict[str, tuple[int, ...]] = {}

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

    def record_shape(self, name: str, shape) -> None:
        """Note the output shape of node ``name`` (first record wins; ``None`` axes count as 1)."""
        node = self.resolve(name)
        if node in self.nodes and node not in self.shapes:
            self.shapes[node] = tuple(1 if n is None else int(n) for n in shape)

    def resolve(self, name: str) -> str:
        """The node a name refers to, following aliases."""
        while name in self.aliases:
            name = self.aliases[name]
        return name


def prepare_graph(graph: Graph) -> Graph:
    """Resolve the outputs, drop unused nodes and merge adjacent linear maps (in place).

    Parameters
    ----------
    graph : Graph

    Returns
    -------
    Graph
        The same graph, ready for the bounding methods.
    """
    graph.outputs = [graph.resolve(o) for o in graph.outputs]
    if not graph.outputs:
        raise ValueError("the graph has no outputs")
    _prune_unused(graph, graph.outputs)
    _merge_linear_chains(graph, graph.outputs)
    return graph


def inferred_shapes(graph: Graph) -> dict[str, tuple[int, ...]]:
    """The recorded output shapes, with those of activations, scales, sums and dense maps
    inferred from their input where the front end did not record them.

    Parameters
    ----------
    graph : Graph

    Returns
    -------
    dict of str to tuple of int
        Batch axis included (of size 1); nodes whose shape is neither recorded nor
        inferable are missing.
    """
    shapes = dict(graph.shapes)
    for node in graph.nodes.values():
        if node.name in shapes or not node.inputs or node.inputs[0] not in shapes:
            continue
        op, in_shape = node.op, shapes[node.inputs[0]]
        if isinstance(op, Sum) or (isinstance(op, Lipschitz) and op.slope is not None):
            shapes[node.name] = in_shape
        elif isinstance(op, Linear) and isinstance(op.map, ScaleMap):
            shapes[node.name] = in_shape
        elif isinstance(op, Linear) and isinstance(op.map, DenseMap):
            shape = list(in_shape)
            shape[op.map.axis] = op.map.weight.shape[0]
            shapes[node.name] = tuple(shape)
    return shapes


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
