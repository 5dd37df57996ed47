r"""LipSDP-Neuron of a convolutional chain on the torus, block-diagonal over frequencies.

A zero-padded convolutional network, restricted to its input window, is a network on a
torus whose layers are circular convolutions and whose activations are masked to the
window (zero outside; slope range ``[min(a, 0), max(b, 0)]``). This module reads *plain
chains* of that kind from a merged graph (:func:`conv_chain`)::

    x → conv → act → conv → act → … → flatten → dense → act → … → dense

and holds the LipSDP-Neuron matrix of the torus network (:mod:`lipnorm.certify.methods.sdp`
has the construction) with one multiplier per *channel* of each convolutional unit (the
same at every position, inside the window or not) and one per neuron of each dense unit.
Every activation must have ``a·b = 0`` once masked (ReLU, leaky ReLU, tanh, sigmoid,
ELU…; a dense head's unit with ``a > 0`` is read with ``[0, b]``, which is looser and
sound).

In unitary Fourier coordinates a circular convolution from grid ``N`` to ``N/s`` maps
frequency ξ to ``ξ mod N/s`` with the block ``H(ξ)/√S`` (:mod:`lipnorm.conv.spectrum`),
and a per-channel multiplier is the same diagonal at every frequency. So the matrix
splits along the *tree of frequencies*: the variables of one grid (a *level*: the units
that live on it, and the input on the finest) at one frequency form a block coupled only
to the block of its parent frequency on the next coarser grid; the coarsest grid's
blocks are coupled to the dense head's units (the *border*), which read the last
convolutional unit's window. Its Cholesky factorization goes level by level from the
finest grid: blocks of a few hundred rows, plus one dense border block.

The matrix held is the exact one up to the rounding of the Fourier blocks (each entry a
short sum of kernel values times unit phases, :func:`lipnorm.conv.spectrum.block_error_bound`)
and of the scalings by the multipliers; :meth:`FrequencySdp.assemble` bounds the spectral
norm of that difference, and :meth:`FrequencySdp.factor` is a conventional block Cholesky
(LAPACK ``potrf`` per block, forward substitution for the couplings), so Higham's bound
applies to it (:func:`lipnorm.certificates.certify_shifted_cholesky`).

References
----------
.. [1] Fazlyab, Robey, Hassani, Morari, Pappas, "Efficient and accurate estimation of
   Lipschitz constants for deep neural networks", NeurIPS 2019 (LipSDP-Neuron).
.. [2] Pauli, Wang, Havens, Anderson, Allgöwer, "Lipschitz constant estimation for general
   neural network architectures using control tools", 2024 (spatially invariant multipliers).
.. [3] Sedghi, Gupta, Long, "The singular values of convolutional layers", ICLR 2019.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from itertools import product

import numpy as np
import scipy.linalg

from lipnorm.bounds import round_up
from lipnorm.certify.graph import Graph, Input, Linear, Lipschitz
from lipnorm.certify.linear import ConvMap, DenseMap, FixedMap
from lipnorm.certify.rounding import UNIT_ROUNDOFF, frobenius_upper, gamma
from lipnorm.conv.spectrum import block_error_bound, phases, tap_offsets

__all__ = ["ChainConv", "ChainDense", "ConvChain", "FrequencySdp", "NotConvChain", "conv_chain"]


class NotConvChain(ValueError):
    """The graph is not a plain convolutional chain with a dense head; the message says where."""


@dataclass(frozen=True)
class ChainConv:
    """A convolutional unit: a zero-padded convolution, then an activation masked to the window.

    Attributes
    ----------
    name : str
        The activation's graph node.
    kernel : ndarray, float64, shape (cout, cin, *k)
        Groups expanded (zero blocks between them).
    stride, dilation : tuple of int
    origin : tuple of int
        Where tap 0 reads relative to ``o·stride``: minus the padding before.
    slope : (float, float)
        The masked slope range ``[min(a, 0), max(b, 0)]``.
    input_window, window : tuple of int
        The spatial sizes of the model's tensors read and written.
    grid : tuple of int
        The torus of the unit's output (set by :func:`conv_chain`).
    error : float
        Operator-norm error of ``kernel`` against the model's exact map.
    """

    name: str
    kernel: np.ndarray
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    origin: tuple[int, ...]
    slope: tuple[float, float]
    input_window: tuple[int, ...]
    window: tuple[int, ...]
    error: float
    grid: tuple[int, ...] = ()

    @property
    def channels(self) -> int:
        return self.kernel.shape[0]

    @property
    def midpoint(self) -> float:
        return (self.slope[0] + self.slope[1]) / 2


@dataclass(frozen=True)
class ChainDense:
    """A dense layer of the head and its activation (None for the output layer).

    ``weight``'s columns are in the order of the flattened previous tensor; the first
    head layer's are reordered to (channel, window position) channels first.
    """

    name: str
    weight: np.ndarray
    slope: tuple[float, float] | None
    error: float

    @property
    def midpoint(self) -> float:
        return 0.0 if self.slope is None else (self.slope[0] + self.slope[1]) / 2


@dataclass(frozen=True)
class ConvChain:
    """``x → (conv → act)* → flatten → (dense → act)* → dense``, placed on tori.

    Attributes
    ----------
    input_channels : int
    input_grid, input_window : tuple of int
    convs : list of ChainConv
    head : list of ChainDense
        The last one is the output layer.
    """

    input_channels: int
    input_grid: tuple[int, ...]
    input_window: tuple[int, ...]
    convs: tuple[ChainConv, ...]
    head: tuple[ChainDense, ...]

    @property
    def hidden(self) -> int:
        """Hidden neurons of the model (windows only)."""
        return (sum(c.channels * math.prod(c.window) for c in self.convs)
                + sum(d.weight.shape[0] for d in self.head[:-1]))


def conv_chain(graph: Graph) -> ConvChain:
    """Read a merged graph as a convolutional chain on tori.

    Parameters
    ----------
    graph : Graph
        Pruned and merged (:func:`lipnorm.certify.graph.prepare_graph`).

    Returns
    -------
    ConvChain
        With the smallest grids on which every zero-padded convolution is a circular one.

    Raises
    ------
    NotConvChain
        Naming the first layer that does not fit.
    """
    nodes = list(graph.nodes.values())
    if len(graph.outputs) != 1 or graph.outputs[0] != nodes[-1].name:
        raise NotConvChain("the graph has several outputs, or its output is not its last layer")
    convs, head, pending, window, in_channels, flat_order = [], [], None, None, None, None
    for previous, node in zip(nodes, nodes[1:]):
        op, where = node.op, f"layer {node.name!r} ({node.layer_type})"
        if node.inputs != [previous.name]:
            raise NotConvChain(f"{where} does not read the layer before it (branches are not read)")
        if isinstance(op, Linear) and isinstance(op.map, ConvMap):
            if pending is not None or head or flat_order is not None:
                raise NotConvChain(f"{where} follows another linear layer or the flatten")
            pending = _conv_geometry(op.map, window, where)
            in_channels = pending["cin"] if in_channels is None else in_channels
            continue
        if isinstance(op, Lipschitz) and op.slope is not None and pending is not None:
            a, b = op.slope
            convs.append(ChainConv(node.name, pending["kernel"], pending["stride"], pending["dilation"],
                                   pending["origin"], (min(a, 0.0), max(b, 0.0)), pending["input"],
                                   pending["window"], pending["error"]))
            window, channels_last, pending = pending["window"], pending["channels_last"], None
            _check_slope(convs[-1].slope, where)
            continue
        if isinstance(op, Linear) and isinstance(op.map, FixedMap) and op.map.flat_identity:
            if not convs or pending is not None or flat_order is not None:
                raise NotConvChain(f"{where} does not flatten the output of a convolutional unit")
            flat_order = channels_last
            continue
        if isinstance(op, Linear) and isinstance(op.map, DenseMap) and flat_order is not None:
            if head and head[-1].slope is None:
                raise NotConvChain(f"{where} follows another dense layer with no activation between them")
            weight = op.map.weight
            if not head:
                weight = _channels_first_columns(weight, convs[-1].channels, window, flat_order, where)
            head.append(ChainDense(node.name, weight, None, op.map.error))
            continue
        if isinstance(op, Lipschitz) and op.slope is not None and head and head[-1].slope is None:
            a, b = op.slope
            slope = (min(a, 0.0), b) if b > 0 else (a, max(b, 0.0))  # a·b = 0, containing [a, b]
            head[-1] = ChainDense(head[-1].name, head[-1].weight, slope, head[-1].error)
            _check_slope(slope, where)
            continue
        raise NotConvChain(f"{where} is not a zero-padded convolution, an elementwise activation, "
                           "a flatten or a dense layer in the order conv → act → … → flatten → dense")
    if not convs or not head or head[-1].slope is not None:
        raise NotConvChain("the graph does not end in a dense layer after convolutional units")
    grids = _grids(convs)
    placed = tuple(replace(c, grid=grid) for c, grid in zip(convs, grids[1:]))
    return ConvChain(in_channels, grids[0], convs[0].input_window, placed, tuple(head))


def _check_slope(slope, where: str) -> None:
    if slope[0] * slope[1] != 0:
        raise NotConvChain(f"{where} has slopes of both signs ({slope[0]:.4g}, {slope[1]:.4g}); the "
                           "frequency SDP reads activations with a·b = 0 only")


def _conv_geometry(conv: ConvMap, window, where: str) -> dict:
    spatial = len(conv.input_spatial)
    if conv.transposed or conv.kernel.ndim != spatial + 2:
        raise NotConvChain(f"{where} is a transposed convolution")
    if window is not None and tuple(conv.input_spatial) != tuple(window):
        raise NotConvChain(f"{where} reads a tensor of another size than the unit before it")
    channels_last = conv.channel_axis % (spatial + 2) != 1
    cout, cin_g = conv.kernel.shape[:2]
    groups = conv.groups
    kernel = np.zeros((cout, cin_g * groups) + conv.kernel.shape[2:])
    per = cout // groups
    for g in range(groups):
        kernel[g * per:(g + 1) * per, g * cin_g:(g + 1) * cin_g] = conv.kernel[g * per:(g + 1) * per]
    out = tuple((n + p0 + p1 - (k - 1) * d - 1) // s + 1 for n, (p0, p1), k, d, s in zip(
        conv.input_spatial, conv.padding, conv.kernel.shape[2:], conv.dilation, conv.stride))
    if min(out) < 1:
        raise NotConvChain(f"{where} has an empty output")
    return {"kernel": kernel, "stride": tuple(conv.stride), "dilation": tuple(conv.dilation),
            "origin": tuple(-p0 for p0, _ in conv.padding), "window": out, "cin": cin_g * groups,
            "error": float(conv.error), "channels_last": channels_last, "input": tuple(conv.input_spatial)}


def _channels_first_columns(weight, channels: int, window, channels_last: bool, where: str) -> np.ndarray:
    positions = math.prod(window)
    if weight.shape[1] != channels * positions:
        raise NotConvChain(f"{where} reads {weight.shape[1]} values, not the {channels}×{positions} "
                           "of the flattened unit before it")
    if not channels_last:
        return weight
    return weight.reshape(weight.shape[0], positions, channels).transpose(0, 2, 1).reshape(weight.shape[0], -1)


def _grids(convs) -> list[tuple[int, ...]]:
    """The input grid and each unit's: the smallest input grid, divisible by all strides, on
    which every convolution reads its zero padding from outside the window.

    A convolution with input window ``n`` on grid ``N``, padding ``p0`` before, span ``L``
    and output window ``m`` reads positions ``o s − p0 + t δ`` in ``[−p0, (m−1)s − p0 + L − 1]``;
    they wrap to outside the window and never into it when ``N ≥ n + p0`` and
    ``N ≥ (m−1)s − p0 + L``, and the output window fits on ``N/s`` when ``N ≥ m s``.
    """
    spatial = len(convs[0].stride)
    grid = []
    for axis in range(spatial):
        need, before = 1, 1
        for conv in convs:
            span = (conv.kernel.shape[2 + axis] - 1) * conv.dilation[axis] + 1
            p0, m, s = -conv.origin[axis], conv.window[axis], conv.stride[axis]
            reach = max(conv.input_window[axis] + p0, (m - 1) * s - p0 + span, m * s)
            need = max(need, reach * before)
            before *= s
        grid.append(before * math.ceil(need / before))
    grids = [tuple(grid)]
    for conv in convs:
        grids.append(tuple(n // s for n, s in zip(grids[-1], conv.stride)))
    return grids


@dataclass(frozen=True)
class Coupling:
    """The block between each frequency of a level and its parent (rows ``rows`` of the
    parent's block, columns ``columns`` of the child's): ``matrix`` of shape (F_l, r, c)."""

    matrix: np.ndarray
    rows: slice
    columns: slice


@dataclass
class TreeBlocks:
    """A Hermitian matrix with the tree structure of frequencies (see the module docstring).

    Attributes
    ----------
    diagonal : list of ndarray, shape (F_l, n_l, n_l)
        Each level's block at each of its frequencies (alias-major order, see
        :func:`level_frequencies`).
    couplings : list of Coupling
        For each level: to its parent level's blocks, and for the last level, to the border.
    border : ndarray, shape (n_b, n_b)
    error : float
        Upper bound of the spectral norm of (this matrix − the exact one); 0 where not asked.
    """

    diagonal: list[np.ndarray]
    couplings: list[Coupling]
    border: np.ndarray
    error: float = 0.0

    @property
    def dimension(self) -> int:
        return sum(d.shape[0] * d.shape[1] for d in self.diagonal) + self.border.shape[0]

    def trace(self) -> float:
        return float(sum(np.einsum("fii->", d).real for d in self.diagonal) + np.trace(self.border).real)

    def row_estimate(self) -> float:
        """Σ over levels of the largest trace of a frequency's block, plus the border's trace:
        what :func:`tree_cholesky`'s ``square`` is in exact arithmetic."""
        return float(sum(np.max(np.einsum("fii->f", d).real) for d in self.diagonal) + np.trace(self.border).real)

    def largest_diagonal(self) -> float:
        values = [np.max(np.abs(np.diagonal(d, axis1=1, axis2=2))) for d in self.diagonal if d.size]
        if self.border.size:
            values.append(np.max(np.abs(np.diag(self.border))))
        return float(max(values))


