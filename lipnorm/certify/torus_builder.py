"""The torus view of a graph: from the graph IR to a :class:`~lipnorm.certify.torus.TorusNetwork`.

Three passes. The first reads every node: what it is on the torus (a convolution, a unit,
a sum, a pass-through), its tensor's channels and window, its stride from its *segment*
(the tensors linked by linear maps; an opaque unit's output starts a new one), whether
the tensor is zero outside its window (*clean*), where a mask must come first, and what
grid size each layer's reads need. The second chooses the grids: in a segment a tensor's
grid is ``B / σ`` (``σ`` its stride from the segment's finest tensor); ``B`` is the
smallest size that holds every layer's reads (``N ≥ max(L − p, p + n, m s)`` per layer,
:func:`lipnorm.conv.bounds.embedding_grid`'s condition), divisible by every ``σ`` and by
the fiber grid, which is chosen per axis to hold the fewest grid points (and, at equal
cost, to give the most fibers). Circular padding is exact on the grid of its input's size
(nothing is masked there); a segment whose layers need that grid and a larger one cannot
be held. The third builds the spaces, the convolutions and the units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from lipnorm.bounds import round_up
from lipnorm.certify.graph import Concat, Graph, Input, Linear, Lipschitz, Sum, inferred_shapes
from lipnorm.certify.linear import ConvMap, DenseMap, FixedMap, ScaleMap
from lipnorm.certify.rounding import UNIT_ROUNDOFF
from lipnorm.certify.torus import NotOnTorus, TorusBlock, TorusConv, TorusNetwork, TorusPath, TorusSpace, TorusUnit

__all__ = ["torus_network"]

#: Largest fiber grid tried per axis when the base grids are chosen.
_MAX_FIBER = 64
#: Share of grid points (per axis) the grids may add beyond the fewest for more fibers,
#: where the fewest leave fewer than _MIN_FIBER fibers per axis.
_GRID_SLACK = 0.12
_MIN_FIBER = 6


def torus_network(graph: Graph, node_bounds: dict) -> TorusNetwork:
    """The torus view of a merged graph with at least one convolution.

    Parameters
    ----------
    graph : Graph
        Pruned and merged (:func:`lipnorm.certify.graph.prepare_graph`), with shapes.
    node_bounds : dict of str to NodeBound
        Each unary node's own bound (:func:`lipnorm.certify.methods.product.bound_nodes`):
        an opaque unit's bound.

    Returns
    -------
    TorusNetwork

    Raises
    ------
    NotOnTorus
        For a graph without convolutions, or a layer the view cannot hold (the message
        names it).
    """
    plan = _Plan(graph)
    for node in graph.nodes.values():
        plan.visit(node)
    return _Assembly(plan, node_bounds).network()


# ---------------------------------------------------------------------------------------------
# Pass 1: what every node is on the torus, with grids still symbolic
# ---------------------------------------------------------------------------------------------


@dataclass
class _Tensor:
    """A tensor on the torus before grids are chosen.

    ``sigma`` is its stride from its segment's reference per axis (a Fraction), None for a
    tensor on the one-point grid; ``clean``: zero outside the window.
    """

    channels: int
    window: tuple[int, ...]
    segment: int
    sigma: tuple[Fraction, ...] | None
    clean: bool
    flat_view: bool = False  # the model holds it flattened (a later dense layer reads the window)


@dataclass
class _Spec:
    """A convolution to build once grids are known (``head``: its stride is the source grid)."""

    name: str
    kernel: np.ndarray
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    origin: tuple[int, ...]
    groups: int
    error: float
    head: bool = False


@dataclass
class _Step:
    """What a node does: ``kind`` in input, linear, unit, sum, concat, pass."""

    kind: str
    specs: list = field(default_factory=list)  # linear: the convolutions in order; concat: one per input
    mask: bool = False  # linear: a mask unit comes first
    scale: float = 1.0
    scale_error: float = 0.0


class _Plan:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.shapes = inferred_shapes(graph)
        if graph.input_name not in self.shapes:
            raise NotOnTorus("the input shape is unknown")
        layouts = set()  # (channels last, spatial axes) of every convolution and average pooling
        for node in graph.nodes.values():
            linear_map = node.op.map if isinstance(node.op, Linear) else None
            if isinstance(linear_map, ConvMap):
                ndim = len(linear_map.input_spatial)
                layouts.add((linear_map.channel_axis % (ndim + 2) != 1, ndim))
            elif isinstance(linear_map, FixedMap) and linear_map.spatial_factors is not None:
                layouts.add((linear_map.channels_last, len(linear_map.spatial_factors)))
        if not layouts:
            raise NotOnTorus("the graph has no convolution or average pooling (the dense view holds it)")
        if len(layouts) != 1:
            raise NotOnTorus("the convolutions and poolings mix layouts or numbers of spatial axes")
        self.channels_last, self.ndim = layouts.pop()
        self.tensors: dict[str, _Tensor] = {}
        self.steps: dict[str, _Step] = {}
        self.segments: list[dict] = []  # each: {"needs": [(sigma, need, name)], "exact": [...]}
        self.parent: list[int] = []  # segments merged into another: union-find
        self.pending_circular: dict[str, tuple] = {}  # node -> (source tensor node, pads)

    # --- segments -----------------------------------------------------------------------
    def new_segment(self) -> int:
        self.segments.append({"needs": [], "exact": []})
        self.parent.append(len(self.parent))
        return len(self.segments) - 1

    def root(self, segment: int) -> int:
        while self.parent[segment] != segment:
            segment = self.parent[segment]
        return segment

    def unify(self, tensors: list[_Tensor], name: str) -> None:
        """Put tensors that meet (a sum, a concatenation) on the same grid."""
        first = tensors[0]
        for other in tensors[1:]:
            if (first.sigma is None) != (other.sigma is None):
                raise NotOnTorus(f"layer {name!r} joins a vector with a feature map")
            a, b = self.root(first.segment), self.root(other.segment)
            if first.sigma is None or a == b:
                if first.sigma != other.sigma:
                    raise NotOnTorus(f"layer {name!r} joins tensors of different resolutions")
                continue
            ratio = tuple(x / y for x, y in zip(first.sigma, other.sigma))
            self._rescale(b, ratio)
            self.parent[b] = a

    def _rescale(self, segment: int, ratio) -> None:
        for tensor in self.tensors.values():
            if self.root(tensor.segment) == segment and tensor.sigma is not None:
                tensor.sigma = tuple(s * r for s, r in zip(tensor.sigma, ratio))
        for key in ("needs", "exact"):
            self.segments[segment][key] = [(tuple(s * r for s, r in zip(sigma, ratio)), value, name)
                                           for sigma, value, name in self.segments[segment][key]]

    def require(self, tensor: _Tensor, need, name: str, exact: bool = False) -> None:
        """The grid of ``tensor`` must be at least ``need`` per axis (exactly, if ``exact``)."""
        segment = self.segments[self.root(tensor.segment)]
        segment["exact" if exact else "needs"].append((tensor.sigma, tuple(need), name))

    # --- nodes --------------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.shapes:
            raise NotOnTorus(f"the output shape of layer {name!r} is unknown")
        return self.shapes[name]

    def spatial(self, shape) -> tuple[int, tuple[int, ...]]:
        """(channels, window) of a model tensor's shape (batch axis included)."""
        if len(shape) == self.ndim + 2:
            return (shape[-1], tuple(shape[1:-1])) if self.channels_last else (shape[1], tuple(shape[2:]))
        if len(shape) == 2:
            return shape[1], (1,) * self.ndim
        raise NotOnTorus(f"a tensor of shape {shape[1:]} is neither a {self.ndim}-d feature map nor a vector")

    def visit(self, node) -> None:
        op, name = node.op, node.name
        if isinstance(op, Input):
            shape = self._input_shape()
            channels, window = self.spatial(shape)
            vector = all(n == 1 for n in window) and len(shape) == 2
            self.tensors[name] = _Tensor(channels, window, self.new_segment(),
                                         None if vector else (Fraction(1),) * self.ndim, True)
            self.steps[name] = _Step("input")
            return
        if isinstance(op, Sum):
            inputs = [self.tensors[i] for i in node.inputs]
            self.unify(inputs, name)
            first = inputs[0]
            if any((t.channels, t.window) != (first.channels, first.window) for t in inputs):
                raise NotOnTorus(f"layer {name!r} ({node.layer_type}) adds tensors of different shapes")
            self.tensors[name] = _Tensor(first.channels, first.window, first.segment, first.sigma,
                                         all(t.clean for t in inputs), first.flat_view)
            self.steps[name] = _Step("sum")
            return
        if isinstance(op, Concat):
            self._concat(node)
            return
        source = self.tensors[node.inputs[0]]
        if isinstance(op, Lipschitz):
            self._nonlinear(node, source)
            return
        self._linear(node, source)

    def _input_shape(self):
        """The input's shape; a flat input that is only reshaped into a feature map takes that shape."""
        name = self.graph.input_name
        shape = self.shape(name)
        consumers = [n for n in self.graph.nodes.values() if name in n.inputs]
        if (len(shape) == 2 and len(consumers) == 1 and isinstance(consumers[0].op, Linear)
                and isinstance(consumers[0].op.map, FixedMap) and consumers[0].op.map.flat_identity
                and len(self.shape(consumers[0].name)) == self.ndim + 2):
            return self.shape(consumers[0].name)
        return shape

    def _nonlinear(self, node, source: _Tensor) -> None:
        op = node.op
        if op.slope is not None:
            self.tensors[node.name] = _Tensor(source.channels, source.window, source.segment, source.sigma,
                                              True, source.flat_view)
            self.steps[node.name] = _Step("unit")
            return
        channels, window = self.spatial(self.shape(node.name))
        vector = len(self.shape(node.name)) == 2 or all(n == 1 for n in window)
        self.tensors[node.name] = _Tensor(channels, window, self.new_segment(),
                                          None if vector else (Fraction(1),) * self.ndim, True)
        self.steps[node.name] = _Step("unit")

    def _concat(self, node) -> None:
        inputs = [self.tensors[i] for i in node.inputs]
        out_shape = self.shape(node.name)
        channels, window = self.spatial(out_shape)
        if any(t.window != window for t in inputs) or sum(t.channels for t in inputs) != channels:
            raise NotOnTorus(f"layer {node.name!r} ({node.layer_type}) concatenates along an axis "
                             "other than the channels")
        self.unify(inputs, node.name)
        specs, offset = [], 0
        for tensor in inputs:
            kernel = np.zeros((channels, tensor.channels) + (1,) * self.ndim)
            kernel[offset + np.arange(tensor.channels), np.arange(tensor.channels)] = 1.0
            offset += tensor.channels
            specs.append(_Spec(node.name, kernel, (1,) * self.ndim, (1,) * self.ndim, (0,) * self.ndim, 1, 0.0))
        first = inputs[0]
        self.tensors[node.name] = _Tensor(channels, window, first.segment, first.sigma,
                                          all(t.clean for t in inputs))
        self.steps[node.name] = _Step("concat", specs)

    def _linear(self, node, source: _Tensor) -> None:
        linear_map, name = node.op.map, node.name
        if isinstance(linear_map, FixedMap) and linear_map.padding_mode == "circular":
            self._circular_padding(node, source)
            return
        out_shape = self.shape(name)
        in_shape = self.shapes.get(node.inputs[0])
        if isinstance(linear_map, FixedMap) and linear_map.flat_identity:
            self._reshape(node, source, out_shape)
            return
        if isinstance(linear_map, ScaleMap):
            self._scale(node, source, linear_map, in_shape)
            return
        if isinstance(linear_map, ConvMap):
            spec, geometry = self._conv_spec(node, source, linear_map)
        elif isinstance(linear_map, DenseMap):
            spec, geometry = self._dense_spec(node, source, linear_map, in_shape)
        elif isinstance(linear_map, FixedMap) and linear_map.padding is not None:
            spec, geometry = self._padding_spec(node, source, linear_map)
        elif isinstance(linear_map, FixedMap) and linear_map.spatial_factors is not None:
            spec, geometry = self._pool_spec(node, source, linear_map)
        else:
            raise NotOnTorus(f"layer {name!r} ({node.layer_type}) is a fixed map ({linear_map.method}) "
                             "that is not a convolution on the torus")
        self._place(node, source, spec, geometry, out_shape)

    def _reshape(self, node, source: _Tensor, out_shape) -> None:
        channels, window = self.spatial(out_shape) if len(out_shape) in (2, self.ndim + 2) else (None, None)
        flattening = len(out_shape) == 2 and source.sigma is not None and source.channels * math.prod(
            source.window) == out_shape[1]
        same = (channels, window) == (source.channels, source.window)
        if node.inputs[0] == self.graph.input_name and len(self.shape(self.graph.input_name)) == 2:
            same = True  # the input was taken in this shape (_input_shape)
        if not (same or flattening):
            raise NotOnTorus(f"layer {node.name!r} ({node.layer_type}) reshapes a tensor of "
                             f"{source.channels} channels on {source.window} into {out_shape[1:]}")
        self.tensors[node.name] = _Tensor(source.channels, source.window, source.segment, source.sigma,
                                          source.clean, source.flat_view or (flattening and not same))
        self.steps[node.name] = _Step("pass")

    def _circular_padding(self, node, source: _Tensor) -> None:
        pads = self._spatial_pads(node, node.op.map)
        self.pending_circular[node.name] = pads
        self.tensors[node.name] = source
        self.steps[node.name] = _Step("pass")

    def _scale(self, node, source: _Tensor, scale_map: ScaleMap, in_shape) -> None:
        scale = np.asarray(scale_map.scale, dtype=np.float64)
        self.tensors[node.name] = source
        if scale_map.axis is None or scale.ndim == 0:
            self.steps[node.name] = _Step("linear", scale=float(scale), scale_error=scale_map.error)
            return
        rank = len(in_shape) if in_shape is not None else self.ndim + 2
        axis = scale_map.axis % rank
        channel_axis = 1 if rank == 2 else (rank - 1 if self.channels_last else 1)
        if axis != channel_axis or (source.flat_view and math.prod(source.window) > 1):
            raise NotOnTorus(f"layer {node.name!r} ({node.layer_type}) scales each entry differently "
                             "along a spatial axis")
        kernel = np.zeros((scale.size, 1) + (1,) * self.ndim)
        kernel[:, 0] = scale.reshape((-1,) + (1,) * self.ndim)
        spec = _Spec(node.name, kernel, (1,) * self.ndim, (1,) * self.ndim, (0,) * self.ndim, scale.size,
                     scale_map.error)
        self.steps[node.name] = _Step("linear", [spec])

    def _conv_spec(self, node, source: _Tensor, conv: ConvMap):
        if conv.transposed:
            raise NotOnTorus(f"layer {node.name!r} ({node.layer_type}) is a transposed convolution, "
                             "which the torus view does not hold")
        padding = conv.padding
        circular = self.pending_circular.get(node.inputs[0])
        n = tuple(conv.input_spatial)
        if circular is not None:
            n = tuple(size - lo - hi for size, (lo, hi) in zip(n, circular))
            padding = circular
        spec = _Spec(node.name, np.asarray(conv.kernel, dtype=np.float64), tuple(conv.stride),
                     tuple(conv.dilation), tuple(-lo for lo, _ in padding), conv.groups, conv.error)
        extent = tuple(d * (k - 1) + 1 for k, d in zip(conv.kernel.shape[2:], conv.dilation))
        return spec, (n, padding, extent, circular is not None)

    def _dense_spec(self, node, source: _Tensor, dense: DenseMap, in_shape):
        weight = np.asarray(dense.weight, dtype=np.float64)
        rank = len(in_shape) if in_shape is not None else self.ndim + 2
        axis = dense.axis % rank
        unit = (1,) * self.ndim
        if rank == 2 and axis == 1 and source.sigma is not None and math.prod(source.window) > 1:
            # a dense layer reading a flattened window: a convolution covering it, to one point
            if self.channels_last:
                kernel = np.moveaxis(weight.reshape((weight.shape[0], *source.window, source.channels)), -1, 1)
            else:
                kernel = weight.reshape((weight.shape[0], source.channels, *source.window))
            spec = _Spec(node.name, np.ascontiguousarray(kernel), unit, unit, (0,) * self.ndim, 1,
                         dense.error, head=True)
            return spec, None
        channel_axis = 1 if rank == 2 else (rank - 1 if self.channels_last else 1)
        if axis != channel_axis:
            raise NotOnTorus(f"layer {node.name!r} ({node.layer_type}) is a dense layer along a "
                             "spatial axis")
        kernel = weight.reshape(weight.shape + unit)
        return _Spec(node.name, kernel, unit, unit, (0,) * self.ndim, 1, dense.error), self._pointwise(source)

    def _pointwise(self, source: _Tensor):
        return source.window, ((0, 0),) * self.ndim, (1,) * self.ndim, False

    def _spatial_pads(self, node, fixed: FixedMap):
        pads = fixed.padding
        rank = len(pads)
        channel_axis = rank - 1 if self.channels_last else 1
        spatial_axes = [a for a in range(1, rank) if a != channel_axis]
        if pads[0] != (0, 0) or pads[channel_axis] != (0, 0) or len(spatial_axes) != self.ndim:
            raise NotOnTorus(f"layer {node.name!r} ({node.layer_type}) pads the batch or channel axis")
        spatial = tuple(pads[a] for a in spatial_axes)
        if any(lo < 0 or hi < 0 for lo, hi in spatial):
            raise NotOnTorus(f"layer {node.name!r} ({node.layer_type}) crops (negative padding)")
        return spatial

    def _padding_spec(self, node, source: _Tensor, fixed: FixedMap):
        if fixed.padding_mode != "constant":
            raise NotOnTorus(f"layer {node.name!r} ({node.layer_type}) uses {fixed.padding_mode} padding, "
                             "which is not a convolution on the torus")
        pads = self._spatial_pads(node, fixed)
        kernel = np.ones((source.channels, 1) + (1,) * self.ndim)
        spec = _Spec(node.name, kernel, (1,) * self.ndim, (1,) * self.ndim, tuple(-lo for lo, _ in pads),
                     source.channels, 0.0)
        return spec, (source.window, pads, (1,) * self.ndim, False)

    def _pool_spec(self, node, source: _Tensor, pool: FixedMap):
        factors = [np.asarray(f, dtype=np.float64) for f in pool.spatial_factors]
        if all(f.shape[0] == 1 for f in factors) and all(np.all(f == f[0, 0]) for f in factors):
            # a global average: a convolution covering the window, to one point
            value = math.prod(float(f[0, 0]) for f in factors)
            kernel = np.full((source.channels, 1, *source.window), value)
            error = round_up(4 * (self.ndim + 1) * UNIT_ROUNDOFF * value * math.prod(source.window))
            spec = _Spec(node.name, kernel, (1,) * self.ndim, (1,) * self.ndim, (0,) * self.ndim,
                         source.channels, error, head=True)
            return spec, None
        bands = [_uniform_band(f) for f in factors]
        if any(band is None for band in bands):
            raise NotOnTorus(f"layer {node.name!r} ({node.layer_type}) averages windows of different "
                             "sizes (padding not counted), which is not a convolution on the torus")
        size = tuple(k for k, _, _, _ in bands)
        value = math.prod(v for _, _, _, v in bands)
        kernel = np.full((source.channels, 1, *size), value)
        error = round_up(4 * (self.ndim + 1) * UNIT_ROUNDOFF * value * math.prod(size))
        spec = _Spec(node.name, kernel, tuple(s for _, s, _, _ in bands), (1,) * self.ndim,
                     tuple(-p for _, _, p, _ in bands), source.channels, error)
        pads = tuple((p, 0) for _, _, p, _ in bands)
        return spec, (source.window, pads, size, False)

    def _place(self, node, source: _Tensor, spec: _Spec, geometry, out_shape) -> None:
        """The tensor a convolution spec makes from ``source``; grid requirements and masks."""
        channels, window = self.spatial(out_shape)
        if spec.head:
            if source.sigma is not None:
                self.require(source, source.window, node.name)
            self.tensors[node.name] = _Tensor(channels, window, source.segment, None, True)
            self.steps[node.name] = _Step("linear", [spec], mask=False)
            return
        n, pads, extent, circular = geometry
        stride = spec.stride
        m = tuple((size + lo + hi - e) // s + 1 for size, (lo, hi), e, s in zip(n, pads, extent, stride))
        if m != window or (spec.kernel.shape[0] != channels):
            raise NotOnTorus(f"layer {node.name!r} ({node.layer_type}) has output {out_shape[1:]}, not the "
                             f"{channels} channels on {m} its geometry gives")
        if source.sigma is None:
            if any(s != 1 or e != 1 or lo != 0 for s, e, (lo, _) in zip(stride, extent, pads)):
                raise NotOnTorus(f"layer {node.name!r} ({node.layer_type}) convolves a vector")
            self.tensors[node.name] = _Tensor(channels, window, source.segment, None, source.clean)
            self.steps[node.name] = _Step("linear", [spec])
            return
        if source.flat_view and math.prod(source.window) > 1:
            raise NotOnTorus(f"layer {node.name!r} ({node.layer_type}) reads a flattened feature map")
        length = tuple(s * (size - 1) + e for s, size, e in zip(stride, m, extent))
        sigma_out = tuple(g * s for g, s in zip(source.sigma, stride))
        if circular:
            if any(size % s or size // s != out for size, s, out in zip(n, stride, m)):
                raise NotOnTorus(f"layer {node.name!r} ({node.layer_type}) has circular padding whose output "
                                 "is not the input's size over the stride")
            self.require(source, n, node.name, exact=True)
            self.tensors[node.name] = _Tensor(channels, window, source.segment, sigma_out, True)
            self.steps[node.name] = _Step("linear", [spec])
            return
        need = tuple(max(L - lo, lo + size, out * s)
                     for L, (lo, _), size, out, s in zip(length, pads, n, m, stride))
        self.require(source, need, node.name)
        reads_outside = any(lo > 0 or L - lo > size for L, (lo, _), size in zip(length, pads, n))
        mask = reads_outside and not source.clean
        clean = all(out * s - lo >= size and e - s - lo <= 0
                    for out, s, (lo, _), size, e in zip(m, stride, pads, n, extent))
        self.tensors[node.name] = _Tensor(channels, window, source.segment, sigma_out, clean)
        self.steps[node.name] = _Step("linear", [spec], mask=mask)

    # --- pass 2: grids --------------------------------------------------------------------
    def grids(self) -> tuple[dict[int, tuple[int, ...]], tuple[int, ...]]:
        """The base grid of every segment (per axis, for σ = 1) and the fiber grid.

        Per axis, every fiber size up to :data:`_MAX_FIBER` is tried; the bases holding the
        fewest grid points win (the largest fiber of those). Where that fiber is below
        :data:`_MIN_FIBER` (two segments whose grids share only a factor 2: few, large
        fibers), the cheapest bases within :data:`_GRID_SLACK` more grid points with a fiber
        of at least :data:`_MIN_FIBER` are taken instead.
        """
        roots = sorted({self.root(t.segment) for t in self.tensors.values() if t.sigma is not None})
        for r in roots:
            self._normalize(r)
        bases: dict[int, list] = {r: [0] * self.ndim for r in roots}
        fiber = []
        for axis in range(self.ndim):
            options = []
            for candidate in range(1, _MAX_FIBER + 1):
                axis_bases = [self._axis_base(r, axis, candidate) for r in roots]
                if all(base is not None for base in axis_bases):
                    options.append((sum(axis_bases), candidate, axis_bases))
            if not options:
                raise NotOnTorus(self._exact_conflict(axis))
            fewest = min(cost for cost, _, _ in options)
            _, chosen, axis_bases = max((o for o in options if o[0] == fewest), key=lambda o: o[1])
            if chosen < _MIN_FIBER:  # few fibers, large ones: a little more grid for more of them
                roomy = [o for o in options if o[0] <= fewest * (1 + _GRID_SLACK) and o[1] >= _MIN_FIBER]
                if roomy:
                    _, chosen, axis_bases = min(roomy, key=lambda o: (o[0], -o[1]))
            fiber.append(chosen)
            for r, base in zip(roots, axis_bases):
                bases[r][axis] = base
        return {r: tuple(b) for r, b in bases.items()}, tuple(fiber)

    def _normalize(self, root: int) -> None:
        """Rescale a segment's strides to integers whose smallest is 1 on every axis."""
        sigmas = [t.sigma for t in self.tensors.values() if t.sigma is not None and self.root(t.segment) == root]
        ratio = tuple(Fraction(math.lcm(*(s[a].denominator for s in sigmas)), math.gcd(*(s[a].numerator for s in sigmas)))
                      for a in range(self.ndim))
        self._rescale(root, ratio)

    def _axis_base(self, root: int, axis: int, fiber: int) -> int | None:
        """The smallest base on ``axis`` meeting every requirement, or None."""
        sigmas = [int(t.sigma[axis]) for t in self.tensors.values()
                  if t.sigma is not None and self.root(t.segment) == root]
        step = math.lcm(*sigmas)
        lowest = max([1] + [need[axis] * int(sigma[axis]) for sigma, need, _ in self.segments[root]["needs"]])
        exact = {need[axis] * int(sigma[axis]) for sigma, need, _ in self.segments[root]["exact"]}
        candidates = [exact.pop()] if len(exact) == 1 else [] if exact else range(
            step * -(-lowest // step), step * (-(-lowest // step) + 64), step)
        for base in candidates:
            grids = [base // s for s in sigmas]
            if base >= lowest and base % step == 0 and all(g % fiber == 0 for g in grids):
                return base
        return None

    def _exact_conflict(self, axis: int) -> str:
        names = [name for segment in self.segments for _, _, name in segment["exact"]]
        if names:
            return (f"layer {names[0]!r} has circular padding, exact only on a grid of its input's size, "
                    "which the other layers' grids do not allow")
        return f"no grid holds every layer along spatial axis {axis}"


def _uniform_band(matrix: np.ndarray):
    """(kernel, stride, padding, value) when ``matrix`` (m × n) averages windows
    ``[i s − p, i s − p + k) ∩ [0, n)`` with one value ``v`` (a zero-padded convolution), else None."""
    m, n = matrix.shape
    rows = [np.flatnonzero(row) for row in matrix]
    if any(r.size == 0 for r in rows):
        return None
    value = matrix[0, rows[0][0]]
    if not all(np.all(matrix[i, r] == value) and r[-1] - r[0] + 1 == r.size for i, r in enumerate(rows)):
        return None
    size = max(r.size for r in rows)
    starts = [int(r[0]) for r in rows]
    ends = [int(r[-1]) + 1 for r in rows]
    full = [i for i in range(m) if ends[i] - starts[i] == size]
    stride = 1
    if m > 1:  # two consecutive rows whose windows are not clipped on the same side
        stride = max(starts[1] - starts[0], ends[1] - ends[0], 1)
    padding = full[0] * stride - starts[full[0]]
    for i in range(m):
        lo, hi = i * stride - padding, i * stride - padding + size
        if (max(lo, 0), min(hi, n)) != (starts[i], ends[i]):
            return None
    return size, stride, padding, float(value)


# ---------------------------------------------------------------------------------------------
# Pass 3: spaces, convolutions, units
# ---------------------------------------------------------------------------------------------


class _Assembly:
    def __init__(self, plan: _Plan, node_bounds: dict):
        self.plan = plan
        self.node_bounds = node_bounds
        self.bases, self.fiber = plan.grids()
        self.units: list[TorusUnit] = []
        self.values: dict[str, dict[int, TorusBlock]] = {}

    def space(self, name: str) -> TorusSpace:
        tensor = self.plan.tensors[name]
        if tensor.sigma is None:
            return TorusSpace(tensor.channels, tensor.window, (1,) * self.plan.ndim)
        base = self.bases[self.plan.root(tensor.segment)]
        grid = tuple(int(b / s) for b, s in zip(base, tensor.sigma))
        return TorusSpace(tensor.channels, tensor.window, grid)

    def network(self) -> TorusNetwork:
        graph = self.plan.graph
        for node in graph.nodes.values():
            self._assemble(node)
        outputs = graph.outputs
        if len(outputs) != 1:
            raise NotOnTorus("the torus view takes a model with one output")
        return TorusNetwork(self.space(graph.input_name), self.units, self.values[outputs[0]],
                            self.space(outputs[0]), self.fiber)

    def _assemble(self, node) -> None:
        step, name = self.plan.steps[node.name], node.name
        if step.kind == "input":
            self.values[name] = {0: (TorusPath(),)}
            return
        sources = [self.values[i] for i in node.inputs]
        if step.kind == "sum":
            total: dict[int, TorusBlock] = {}
            for value in sources:
                for source, paths in value.items():
                    total[source] = total.get(source, ()) + paths
            self.values[name] = total
            return
        if step.kind == "concat":
            total = {}
            for input_name, value, spec in zip(node.inputs, sources, step.specs):
                conv = self._conv(spec, self.space(input_name), self.space(name))
                for source, paths in value.items():
                    total[source] = total.get(source, ()) + tuple(p.then(conv) for p in paths)
            self.values[name] = total
            return
        if step.kind == "pass":
            self.values[name] = sources[0]
            return
        if step.kind == "unit":
            self._unit(node, sources[0])
            return
        value = sources[0]
        in_space = self.space(node.inputs[0])
        if step.mask:
            value = self._add_unit(f"{name}.mask", "mask", in_space, in_space, (0.0, 1.0), 1.0, value)
        if step.scale != 1.0 or step.scale_error:
            value = {s: tuple(TorusPath(p.convs, p.scale * step.scale,
                                        round_up(abs(step.scale) * p.scale_error + abs(p.scale) * step.scale_error
                                                 + UNIT_ROUNDOFF * abs(p.scale * step.scale)))
                              for p in paths) for s, paths in value.items()}
        for spec in step.specs:
            conv = self._conv(spec, in_space, self.space(name))
            value = {s: tuple(p.then(conv) for p in paths) for s, paths in value.items()}
        self.values[name] = value

    def _conv(self, spec: _Spec, source: TorusSpace, target: TorusSpace) -> TorusConv:
        stride = source.grid if spec.head else spec.stride
        return TorusConv(spec.name, spec.kernel, tuple(stride), spec.dilation, spec.origin, spec.groups,
                         source, target, spec.error)

    def _unit(self, node, value) -> None:
        op = node.op
        in_space, out_space = self.space(node.inputs[0]), self.space(node.name)
        if op.slope is None:
            self.values[node.name] = self._add_unit(node.name, "opaque", in_space, out_space, None,
                                                    self.node_bounds[node.name].upper, value)
            return
        low, high = op.slope
        if not in_space.full:
            low, high = min(low, 0.0), max(high, 0.0)
        if low == high:  # affine on the whole grid: exactly linear
            self.values[node.name] = {s: tuple(p.scaled(low) for p in paths) for s, paths in value.items()}
            return
        self.values[node.name] = self._add_unit(node.name, "activation", in_space, out_space, (low, high),
                                                max(abs(low), abs(high)), value)

    def _add_unit(self, name, kind, in_space, out_space, slope, bound, value) -> dict[int, TorusBlock]:
        self.units.append(TorusUnit(name, kind, in_space, out_space, slope, bound, dict(value)))
        return {len(self.units): (TorusPath(),)}
