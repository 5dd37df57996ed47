"""The dense view of a graph that the tight methods work on.

A merged :class:`~lipnorm.certify.graph.Graph` whose every linear layer is small enough to
hold as a matrix becomes a :class:`DenseNetwork`: its nonlinear layers are *units*, and
everything between them is linear, so the input ``z_k`` of unit ``k`` is

    z_k = A_k0 x + Σ_{j<k} A_kj w_j

where ``x`` is the model's input and ``w_j`` the output of unit ``j``, and the output is
``f = C_0 x + Σ_j C_j w_j``. A unit is either

* an elementwise activation with a certified slope range ``[a, b]`` (every entry of
  ``w − a z`` and ``b z − w`` moves in the same direction: ``(Δw − aΔz)(bΔz − Δw) ≥ 0``), or
* an *opaque* map known by its Lipschitz bound ``L`` alone (max pooling, softmax, a user
  rule, a linear layer too large to hold as a matrix): ``‖Δw‖ ≤ L‖Δz‖``.

Vectors are the row-major flattenings of the activation tensors (batch axis dropped).
Every block carries ``error``, an upper bound of the spectral norm of the difference
between the float64 matrix held and the exact map of the model, grown by the rounding of
each product and sum that formed it, so bounds computed from the blocks can be made sound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lipnorm.bounds import round_up
from lipnorm.certify.rounding import UNIT_ROUNDOFF, frobenius_upper, gamma
from lipnorm.certify.graph import Concat, Graph, Input, Linear, Lipschitz, Sum, inferred_shapes
from lipnorm.certify.linear import ConvMap, DenseMap, FixedMap, LinearMap, ScaleMap, conv_map_operator
from lipnorm.certify.unit import LoopUnit

__all__ = ["Block", "DenseAlgebra", "DenseCost", "DenseNetwork", "NotDensifiable", "Unit", "add_blocks", "apply_matrix",
           "dense_network", "scale_block"]

#: The largest matrix (entries) a block may have: 2^24 float64 entries are 128 MiB.
MAX_BLOCK_ENTRIES = 2**24


class NotDensifiable(ValueError):
    """The graph has a part the dense view cannot hold; the message says which."""


@dataclass(frozen=True)
class Block:
    """A linear map between two vectors of the network, as a float64 matrix.

    Attributes
    ----------
    matrix : ndarray, shape (rows, columns), or None
        None for the identity (exact), which is never formed.
    size : int
        ``columns`` (the identity's size when ``matrix`` is None).
    error : float
        Upper bound of ‖matrix − exact map‖₂.
    """

    matrix: np.ndarray | None
    size: int
    error: float = 0.0

    @property
    def rows(self) -> int:
        return self.size if self.matrix is None else self.matrix.shape[0]

    def dense(self) -> np.ndarray:
        """The matrix, the identity formed."""
        return np.eye(self.size) if self.matrix is None else self.matrix

    def frobenius(self) -> float:
        """Upper bound of ‖matrix‖_F."""
        if self.matrix is None:
            return round_up(math.sqrt(self.size))
        return frobenius_upper(self.matrix)


@dataclass
class Unit(LoopUnit):
    """A nonlinear layer of a :class:`DenseNetwork`.

    Attributes
    ----------
    name : str
        The graph node.
    input_node : str
        The graph node whose output is ``z`` (the unit's input).
    size_in, size_out : int
        Lengths of ``z`` and ``w`` (equal for an activation).
    slope : (float, float) or None
        ``[a, b]`` for an elementwise activation; None for an opaque unit.
    bound : float
        Upper bound of the unit's Lipschitz constant.
    inputs : dict of int to Block
        ``z = Σ_s inputs[s] v_s`` over sources ``s``: 0 is the model input, ``j + 1`` the
        output of unit ``j``.
    """

    name: str
    input_node: str
    size_in: int
    size_out: int
    slope: tuple[float, float] | None
    bound: float
    inputs: dict[int, Block] = field(default_factory=dict)


@dataclass
class DenseNetwork:
    """A network as units and the linear blocks between them (see the module docstring).

    Attributes
    ----------
    input_size : int
    units : list of Unit
        In topological order.
    output : dict of int to Block
        ``f = Σ_s output[s] v_s``.
    output_size : int
    """

    input_size: int
    units: list[Unit]
    output: dict[int, Block]
    output_size: int

    def source_size(self, source: int) -> int:
        """Length of source ``source`` (0: the input; j + 1: unit j's output)."""
        return self.input_size if source == 0 else self.units[source - 1].size_out


def dense_network(graph: Graph, node_bounds: dict, *, max_entries: int = MAX_BLOCK_ENTRIES) -> DenseNetwork:
    """The dense view of a merged graph.

    Parameters
    ----------
    graph : Graph
        Pruned and merged, with shapes recorded for its nodes.
    node_bounds : dict of str to NodeBound
        The own bound of every unary node (:func:`lipnorm.certify.methods.product.bound_nodes`);
        a linear layer too large for a matrix becomes an opaque unit with this bound.
    max_entries : int
        Largest matrix held.

    Returns
    -------
    DenseNetwork

    Raises
    ------
    NotDensifiable
        Where a node's shape is unknown or a block would exceed ``max_entries``.
    """
    shapes = _shapes(graph)
    values: dict[str, dict[int, Block]] = {}
    units: list[Unit] = []
    for node in graph.nodes.values():
        op = node.op
        if isinstance(op, Input):
            values[node.name] = {0: Block(None, _numel(shapes[node.name]))}
            continue
        sources = [values[i] for i in node.inputs]
        if isinstance(op, Sum):
            values[node.name] = _sum(sources)
            continue
        if isinstance(op, Concat):
            values[node.name] = _concat(sources, [_shape(shapes, i) for i in node.inputs],
                                        _shape(shapes, node.name), node.name)
            continue
        source, in_shape = sources[0], _shape(shapes, node.inputs[0])
        out_shape = _shape(shapes, node.name)
        if isinstance(op, Linear):
            if isinstance(op.map, FixedMap) and op.map.flat_identity:
                values[node.name] = source
                continue
            entries = _numel(in_shape) * _numel(out_shape)
            if entries > max_entries:
                raise NotDensifiable(f"layer {node.name!r} ({node.layer_type}) is a {_numel(out_shape)}×"
                                     f"{_numel(in_shape)} matrix, more than {max_entries} entries")
            matrix = _dense_map(op.map, in_shape, out_shape, max_entries)
            if matrix is not None:
                _check_blocks(source, matrix[0].shape[0], max_entries, node.name)
                values[node.name] = {s: apply_matrix(matrix, block) for s, block in source.items()}
                continue
        slope = op.slope if isinstance(op, Lipschitz) else None
        if slope is not None and slope[0] == slope[1]:  # affine: x ↦ a·x + c, exactly linear
            values[node.name] = {s: scale_block(block, slope[0]) for s, block in source.items()}
            continue
        _check_blocks(source, _numel(in_shape), max_entries, node.name)
        unit = Unit(node.name, node.inputs[0], _numel(in_shape), _numel(out_shape), slope,
                    node_bounds[node.name].upper, dict(source))
        units.append(unit)
        values[node.name] = {len(units): Block(None, unit.size_out)}
    outputs = [values[o] for o in graph.outputs]
    output = outputs[0] if len(outputs) == 1 else _stack(outputs)
    _check_blocks(output, next(iter(output.values())).rows, max_entries, "the output")
    network = DenseNetwork(_numel(shapes[graph.input_name]), units, output,
                           next(iter(output.values())).rows)
    for unit in network.units:
        if unit.slope is not None and unit.size_in != unit.size_out:
            raise NotDensifiable(f"activation {unit.name!r} changes the size of its input")
    return network


def _check_blocks(blocks: dict[int, Block], rows: int, max_entries: int, name: str) -> None:
    """Refuse a node whose blocks (rows × each source's size) would be too large to hold."""
    for block in blocks.values():
        if rows * block.size > max_entries:
            raise NotDensifiable(f"the map into {name!r} from an earlier layer is a {rows}×{block.size} "
                                 f"matrix, more than {max_entries} entries")


def _shape(shapes: dict, name: str) -> tuple[int, ...]:
    if name not in shapes:
        raise NotDensifiable(f"the output shape of layer {name!r} is unknown")
    return shapes[name]


def _shapes(graph: Graph) -> dict[str, tuple[int, ...]]:
    shapes = inferred_shapes(graph)
    if graph.input_name not in shapes:
        raise NotDensifiable("the input shape is unknown")
    return shapes


def _dense_map(linear_map: LinearMap, in_shape, out_shape, max_entries: int):
    """(matrix, error) of a linear map on flattened tensors, or None when not held densely."""
    n_in, n_out = _numel(in_shape), _numel(out_shape)
    if n_in * n_out > max_entries:
        return None
    if isinstance(linear_map, DenseMap):
        axis = linear_map.axis % len(in_shape)
        before, after = _numel(in_shape[1:axis]), _numel(in_shape[axis + 1:])
        matrix = np.kron(np.kron(np.eye(before), linear_map.weight), np.eye(after))
        return matrix, linear_map.error
    if isinstance(linear_map, ScaleMap):
        scale = np.asarray(linear_map.scale, dtype=np.float64)
        if linear_map.axis is None or scale.ndim == 0:
            diagonal = np.full(n_in, float(scale))
        else:
            shape = [1] * len(in_shape)
            shape[linear_map.axis % len(in_shape)] = scale.size
            diagonal = np.broadcast_to(scale.reshape(shape), in_shape).ravel()
        return np.diag(diagonal), linear_map.error
    if isinstance(linear_map, FixedMap) and linear_map.spatial_factors is not None:
        return _spatial_map(linear_map, in_shape, out_shape)
    if isinstance(linear_map, ConvMap):
        matrix = np.asarray(conv_map_operator(linear_map).to_dense(), dtype=np.float64)
        if linear_map.channel_axis % len(in_shape) != 1:  # channels last: permute both sides
            matrix = matrix[np.ix_(_channels_first_positions(out_shape), _channels_first_positions(in_shape))]
        if matrix.shape != (n_out, n_in):
            return None
        return matrix, linear_map.error
    return None


def _spatial_map(linear_map: FixedMap, in_shape, out_shape):
    """The matrix of a map acting per spatial axis (1-D factors) and alike on every channel."""
    factors = [np.asarray(f, dtype=np.float64) for f in linear_map.spatial_factors]
    channels = in_shape[-1] if linear_map.channels_last else in_shape[1]
    pieces = [*factors, np.eye(channels)] if linear_map.channels_last else [np.eye(channels), *factors]
    matrix = pieces[0]
    for piece in pieces[1:]:
        matrix = np.kron(matrix, piece)
    if matrix.shape != (_numel(out_shape), _numel(in_shape)):
        return None
    # the 1-D entries 1/divisor are each within u of exact; kron products add one rounding per factor
    return matrix, round_up(2 * (len(factors) + 1) * UNIT_ROUNDOFF * frobenius_upper(matrix))


def _channels_first_positions(shape) -> np.ndarray:
    """For each entry of a channels-last tensor (row-major), its index in the channels-first flattening."""
    spatial, channels = tuple(shape[1:-1]), shape[-1]
    return np.arange(channels * math.prod(spatial)).reshape((channels, *spatial)).transpose(
        tuple(range(1, len(spatial) + 1)) + (0,)).ravel()


def apply_matrix(map_and_error, block: Block) -> Block:
    """The block of ``map ∘ block``, with the rounding of the product in its error."""
    matrix, map_error = map_and_error
    if block.matrix is None:
        return Block(matrix, block.size, map_error)
    product = matrix @ block.matrix
    inner = matrix.shape[1]
    rounding = gamma(inner) * frobenius_upper(np.abs(matrix) @ np.abs(block.matrix))
    error = round_up(rounding + frobenius_upper(matrix) * block.error + map_error * block.frobenius()
                     + map_error * block.error)
    return Block(product, block.size, error)


def _sum(values: list[dict[int, Block]]) -> dict[int, Block]:
    total: dict[int, Block] = {}
    for value in values:
        for source, block in value.items():
            if source not in total:
                total[source] = block
                continue
            total[source] = add_blocks(total[source], block)
    return total


def scale_block(block: Block, scale: float) -> Block:
    """The block of ``scale`` times a map, with the rounding of the scaling in its error."""
    product = scale * block.dense()
    return Block(product, block.size,
                 round_up(abs(scale) * block.error + UNIT_ROUNDOFF * frobenius_upper(product)))


def add_blocks(left: Block, right: Block) -> Block:
    """The block of the sum of two maps from one source, with the sum's rounding in its error."""
    matrix = left.dense() + right.dense()
    return Block(matrix, right.size, round_up(left.error + right.error + UNIT_ROUNDOFF * frobenius_upper(matrix)))


def _concat(values, in_shapes, out_shape, name: str) -> dict[int, Block]:
    """Blocks of a concatenation: each input's rows go where its entries land in the output."""
    axis = _concat_axis(in_shapes, out_shape, name)
    positions = np.arange(_numel(out_shape)).reshape(out_shape)
    offset, placed = 0, []
    for shape in in_shapes:
        index = [slice(None)] * len(out_shape)
        index[axis] = slice(offset, offset + shape[axis])
        placed.append(positions[tuple(index)].ravel())
        offset += shape[axis]
    return _stack(values, placed, _numel(out_shape))


def _concat_axis(in_shapes, out_shape, name: str) -> int:
    for axis in range(1, len(out_shape)):
        if (all(len(s) == len(out_shape) for s in in_shapes)
                and sum(s[axis] for s in in_shapes) == out_shape[axis]
                and all(s[:axis] + s[axis + 1:] == out_shape[:axis] + out_shape[axis + 1:] for s in in_shapes)):
            return axis
    raise NotDensifiable(f"the concatenation {name!r} joins shapes {in_shapes} into {out_shape} "
                         "along no single axis")


def _stack(values, placed=None, rows: int | None = None) -> dict[int, Block]:
    """Blocks of the vectors ``values`` stacked (rows ``placed[i]`` for the i-th; default in order)."""
    sizes = [next(iter(v.values())).rows for v in values]
    if placed is None:
        starts = np.cumsum([0, *sizes])
        placed = [np.arange(starts[i], starts[i + 1]) for i in range(len(values))]
        rows = int(starts[-1])
    stacked: dict[int, tuple[np.ndarray, float]] = {}
    for value, where in zip(values, placed):
        for source, block in value.items():
            matrix, error = stacked.get(source, (np.zeros((rows, block.size)), 0.0))
            matrix[where] = block.dense()
            stacked[source] = (matrix, math.hypot(error, block.error))
    return {s: Block(m, m.shape[1], round_up(e * (1 + 1e-15))) for s, (m, e) in stacked.items()}




def _numel(shape) -> int:
    return math.prod(shape[1:]) if len(shape) else 1


class DenseAlgebra:
    """The dense view's blocks as the chain method's block operations (one part, matrices).

    Parameters
    ----------
    network : DenseNetwork
    """

    def __init__(self, network: DenseNetwork):
        self.network = network
        self.values: dict = {}  # key -> certified norm
        self.blocks: dict = {}  # key -> block whose norm is certified when asked

    def parts(self):
        return [None]

    def evaluate(self, block: Block, source: int, part) -> Block:
        return block

    def compose(self, left: Block, right: Block, scale: float) -> Block:
        """``scale · left · right`` with its error bound."""
        if left.matrix is None:  # an identity block (exact)
            return scale_block(right, scale)
        scaled = scale_block(left, scale)
        return apply_matrix((scaled.matrix, scaled.error), right)

    def add(self, left: Block, right: Block) -> Block:
        return add_blocks(left, right)

    def record(self, key, block: Block, part) -> None:
        """Certify a chain's norm now (the output's chains are kept for :meth:`row_norms`);
        keep a direct block, whose norm is certified only when asked."""
        if key[0] == "direct" or key[1] == len(self.network.units):
            self.blocks[key] = block
        if key[0] == "chain":
            direct = ("direct", *key[1:])
            self.values[key] = self.norm(direct) if self.blocks.get(direct) is block else _certified_norm(block)

    def norm(self, key) -> float:
        if key not in self.values:
            block = self.blocks.get(key)
            self.values[key] = 0.0 if block is None else _certified_norm(block)
        return self.values[key]

    def row_norms(self, key, rows: np.ndarray) -> np.ndarray:
        """Certified ‖rows[i] · P‖ for every row (0 where no chain was recorded)."""
        block = self.blocks.get(key)
        if block is None:
            return np.zeros(rows.shape[0])
        matrix = block.dense()
        product = rows @ matrix
        rounding = gamma(rows.shape[1] + 1) * np.linalg.norm(np.abs(rows) @ np.abs(matrix), axis=1)
        norms = np.linalg.norm(product, axis=1) * (1 + 4 * gamma(product.shape[1] + 1))
        total = norms + rounding + np.linalg.norm(rows, axis=1) * block.error
        return np.array([round_up(float(v) * (1 + 1e-12)) for v in total])


def _certified_norm(block: Block) -> float:
    """Certified upper bound of the exact map's norm."""
    if block.matrix is None:
        return round_up(1.0 + block.error)
    import lipnorm

    matrix = block.matrix
    if not np.any(matrix):
        return round_up(block.error)
    return round_up(lipnorm.sigma_bounds(matrix).upper + block.error)


class DenseCost:
    """The floating-point work of the chain method on a dense network, by a pass over shapes.

    The same recursion as :class:`DenseAlgebra`, counting real flops: a product of
    ``m × k`` and ``k × n`` matrices ``2 m k n`` (twice, with its rounding bound), a certified
    norm a Gram matrix (``side² · other``) and a Cholesky factorization (``side³ / 3``).

    Parameters
    ----------
    network : DenseNetwork, or any network of the same structure
    shape_of : callable, optional
        ``shape_of(block, source)``: the shape of a direct block as a matrix (None for an
        identity); by default that of the dense view's block. Given another view of the
        same graph (the torus view, whose windows are the dense view's tensors), it
        estimates the dense view's work before the dense view is built.
    """

    def __init__(self, network, shape_of=None):
        self.network = network
        self.flops = 0.0
        self.shape_of = shape_of or (lambda block, source: None if block.matrix is None else block.matrix.shape)

    def parts(self):
        return [None]

    def evaluate(self, block, source: int, part):
        return self.shape_of(block, source)

    def compose(self, left, right, scale: float):
        if left is None or right is None:
            return right if left is None else left
        self.flops += 4.0 * left[0] * left[1] * right[1]
        return (left[0], right[1])

    def add(self, left, right):
        return left if left is not None else right

    def record(self, key, block, part) -> None:
        if key[0] == "chain" and block is not None:
            side, other = sorted(block)
            self.flops += 2.0 * side * side * other + side**3 / 3

    def norm(self, key) -> float:
        return 0.0

    def row_norms(self, key, rows):
        return None