@dataclass
class TreeFactor:
    """A block Cholesky factorization of :class:`TreeBlocks` (see :func:`tree_cholesky`).

    ``solved[l]`` is ``Y = L_l⁻¹ Eᴴ`` (the adjoint of the factor's block below level
    ``l``'s) for the parent rows ``rows[l]``; ``aliases[l]`` frequencies share a parent.
    """

    factors: list[np.ndarray]
    solved: list[np.ndarray]
    rows: list[slice]
    border: np.ndarray
    square: float
    aliases: list[int]

    def forward(self, level: int, right: np.ndarray, adjoint: bool = False) -> np.ndarray:
        """``L_l⁻¹ right`` (``L_l⁻ᴴ right`` with ``adjoint``) for every frequency of a level."""
        factor = self.factors[level]
        if factor.ndim == 2:  # a diagonal factor, held as its diagonal
            return right / factor[:, :, None]
        return scipy.linalg.solve_triangular(factor, right, lower=True, trans="C" if adjoint else "N",
                                             check_finite=False)

    def coupling_adjoint(self, level: int, values: np.ndarray) -> np.ndarray:
        """``Yᴴ values`` for every frequency of a level (the update of the parent rows)."""
        return np.conj(np.swapaxes(self.solved[level], 1, 2)) @ values

    def solve(self, right: list[np.ndarray], border: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """``A⁻¹ [right; border]`` (levels ``(F_l, n_l, k)``, border ``(n_b, k)``)."""
        right = [r.copy() for r in right]
        border = border.copy()
        forward = []
        levels = len(self.factors)
        for level in range(levels):
            y = self.forward(level, right[level])
            forward.append(y)
            update = self.coupling_adjoint(level, y)
            if level + 1 < levels:
                right[level + 1][:, self.rows[level]] -= _parent_sum(update, self.aliases[level])
            else:
                border[self.rows[level]] -= update.sum(axis=0)
        border_solution = scipy.linalg.cho_solve((self.border, True), border, check_finite=False)
        solution: list[np.ndarray] = [None] * levels
        for level in reversed(range(levels)):
            if level + 1 < levels:
                parent = np.tile(solution[level + 1][:, self.rows[level]], (self.aliases[level], 1, 1))
            else:
                parent = border_solution[None, self.rows[level]]
            solution[level] = self.forward(level, forward[level] - self.solved[level] @ parent, adjoint=True)
        return solution, border_solution


def tree_cholesky(blocks: TreeBlocks, shift: float = 0.0) -> TreeFactor | None:
    """Block Cholesky factorization of ``blocks − shift·I``, finest level first; None if not positive definite.

    Each level's blocks are factored by LAPACK (``potrf``) and the couplings ``Y = L⁻¹ Eᴴ``
    come from forward substitution (``trtrs``): the whole is a conventional Cholesky
    factorization of the permuted matrix, to which Higham's rounding bound applies.
    ``square`` bounds ‖|R|‖₂², the norm Higham's componentwise bound ``|ΔA| ≤ γ|Rᴴ||R|``
    needs: the rows of ``R`` split by level, and a level's rows are block-diagonal over its
    frequencies (a frequency's row block: its own factor and its children's couplings), so
    ``‖|R|‖₂² ≤ Σ_levels max_f ‖row block_f‖_F²`` (plus the border's rows) — far below
    ‖R‖_F² when there are many frequencies. In exact arithmetic a row block's ‖·‖_F² is the
    trace of the frequency's block before the fills (:meth:`TreeBlocks.row_estimate`).
    """
    diagonal = [d.copy() for d in blocks.diagonal]
    border = blocks.border.copy()
    if shift:
        for d in diagonal:
            d[:, np.arange(d.shape[1]), np.arange(d.shape[1])] -= shift
        border[np.diag_indices_from(border)] -= shift
    factors, solved, aliases, square = [], [], [], 0.0
    levels = len(diagonal)
    children = np.zeros(diagonal[0].shape[0])  # each frequency's children's ‖Y‖_F², summed
    for level in range(levels):
        block = diagonal[level]
        coupling = blocks.couplings[level]
        adjoint = np.zeros((block.shape[0], block.shape[1], coupling.matrix.shape[1]), dtype=np.complex128)
        adjoint[:, coupling.columns] = np.conj(np.swapaxes(coupling.matrix, 1, 2))
        if _is_diagonal(block):  # potrf and trtrs would compute exactly these square roots and quotients
            entries = np.diagonal(block, axis1=1, axis2=2).real
            if not np.all(entries > 0):
                return None
            factor = np.sqrt(entries)
            y = adjoint / factor[:, :, None]
        else:
            try:
                factor = np.linalg.cholesky(block)
            except np.linalg.LinAlgError:
                return None
            y = scipy.linalg.solve_triangular(factor, adjoint, lower=True, check_finite=False)
        if level + 1 < levels:
            count = diagonal[level].shape[0] // diagonal[level + 1].shape[0]
            fill = np.conj(np.swapaxes(y, 1, 2)) @ y
            diagonal[level + 1][:, coupling.rows, coupling.rows] -= _parent_sum(fill, count)
        else:  # every frequency's fill lands on the border: one product of the stacked blocks
            count = diagonal[level].shape[0]
            stacked = y.reshape(-1, y.shape[2])
            border[coupling.rows, coupling.rows] -= np.conj(stacked.T) @ stacked
        aliases.append(count)
        factors.append(factor)
        solved.append(y)
        own = np.sum(np.abs(factor.reshape(factor.shape[0], -1)) ** 2, axis=1)
        square += float(np.max(own + children))
        below = np.sum(np.abs(y.reshape(y.shape[0], -1)) ** 2, axis=1)
        children = _parent_sum(below, count) if level + 1 < levels else np.sum(below, keepdims=True)
        if not math.isfinite(square):
            return None
    try:
        border_factor = np.linalg.cholesky(border)
    except np.linalg.LinAlgError:
        return None
    square += float(np.vdot(border_factor, border_factor).real + children[0])
    return TreeFactor(factors, solved, [c.rows for c in blocks.couplings], border_factor, square, aliases)


def _is_diagonal(blocks: np.ndarray) -> bool:
    """Whether every block of a stack (F, n, n) is diagonal with a real diagonal."""
    size = blocks.shape[1]
    off = blocks.reshape(blocks.shape[0], -1)[:, :-1].reshape(blocks.shape[0], size - 1, size + 1)[:, :, 1:]
    return not np.any(off) and not np.any(np.diagonal(blocks, axis1=1, axis2=2).imag)


def _parent_sum(values: np.ndarray, aliases: int) -> np.ndarray:
    """Per child frequency (alias-major) → summed per parent frequency."""
    return values.reshape((aliases, -1) + values.shape[1:]).sum(axis=0)


def level_frequencies(grids: list[tuple[int, ...]]) -> list[np.ndarray]:
    """The frequencies of each grid (finest first), alias-major: index ``a·F_{l+1} + j``
    is the ``a``-th frequency whose parent (its residue on the next grid) is the ``j``-th."""
    coarsest = grids[-1]
    freqs = [np.array(list(product(*(range(n) for n in coarsest))), dtype=np.int64).reshape(-1, len(coarsest))]
    for fine, coarse in zip(reversed(grids[:-1]), reversed(grids[1:])):
        ratio = [f // c for f, c in zip(fine, coarse)]
        shifts = np.array(list(product(*(range(r) for r in ratio))), dtype=np.int64).reshape(-1, len(fine))
        parent = freqs[0]
        freqs.insert(0, (shifts[:, None, :] * np.array(coarse) + parent[None, :, :]).reshape(-1, len(fine)))
    return freqs


class FrequencySdp:
    """The LipSDP-Neuron matrix of a :class:`ConvChain` on its tori, in Fourier coordinates.

    Variables: the input ``x`` (node 0) and each convolutional unit's output (node ``k``)
    at every frequency of its grid, then the dense head's units (the border). Multipliers:
    one array per convolutional unit (one value per channel), then one per dense unit of
    the head (one per neuron), all positive.

    Parameters
    ----------
    chain : ConvChain
    """

    def __init__(self, chain: ConvChain):
        self.chain = chain
        grids = [chain.input_grid] + [c.grid for c in chain.convs]
        self.grids: list[tuple[int, ...]] = []
        self.node_level = []
        for grid in grids:
            if not self.grids or self.grids[-1] != grid:
                self.grids.append(grid)
            self.node_level.append(len(self.grids) - 1)
        self.freqs = level_frequencies(self.grids)
        self.symbols, self.coupling_errors = [], []
        for k, conv in enumerate(chain.convs):
            level = self.node_level[k]
            offsets = tap_offsets(conv.kernel.shape[2:], conv.dilation) + np.asarray(conv.origin)
            phase = phases(offsets, self.freqs[level], self.grids[level])  # (T, F)
            cout, cin = conv.kernel.shape[:2]
            scale = 1.0 / math.sqrt(math.prod(conv.stride))
            symbol = (conv.kernel.reshape(cout * cin, -1) @ phase).reshape(cout, cin, -1)
            self.symbols.append(np.ascontiguousarray(symbol.transpose(2, 0, 1)) * scale)
            # rounding of the symbols (with the scaling) plus the model's own error; operator norm
            rounding = block_error_bound(conv.kernel[None], conv.stride) * scale
            magnitude = frobenius_upper(np.abs(conv.kernel).reshape(cout, cin, -1).sum(axis=2))
            self.coupling_errors.append(round_up(rounding * (1 + 8 * UNIT_ROUNDOFF) + conv.error
                                                 + 4 * UNIT_ROUNDOFF * magnitude))
        last, first = chain.convs[-1], chain.head[0]
        positions = np.array(list(product(*(range(n) for n in last.window))), dtype=np.int64)
        root = self.freqs[-1]
        phase = phases(positions, root, self.grids[-1])  # (Q, F)
        rows = first.weight.shape[0]
        weight = first.weight.reshape(rows, last.channels, -1)
        scale = 1.0 / math.sqrt(root.shape[0])
        self.head_block = np.ascontiguousarray(
            (weight.reshape(rows * last.channels, -1) @ phase).reshape(rows, last.channels, -1).transpose(2, 0, 1)) * scale
        rounding = block_error_bound(weight[None], (root.shape[0],)) * scale
        self.head_error = round_up(rounding * (1 + 8 * UNIT_ROUNDOFF) + first.error
                                   + 4 * UNIT_ROUNDOFF * frobenius_upper(np.abs(weight).sum(axis=2)))
        self.head_units = list(chain.head[:-1])
        self.border_size = sum(d.weight.shape[0] for d in self.head_units) or chain.head[-1].weight.shape[0]

    # -- layout -----------------------------------------------------------------------------

    def multiplier_sizes(self) -> list[int]:
        return [c.channels for c in self.chain.convs] + [d.weight.shape[0] for d in self.head_units]

    def layout(self, with_input: bool):
        """Levels held, and each node's (level index among them, offset in the block)."""
        first = 0 if with_input else self.node_level[1]
        sizes = [0] * (len(self.grids) - first)
        place = {}
        channels = [self.chain.input_channels] + [c.channels for c in self.chain.convs]
        for node, level in enumerate(self.node_level):
            if node == 0 and not with_input:
                continue
            place[node] = (level - first, sizes[level - first])
            sizes[level - first] += channels[node]
        return first, sizes, place

    # -- the matrix -------------------------------------------------------------------------

    def assemble(self, multipliers: list[np.ndarray], rho: float | None = None, *,
                 with_error: bool = False) -> TreeBlocks:
        """The matrix M(ρ, λ) (with ``rho``) or its hidden part (``rho=None``, the input left out).

        With ``with_error``, ``error`` bounds the spectral norm of (held − exact M).
        """
        first, sizes, place = self.layout(rho is not None)
        freqs = self.freqs[first:]
        diagonal = [np.zeros((f.shape[0], n, n), dtype=np.complex128) for f, n in zip(freqs, sizes)]
        couplings: list[Coupling] = []
        error = 0.0
        if rho is not None:
            level, offset = place[0]
            span = np.arange(offset, offset + self.chain.input_channels)
            diagonal[level][:, span, span] = rho
        for k, conv in enumerate(self.chain.convs):
            lam = multipliers[k]
            level, offset = place[k + 1]
            own = np.arange(offset, offset + conv.channels)
            diagonal[level][:, own, own] = lam
            if k == 0 and rho is None:
                continue
            source_level, source_offset = place[k]
            rows, cols = slice(offset, offset + conv.channels), slice(source_offset, source_offset + conv.kernel.shape[1])
            block = (-conv.midpoint * lam)[None, :, None] * self.symbols[k]
            if source_level == level:
                diagonal[level][:, rows, cols] = block
                diagonal[level][:, cols, rows] = np.conj(np.swapaxes(block, 1, 2))
            else:  # a strided convolution: the only link from this level to the next
                couplings.append(Coupling(block, rows, cols))
            if with_error:
                error += abs(conv.midpoint) * float(np.max(lam)) * self.coupling_errors[k] * (1 + 4 * UNIT_ROUNDOFF)
        _, last_offset = place[len(self.chain.convs)]
        cols = slice(last_offset, last_offset + self.chain.convs[-1].channels)
        head_lams = multipliers[len(self.chain.convs):]
        if self.head_units:
            unit = self.head_units[0]
            coefficient = -unit.midpoint * head_lams[0]
            largest = abs(unit.midpoint) * float(np.max(head_lams[0]))
        else:  # the output reads the last unit: ‖f‖² enters through identity variables
            coefficient, largest = np.ones(self.border_size), 1.0
        couplings.append(Coupling(coefficient[None, :, None] * self.head_block, slice(0, len(coefficient)), cols))
        if with_error:
            error += largest * self.head_error * (1 + 4 * UNIT_ROUNDOFF)
        border, border_error = self._border(head_lams, with_error)
        return TreeBlocks(diagonal, couplings, border,
                          round_up((error + border_error) * (1 + 1e-12)) if with_error else 0.0)

    def _border(self, lams, with_error: bool):
        """The dense head's block: its units' multipliers, their couplings, the output term."""
        output = self.chain.head[-1]
        if not self.head_units:
            return np.eye(self.border_size, dtype=np.complex128), 0.0
        border = np.zeros((self.border_size, self.border_size))
        offsets = np.cumsum([0] + [d.weight.shape[0] for d in self.head_units])
        error = 0.0
        for j, (unit, lam) in enumerate(zip(self.head_units, lams)):
            own = np.arange(offsets[j], offsets[j + 1])
            border[own, own] = lam
            if j == 0:
                continue
            block = (-unit.midpoint * lam)[:, None] * unit.weight
            source = slice(offsets[j - 1], offsets[j])
            border[own[0]:own[-1] + 1, source] = block
            border[source, own[0]:own[-1] + 1] = block.T
            if with_error:
                error += abs(unit.midpoint) * float(np.max(lam)) * (unit.error + 4 * UNIT_ROUNDOFF * frobenius_upper(unit.weight))
        last = slice(offsets[-2], offsets[-1])
        weight = output.weight
        border[last, last] -= weight.T @ weight
        if with_error:
            error += (gamma(weight.shape[0] + 2) * frobenius_upper(np.abs(weight).T @ np.abs(weight))
                      + 2 * frobenius_upper(weight) * output.error + output.error**2)
        return border.astype(np.complex128), error

    # -- ρ(λ) and its gradient ----------------------------------------------------------------

    def input_coupling(self, multipliers, vectors: np.ndarray) -> list[np.ndarray]:
        """``B u``: the hidden part's right-hand side from input vectors ``(F_0, C_0, k)``."""
        first, sizes, place = self.layout(False)
        conv = self.chain.convs[0]
        level, offset = place[1]
        right = [np.zeros((self.freqs[first + i].shape[0], n, vectors.shape[2]), dtype=np.complex128)
                 for i, n in enumerate(sizes)]
        image = (-conv.midpoint * multipliers[0])[None, :, None] * (self.symbols[0] @ vectors)
        if first > 0:  # the first convolution is strided: its aliases gather on the next grid
            image = image.reshape((-1, self.freqs[first].shape[0]) + image.shape[1:]).sum(axis=0)
        right[level][:, offset:offset + conv.channels] = image
        return right

    def input_schur(self, factor: TreeFactor, multipliers) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The Schur complement ``Bᴴ G⁻¹ B`` on the input, from the hidden part's factor.

        With ``G = L Lᴴ`` it is ``Zᴴ Z``, ``Z = L⁻¹ B``, and forward substitution keeps the
        columns of one input frequency on the path to its root frequency, then the border:
        so it is block-diagonal over the coarsest grid's frequencies (blocks of
        ``C_0 · F_0 / F_last`` rows) plus ``Z_bᴴ Z_b`` with ``Z_b`` of ``n_b`` rows.

        Returns
        -------
        blocks : ndarray, shape (F_last, c, c)
        border : ndarray, shape (n_b, F_last · c)
        order : ndarray of int, shape (F_last · c,)
            The input entry (frequency-major, ``f·C_0 + channel``) of each row.
        """
        first, sizes, place = self.layout(False)
        conv = self.chain.convs[0]
        level, offset = place[1]
        count, channels = self.freqs[0].shape[0], self.chain.input_channels
        right = np.zeros((count, sizes[level], channels), dtype=np.complex128)
        right[:, offset:offset + conv.channels] = (-conv.midpoint * multipliers[0])[None, :, None] * self.symbols[0]
        order = np.arange(count * channels).reshape(count, 1, channels)
        if first > 0:  # the input's grid holds no unit: its aliases meet on the next grid
            parents = self.freqs[first].shape[0]
            right, order = _gather_columns(right, parents), _gather_columns(order, parents)
        blocks = None
        for held in range(len(sizes)):
            z = factor.forward(held, right)
            gram = np.conj(np.swapaxes(z, 1, 2)) @ z
            if blocks is not None:
                gram += _block_diagonal(blocks, gram.shape[0])
            blocks = gram
            update = -factor.coupling_adjoint(held, z)
            rows = factor.rows[held]
            if held + 1 < len(sizes):
                parents = factor.factors[held + 1].shape[0]
                right = np.zeros((parents, sizes[held + 1], update.shape[2] * factor.aliases[held]),
                                 dtype=np.complex128)
                right[:, rows] = _gather_columns(update, parents)
                order = _gather_columns(order, parents)
        border = np.zeros((self.border_size, update.shape[0] * update.shape[2]), dtype=np.complex128)
        border[rows] = update.transpose(1, 0, 2).reshape(update.shape[1], -1)
        border = scipy.linalg.solve_triangular(factor.border, border, lower=True, check_finite=False)
        return blocks, border, order.reshape(-1)

    def input_adjoint(self, multipliers, hidden: list[np.ndarray]) -> np.ndarray:
        """``Bᴴ h`` for hidden vectors (levels as :meth:`input_coupling` gives)."""
        first, _, place = self.layout(False)
        conv = self.chain.convs[0]
        level, offset = place[1]
        part = hidden[level][:, offset:offset + conv.channels]
        if first > 0:
            part = np.tile(part, (self.freqs[0].shape[0] // part.shape[0], 1, 1))
        scaled = (-conv.midpoint * multipliers[0])[None, :, None] * part
        return np.conj(np.swapaxes(self.symbols[0], 1, 2)) @ scaled

    def constraint_values(self, multipliers, inputs: np.ndarray, hidden: list[np.ndarray],
                          border: np.ndarray) -> list[np.ndarray]:
        """Σ over positions of each unit's constraint ``(w − a z)(b z − w)`` at the given
        vectors, per channel (convolutional units) or neuron (dense ones), per column."""
        _, _, place = self.layout(False)
        values, previous = [], inputs
        for k, conv in enumerate(self.chain.convs):
            level, offset = place[k + 1]
            w = hidden[level][:, offset:offset + conv.channels]
            z = self.symbols[k] @ previous
            if self.node_level[k + 1] != self.node_level[k]:
                z = z.reshape((-1, w.shape[0]) + z.shape[1:]).sum(axis=0)
            values.append(_constraint(w, z, conv.slope).sum(axis=0))
            previous = w
        if self.head_units:
            z = np.einsum("fjc,fck->jk", self.head_block, previous)
            start = 0
            for j, unit in enumerate(self.head_units):
                w = border[start:start + unit.weight.shape[0]]
                if j:
                    z = unit.weight @ border[start - unit.weight.shape[1]:start]
                values.append(_constraint(w, z, unit.slope))
                start += unit.weight.shape[0]
        return values


def _gather_columns(values: np.ndarray, parents: int) -> np.ndarray:
    """(S·P, r, c) per child frequency → (P, r, S·c): each parent's children's columns side by side."""
    aliases = values.shape[0] // parents
    return values.reshape(aliases, parents, values.shape[1], values.shape[2]).transpose(1, 2, 0, 3).reshape(
        parents, values.shape[1], aliases * values.shape[2])


def _block_diagonal(blocks: np.ndarray, parents: int) -> np.ndarray:
    """(S·P, c, c) per child frequency → (P, S·c, S·c) with the children's blocks on the diagonal."""
    aliases, size = blocks.shape[0] // parents, blocks.shape[1]
    out = np.zeros((parents, aliases * size, aliases * size), dtype=blocks.dtype)
    grouped = blocks.reshape(aliases, parents, size, size)
    for a in range(aliases):
        out[:, a * size:(a + 1) * size, a * size:(a + 1) * size] = grouped[a]
    return out


def _constraint(w: np.ndarray, z: np.ndarray, slope) -> np.ndarray:
    """Re[(w − a z)ᴴ(b z − w)] entrywise (a·b = 0 here, so it is real-linear in each factor)."""
    a, b = slope
    return np.real(np.conj(w - a * z) * (b * z - w))
