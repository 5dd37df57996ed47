r"""LipSDP-Neuron of a torus network, block-structured over a tree of frequencies.

The torus view of a convolutional graph (:class:`lipnorm.certify.torus.TorusNetwork`) has
units (activations masked to their windows, masks) whose inputs are sums of strided
circular convolutions of earlier units' outputs and of the input: residual sums,
projection shortcuts, BatchNorm, average pooling and dense layers (convolutions onto the
one-point grid) included. Its LipSDP-Neuron certificate with *one multiplier per
channel* of each unit (the same at every position of the torus) is the quadratic form,
in every variable ``x`` (the input) and ``v_j`` (unit j's output),

.. math::

    q = \rho\|x\|^2 - \|f\|^2 + \sum_j \lambda_j\,[\|v_j\|^2 - (a_j + b_j)\langle v_j, z_j\rangle
        + a_j b_j \|z_j\|^2],\qquad z_j = \sum_s A_{js} v_s,\ f = \sum_s C_s v_s

(per channel; ``[a_j, b_j]`` the unit's slope range): if ``q ≥ 0`` everywhere, the network
is √ρ-Lipschitz on the torus, hence on its window (Fazlyab et al. 2019). Two auxiliary
variables keep every term a coupling between a *reader* and a *source*:

* the output ``y``: ``−‖f‖² = min_y (‖y‖² − 2⟨y, f⟩)``;
* ``w_j`` for a unit with ``a_j b_j < 0`` (GELU, SiLU, a masked leaky ReLU…):
  ``a_j b_j λ_j ‖z_j‖² = min_w (λ_j ‖w‖² / c_j − 2 λ_j ⟨w, z_j⟩)`` with ``c_j = −a_j b_j``.

A unit with ``a_j b_j > 0`` (an unmasked leaky ReLU on the one-point grid) is read with
the slope range ``[min(a, 0), max(b, 0)]``, which contains its own (sound, looser).
Units known only by their bound (max pooling) are not held.

In unitary Fourier coordinates a convolution from grid ``N`` to ``N/s`` couples source
frequency ξ to target frequency ``ξ mod N/s`` only, and a per-channel multiplier is the
same diagonal at every frequency. The grids of the variables must divide one another
(a *chain* of grids, finest first: the *levels*); then each frequency of a level is
coupled only to its ancestors (its residues on the coarser grids), and the matrix is a
*tree of frequencies*: the fibers of :mod:`lipnorm.certify.fibers` are independent subtrees
whose roots meet at the one-point grid's single frequency (the dense head, the output).
:class:`FrequencySdp` factors it by a multifrontal block Cholesky, finest level first:
the *front* of a frequency holds its own variables and the ancestors' variables that it
or its descendants touch (its *support*); the Schur complement of its own variables is
added to its parent's front. Real kernels make the blocks of frequency −ξ the conjugates
of those of ξ, so one fiber of each conjugate pair is formed, and its conjugate's share
of the one-point grid's front is the conjugate of its own; in floating point this is
exactly what forming both would compute (rounding is symmetric under conjugation).

Rounding: the held matrix differs from the exact one by the rounding of the Fourier
blocks (:mod:`lipnorm.certify.fibers` carries a bound of each block's error) and of the
scalings by the multipliers; :attr:`TreeFactor.square` bounds ``‖|R|‖₂²`` of the factor
(column blocks of one level are row-disjoint: they hold a frequency and its descendants),
which is what :func:`lipnorm.certificates.certify_shifted_cholesky` needs.

References
----------
.. [1] Fazlyab, Robey, Hassani, Morari, Pappas, "Efficient and accurate estimation of
   Lipschitz constants for deep neural networks", NeurIPS 2019 (LipSDP-Neuron).
.. [2] Pauli, Wang, Havens, Anderson, Allgöwer, "Lipschitz constant estimation for general
   neural network architectures using control tools", 2024 (spatially invariant multipliers).
.. [3] Duff, Reid, "The multifrontal solution of indefinite sparse symmetric linear
   equations", ACM TOMS 9, 1983 (fronts and update matrices).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from lipnorm._parallel import parallel_map
from lipnorm.bounds import round_up
from lipnorm.certify.fibers import evaluate, fiber_chunks
from lipnorm.certify.rounding import UNIT_ROUNDOFF, gamma
from lipnorm.certify.torus import TorusNetwork, TorusSpace

__all__ = ["FrequencySdp", "NotHeld", "SdpVariable", "TreeFactor"]


class NotHeld(ValueError):
    """The frequency SDP cannot hold this torus network; the message names the layer."""


@dataclass(frozen=True)
class SdpVariable:
    """A variable of the quadratic form: the input, a unit's output, an auxiliary one, the output.

    Attributes
    ----------
    name : str
    kind : {"input", "unit", "aux", "output"}
    unit : int or None
        The unit whose multipliers scale it (``"unit"``, ``"aux"``).
    space : TorusSpace
    """

    name: str
    kind: str
    unit: int | None
    space: TorusSpace

    @property
    def channels(self) -> int:
        return self.space.channels


@dataclass(frozen=True)
class _Coupling:
    """``reader`` reads ``source`` through ``stack``: per fiber and source position, a
    ``c_reader × c_source`` block (shape (Z, P_source, c_r, c_s); (c_r, c_s) on the root)."""

    reader: int
    source: int
    stack: np.ndarray
    error: float  # ‖computed − exact‖₂ of a target row, plus 4u times its Frobenius norm
    norm: float  # an estimate of the operator norm (for a starting point)


@dataclass
class _Level:
    """One grid of the chain: its frequencies in a fiber, its variables and their fronts.

    ``order[i]`` is the natural (row-major) index in the fiber of position ``i``; positions
    are alias-major, so position ``i``'s ancestor on a coarser level ``t`` is ``i mod P_t``.
    """

    grid: tuple[int, ...]
    counts: tuple[int, ...]
    shared: bool  # the one-point grid above the fibers
    variables: list[int]
    order: np.ndarray

    @property
    def positions(self) -> int:
        return len(self.order)


@dataclass
class _Layout:
    """Rows of every level's fronts, with or without the input."""

    own: list[list[int]]
    offsets: list[dict[int, int]]  # variable → first row in the front
    sizes: list[int]  # own rows
    support: list[list[int]]
    fronts: list[int]  # own + support rows
    parent_rows: list[np.ndarray]  # support rows → rows of the next level's front
    diagonal: list[bool]  # the own block is diagonal before elimination


class FrequencySdp:
    """The LipSDP-Neuron matrix of a torus network with per-channel multipliers, in frequencies.

    Parameters
    ----------
    network : TorusNetwork

    Raises
    ------
    NotHeld
        For a unit known by its bound only, an input on the one-point grid, or grids that do
        not divide one another (the message names the layer).

    Attributes
    ----------
    network : TorusNetwork
    variables : list of SdpVariable
        The input first, the output last.
    slopes : list of (float, float)
        Each unit's slope range as held (``a·b ≤ 0``).
    """

    def __init__(self, network: TorusNetwork):
        self.network = network
        if all(n == 1 for n in network.input_space.grid):
            raise NotHeld("the input is a vector, not a feature map (the dense SDP holds it)")
        self.slopes = [_held_slope(unit) for unit in network.units]
        self.variables = [SdpVariable("input", "input", None, network.input_space)]
        self.unit_variables: list[int] = []
        self.aux_constants: dict[int, float] = {}
        for j, unit in enumerate(network.units):
            self.unit_variables.append(len(self.variables))
            self.variables.append(SdpVariable(unit.name, "unit", j, unit.output_space))
            a, b = self.slopes[j]
            if a * b < 0:  # c' ≥ −ab: the relaxation is sound with the rounded constant
                self.aux_constants[j] = round_up(abs(a * b) * (1 + 2 * UNIT_ROUNDOFF))
                self.variables.append(SdpVariable(f"{unit.name} (aux)", "aux", j, unit.input_space))
        self.variables.append(SdpVariable("output", "output", None, network.output_space))
        self.levels, self.level_of = self._levels()
        self._chunk = fiber_chunks(network, 1, 2**62)[0]  # one chunk: every formed fiber
        self.fibers = self._chunk.zetas.shape[0]
        self.paired = np.flatnonzero(self._chunk.paired)
        self.total_fibers = math.prod(network.fiber_grid)
        self.links = self._links()
        self.layouts = {with_input: self._layout(with_input) for with_input in (False, True)}

    # -- structure ------------------------------------------------------------------------

    def _levels(self):
        grids = sorted({v.space.grid for v in self.variables}, key=math.prod, reverse=True)
        for fine, coarse in zip(grids, grids[1:]):
            if any(f % c for f, c in zip(fine, coarse)):
                names = [v.name for v in self.variables if v.space.grid in (fine, coarse)]
                raise NotHeld(f"the grids {fine} and {coarse} (of {names[0]!r} and {names[-1]!r}) do not divide "
                              "one another: the frequencies do not form a tree")
        fiber = self.network.fiber_grid
        levels, level_of = [], {}
        for grid in grids:
            shared = all(n == 1 for n in grid) and any(f > 1 for f in fiber)
            if not shared and any(n % f for n, f in zip(grid, fiber)):
                raise NotHeld(f"the grid {grid} is not a multiple of the fiber grid {fiber}")
            counts = tuple(1 for _ in grid) if shared else tuple(n // f for n, f in zip(grid, fiber))
            levels.append(_Level(grid, counts, shared, [], np.zeros(0, dtype=np.int64)))
        for index, variable in enumerate(self.variables):
            level_of[index] = grids.index(variable.space.grid)
            levels[level_of[index]].variables.append(index)
        in_fiber = [level for level in levels if not level.shared]
        in_fiber[-1].order = np.arange(math.prod(in_fiber[-1].counts))
        for fine, coarse in zip(reversed(in_fiber[:-1]), reversed(in_fiber[1:])):
            ratios = tuple(f // c for f, c in zip(fine.counts, coarse.counts))
            parent = np.array(np.unravel_index(coarse.order, coarse.counts))  # (d, P_c)
            shift = np.array(np.unravel_index(np.arange(math.prod(ratios)), ratios))  # (d, R)
            natural = parent[:, None, :] + np.asarray(coarse.counts)[:, None, None] * shift[:, :, None]
            fine.order = np.ravel_multi_index(tuple(natural.reshape(len(ratios), -1)), fine.counts)
        if levels[-1].shared:
            levels[-1].order = np.zeros(1, dtype=np.int64)
        return levels, level_of

    def _links(self) -> list[tuple[int, int, int, object]]:
        """Who reads whom: ``(reader, source variable, source index in the network, block)``
        for every coupling, from the network's structure alone (nothing evaluated)."""
        links = []
        for j, unit in enumerate(self.network.units):
            readers = [self.unit_variables[j]] if sum(self.slopes[j]) != 0 else []
            if j in self.aux_constants:
                readers.append(self.unit_variables[j] + 1)
            for reader in readers:
                links += [(reader, self._source_variable(i), i, block) for i, block in unit.inputs.items()]
        links += [(len(self.variables) - 1, self._source_variable(i), i, block) for i, block in self.network.output.items()]
        return links

    def _source_variable(self, source_index: int) -> int:
        return 0 if source_index == 0 else self.unit_variables[source_index - 1]

    @functools.cached_property
    def couplings(self) -> list[_Coupling]:
        """Every coupling's blocks per fiber and position, evaluated on first use (the sizes
        and the cost model need only :attr:`links`)."""
        cache, couplings = {}, []
        for reader, source, source_index, block in self.links:
            fiber_block = evaluate(block, self.network.source_space(source_index), self._chunk, cache)
            stack, error, norm = self._stack(fiber_block, self.level_of[source], self.level_of[reader])
            couplings.append(_Coupling(reader, source, stack, error, norm))
        return couplings

    def _stack_bytes(self, reader: int, source: int) -> int:
        """Bytes :meth:`_stack` will hold for a coupling (a broadcast identity holds its one block)."""
        level = self.levels[self.level_of[source]]
        block = 16 * self.variables[reader].channels * self.variables[source].channels
        return block if level.shared else block * self.fibers * level.positions

    def _stack(self, block, source_level: int, target_level: int):
        """Per source position, the block to the target position it maps to, with the row
        error bound and a norm estimate."""
        source, target = self.levels[source_level], self.levels[target_level]
        c_t, c_s = block.target.channels, block.source.channels
        if source.shared:  # root to root: the same in every fiber
            matrix = block.dense(1)[0, 0]
            norm = float(np.linalg.norm(matrix, 2)) if matrix.size else 0.0
            frobenius = float(np.linalg.norm(matrix)) * (1 + gamma(matrix.size + 2))
            return matrix, round_up(block.error * (1 + 4 * UNIT_ROUNDOFF) + 4 * UNIT_ROUNDOFF * frobenius), norm
        if block.data is None:
            stack = np.broadcast_to(np.eye(c_s, dtype=np.complex128) * block.scale,
                                    (self.fibers, source.positions, c_s, c_s))
        else:
            natural = np.array(np.unravel_index(source.order, source.counts))  # (d, P_s)
            counts = np.asarray(target.counts)[:, None]
            row = np.ravel_multi_index(tuple(natural % counts), target.counts)
            ratios = tuple(s // t for s, t in zip(source.counts, target.counts))
            group = np.ravel_multi_index(tuple(natural // counts), ratios)
            data = block.data.reshape(block.data.shape[:3] + (math.prod(ratios), c_s))
            stack = np.ascontiguousarray(data[:, row, :, group, :].transpose(1, 0, 2, 3))
            if not target.shared:
                expected = np.arange(source.positions) % target.positions
                if not np.array_equal(np.argsort(target.order)[row], expected):
                    raise AssertionError("the frequency tree's positions are inconsistent")
        squares = np.einsum("zpij,zpij->zp", stack.real, stack.real) + np.einsum("zpij,zpij->zp", stack.imag,
                                                                                  stack.imag)
        grams = stack @ np.conj(np.swapaxes(stack, -1, -2))
        weights = np.ones(self.fibers)
        weights[self.paired] = 2
        if target.shared:  # one row over every fiber
            row_squares = float(np.sum(squares.sum(axis=1) * weights))
            gram = np.einsum("z,zij->ij", weights, grams.sum(axis=1).real)
            norm = math.sqrt(max(float(np.linalg.eigvalsh(gram)[-1]), 0.0))
            error = block.error * math.sqrt(self.total_fibers)
        else:
            groups = (self.fibers, source.positions // target.positions, target.positions)
            row_squares = float(np.max(squares.reshape(groups).sum(axis=1)))
            gram = grams.reshape(groups + grams.shape[2:]).sum(axis=1)
            norm = math.sqrt(max(float(np.max(np.linalg.eigvalsh(gram)[..., -1])), 0.0))
            error = block.error
        frobenius = math.sqrt(row_squares) * (1 + gamma(c_t * c_s * source.positions * self.total_fibers + 2))
        return stack, round_up((error * (1 + 4 * UNIT_ROUNDOFF) + 4 * UNIT_ROUNDOFF * frobenius) * (1 + 1e-12)), norm

    def _layout(self, with_input: bool) -> _Layout:
        count = len(self.levels)
        direct = [set() for _ in range(count)]
        same_level = [False] * count
        for reader, source, _, _ in self.links:
            low, high = self.level_of[source], self.level_of[reader]
            if high > low:
                direct[low].add(reader)
            elif source != 0 or with_input:
                same_level[low] = True
        own = [[v for v in level.variables if with_input or v != 0] for level in self.levels]
        support: list[list[int]] = []
        for index in range(count):
            carried = {v for v in (support[-1] if support else []) if self.level_of[v] > index}
            support.append(sorted(direct[index] | carried, key=lambda v: (self.level_of[v], v)))
        offsets, sizes, fronts, diagonal = [], [], [], []
        for index in range(count):
            rows, at = {}, 0
            for v in own[index] + support[index]:
                rows[v] = at
                at += self.variables[v].channels
            offsets.append(rows)
            sizes.append(sum(self.variables[v].channels for v in own[index]))
            fronts.append(at)
            landed = index > 0 and any(self.level_of[v] == index for v in support[index - 1])
            diagonal.append(not same_level[index] and not landed)
        parent_rows = []
        for index in range(count - 1):
            parent_rows.append(np.concatenate([offsets[index + 1][v] + np.arange(self.variables[v].channels)
                                               for v in support[index]] or [np.zeros(0, dtype=np.int64)]))
        parent_rows.append(np.zeros(0, dtype=np.int64))
        return _Layout(own, offsets, sizes, support, fronts, parent_rows, diagonal)

    # -- multipliers ------------------------------------------------------------------------

    def multiplier_sizes(self) -> list[int]:
        """Channels of each unit: the length of its multiplier vector."""
        return [unit.output_space.channels for unit in self.network.units]

    def midpoint(self, unit: int) -> float:
        a, b = self.slopes[unit]
        return (a + b) / 2

    def diagonal(self, variable: int, multipliers, rho: float | None) -> np.ndarray:
        """The variable's diagonal entries (one per channel)."""
        v = self.variables[variable]
        if v.kind == "input":
            return np.full(v.channels, rho)
        if v.kind == "output":
            return np.ones(v.channels)
        lam = multipliers[v.unit]
        if v.kind == "unit":
            return lam
        return (lam / self.aux_constants[v.unit]) * (1 - 2 * UNIT_ROUNDOFF)  # ≤ λ/c: sound

    def coefficient(self, variable: int, multipliers) -> np.ndarray:
        """The reader's coefficient of its couplings (one per channel)."""
        v = self.variables[variable]
        if v.kind == "output":
            return -np.ones(v.channels)
        if v.kind == "aux":
            return -multipliers[v.unit]
        return -self.midpoint(v.unit) * multipliers[v.unit]

    def scales(self, multipliers, rho: float | None) -> dict[int, np.ndarray]:
        """Powers of two per variable and channel that bring the diagonal into [1/2, 2).

        The factorization runs on ``D M D`` (congruent to ``M``; with powers of two the
        scaled entries are the held ones, exactly), so its rounding bound follows the
        scaled matrix: a unit whose multipliers are 10⁸ times another's does not swamp it.
        The input is not scaled in the hidden part (the Schur complement does not change).
        """
        scales = {}
        for v in range(len(self.variables)):
            if v == 0 and rho is None:
                scales[v] = np.ones(self.variables[0].channels)
                continue
            _, exponent = np.frexp(self.diagonal(v, multipliers, rho))
            scales[v] = np.ldexp(1.0, np.clip(-(exponent // 2), -400, 400))
        return scales

    def formation_error(self, multipliers, scales: dict[int, np.ndarray]) -> float:
        """Upper bound of ‖held − exact‖₂ of ``D M D`` (Fourier blocks and their scalings)."""
        total = 0.0
        for c in self.couplings:
            reader = float(np.max(np.abs(self.coefficient(c.reader, multipliers)) * scales[c.reader]))
            slack = 1 + 8 * UNIT_ROUNDOFF if self.variables[c.reader].kind == "unit" else 1.0
            total += reader * float(np.max(scales[c.source])) * slack * c.error
        return round_up(total * (1 + 1e-12))

    def certify(self, multipliers, rho: float) -> bool:
        """Whether ``M(rho, multipliers) ⪰ 0`` is proven for the exact torus network.

        :func:`lipnorm.certificates.certify_shifted_cholesky` on ``D M D``: ``square``
        of :meth:`factor` at a shift, the trace of each level's diagonal as its estimate (a
        column block's ‖·‖_F² is the trace of its diagonal block in exact arithmetic), the
        formation error of :meth:`formation_error`.
        """
        from lipnorm.certificates import certify_shifted_cholesky

        scales = self.scales(multipliers, rho)
        diagonals = [self.diagonal(v, multipliers, rho) * scales[v] ** 2 for v in range(len(self.variables))]

        def factor_square(shift: float):
            factor = self.factor(multipliers, rho, shift)
            return None if factor is None else factor.square

        return certify_shifted_cholesky(factor_square, dimension=self.dimension(), estimate=float(sum(
            np.sum(d) for d in diagonals)), largest_diagonal=float(max(np.max(d) for d in diagonals)),
            formation_error=self.formation_error(multipliers, scales), complex_dtype=True)

    def dimension(self, with_input: bool = True) -> int:
        """Rows of the whole matrix (every fiber)."""
        layout = self.layouts[with_input]
        return sum(size * (1 if level.shared else level.positions * self.total_fibers)
                   for size, level in zip(layout.sizes, self.levels))

    # -- fronts and the factorization --------------------------------------------------------

    def _front(self, index: int, layout: _Layout, multipliers, rho, scales, shift: float, carried,
               carried_right) -> _Front:
        """A level's fronts: the original entries, less ``shift`` on the diagonal, plus what its
        children carried (the sum of their Schur complements and right-hand sides, on the
        rows ``parent_rows`` of the level below)."""
        level = self.levels[index]
        n, s = layout.sizes[index], layout.fronts[index] - layout.sizes[index]
        batch = () if level.shared else (self.fibers, level.positions)
        own = np.zeros(batch + (n, n), dtype=np.complex128)
        coupling = np.zeros(batch + (n, s), dtype=np.complex128)
        for v in layout.own[index]:
            rows = layout.offsets[index][v] + np.arange(self.variables[v].channels)
            own[..., rows, rows] = self.diagonal(v, multipliers, rho) * scales[v] ** 2 - shift
        right = None
        if index == 0 and 0 not in layout.own[0]:  # the input's coupling: right-hand sides
            right = np.zeros(batch + (n + s, self.variables[0].channels), dtype=np.complex128)
        for c in self.couplings:
            if self.level_of[c.source] != index:
                continue
            r0 = layout.offsets[index][c.reader]
            rows = slice(r0, r0 + self.variables[c.reader].channels)
            reader = self.coefficient(c.reader, multipliers) * scales[c.reader]
            block = reader[:, None] * c.stack * scales[c.source]
            if c.source == 0 and right is not None:
                right[..., rows, :] = block
                continue
            s0 = layout.offsets[index][c.source]
            columns = slice(s0, s0 + self.variables[c.source].channels)
            if r0 < n:
                own[..., rows, columns] += block
                own[..., columns, rows] += np.conj(np.swapaxes(block, -1, -2))
            else:
                coupling[..., columns, r0 - n:rows.stop - n] = np.conj(np.swapaxes(block, -1, -2))
        rest = None
        if carried is not None:
            rows = layout.parent_rows[index - 1]
            low, high = rows < n, rows >= n
            own[..., rows[low][:, None], rows[low][None, :]] += carried[..., low, :][..., low]
            coupling[..., rows[low][:, None], rows[high][None, :] - n] += carried[..., low, :][..., high]
            if np.any(high):
                rest = np.zeros(batch + (s, s), dtype=np.complex128)
                rest[..., rows[high][:, None] - n, rows[high][None, :] - n] = carried[..., high, :][..., high]
            if carried_right is not None:
                right = np.zeros(batch + (n + s, carried_right.shape[-1]), dtype=np.complex128)
                right[..., rows, :] = carried_right
        return _Front(own, coupling, rest, right)

    def factor(self, multipliers, rho: float | None = None, shift: float = 0.0) -> TreeFactor | None:
        """Factor the matrix (with the input, at ``rho``) or its hidden part (``rho=None``), less ``shift·I``.

        Without the input, the factor also holds ``L⁻¹B`` for the input's coupling ``B``
        (what :meth:`TreeFactor.schur` needs).

        Returns
        -------
        TreeFactor or None
            None where a pivot block is not positive definite.
        """
        layout = self.layouts[rho is not None]
        scales = self.scales(multipliers, rho)
        count = len(self.levels)
        eliminated: list[_Eliminated] = []
        squares = [np.zeros(1) if level.shared else np.zeros((self.fibers, level.positions)) for level in self.levels]
        carried = carried_right = None
        for index, level in enumerate(self.levels):
            front = self._front(index, layout, multipliers, rho, scales, shift, carried,
                                None if level.shared else carried_right)
            if level.shared:
                return self._root(eliminated, front, layout.parent_rows[index - 1], squares, layout, scales)
            to_root = index + 1 < count and self.levels[index + 1].shared
            part = _eliminate(front, layout.diagonal[index], summed=to_root, paired=self.paired)
            if part is None:
                return None
            eliminated.append(part)
            squares[index] += part.own_squares
            self._column_squares(index, part, layout, squares)
            if to_root or index + 1 == count:
                carried, carried_right = part.schur, part.right_rest
            else:
                parents = self.levels[index + 1].positions
                carried = part.schur.reshape((self.fibers, -1, parents) + part.schur.shape[2:]).sum(axis=1)
                carried_right = None if part.right_rest is None else _gather_columns(
                    part.right_rest, parents, self.variables[0].channels)
        return TreeFactor(self, layout, eliminated, None, None, sum(float(np.max(s)) for s in squares), scales)

    def _column_squares(self, index: int, part: _Eliminated, layout: _Layout, squares) -> None:
        """Add ‖Y‖_F² of the coupling's columns to the column blocks of the ancestors they reach."""
        size = layout.sizes[index]
        weights = np.ones(self.fibers)
        weights[self.paired] = 2
        for target in range(index + 1, len(self.levels)):
            columns = [layout.offsets[index][v] - size + np.arange(self.variables[v].channels)
                       for v in layout.support[index] if self.level_of[v] == target]
            if not columns:
                continue
            y = part.coupling[..., np.concatenate(columns)]
            column_squares = np.einsum("zpij,zpij->zp", y.real, y.real) + np.einsum("zpij,zpij->zp", y.imag, y.imag)
            if self.levels[target].shared:
                squares[target] += float(np.sum(column_squares.sum(axis=1) * weights))
            else:
                positions = self.levels[target].positions
                squares[target] += column_squares.reshape(self.fibers, -1, positions).sum(axis=1)

    def _root(self, eliminated, front: _Front, rows, squares, layout, scales) -> TreeFactor | None:
        """Factor the one-point grid's front; the fibers' right-hand sides become its columns
        (formed fibers, then the conjugates of the paired ones)."""
        try:
            root = np.linalg.cholesky(front.own)
        except np.linalg.LinAlgError:
            return None
        solved = None
        right = eliminated[-1].right_rest
        if right is not None:  # (Z, P, s, cols) → (n_root, every fiber's columns)
            formed = np.moveaxis(right, 2, 0).reshape(right.shape[2], -1)
            mirrored = np.conj(np.moveaxis(right[self.paired], 2, 0)).reshape(right.shape[2], -1)
            columns = np.zeros((root.shape[0], formed.shape[1] + mirrored.shape[1]), dtype=np.complex128)
            columns[rows] = np.concatenate([formed, mirrored], axis=1)
            solved = lower_solve(root, columns)
        squares[-1] += float(np.vdot(root, root).real)
        return TreeFactor(self, layout, eliminated, root, solved, sum(float(np.max(s)) for s in squares), scales)

    def form_derivative(self, factor: TreeFactor, vectors: np.ndarray, weights: np.ndarray, multipliers):
        """``∂q/∂λ`` per unit and channel at ``(u, −G⁻¹Bu)``, summed over the columns of ``u``
        with ``weights``: ``−∂ρ/∂λ`` where ``u`` are top eigenvectors of the Schur complement
        (envelope theorem).

        Parameters
        ----------
        factor : TreeFactor
            Of the hidden part.
        vectors : ndarray, shape (input_size, k)
        weights : ndarray, shape (k,)
        multipliers : list of ndarray

        Returns
        -------
        list of ndarray
            One per unit, one value per channel.
        """
        levels, root = factor.solve(vectors)
        layout = factor.layout
        inputs = factor._split(vectors)
        k = vectors.shape[1]
        both = np.concatenate([weights, weights])

        def value(v: int):
            if v == 0:
                return inputs
            level = self.level_of[v]
            rows = layout.offsets[level][v] + np.arange(self.variables[v].channels)
            scale = factor.scales[v][:, None]  # h = D h' for the scaled factor's solution h'
            return -scale * root[rows] if self.levels[level].shared else -scale * levels[level][:, :, rows]

        images: dict[int, np.ndarray] = {}
        for c in self.couplings:
            if self.variables[c.reader].kind not in ("unit", "aux"):
                continue
            source, target = self.levels[self.level_of[c.source]], self.levels[self.level_of[c.reader]]
            product = c.stack @ value(c.source)
            if source.shared:
                image = product
            elif target.shared:
                total = product.sum(axis=(0, 1))
                image = total[:, :k] + np.conj(total[:, k:])
            else:
                image = product.reshape((self.fibers, -1, target.positions) + product.shape[2:]).sum(axis=1)
            images[c.reader] = images.get(c.reader, 0) + image
        derivatives = [np.zeros(n) for n in self.multiplier_sizes()]
        for index, v in enumerate(self.variables):
            if v.kind not in ("unit", "aux"):
                continue
            h = value(index)
            if v.kind == "unit":
                slope, coefficient = 1.0, -self.midpoint(v.unit)
            else:
                slope, coefficient = (1 - 2 * UNIT_ROUNDOFF) / self.aux_constants[v.unit], -1.0
            terms = slope * (h.real**2 + h.imag**2)
            if index in images:
                terms = terms + 2 * coefficient * np.real(np.conj(h) * images[index])
            shared = self.levels[self.level_of[index]].shared
            derivatives[v.unit] += terms @ weights if shared else terms.sum(axis=(0, 1)) @ both
        return derivatives

    # -- sizes ------------------------------------------------------------------------------

    def hidden(self) -> int:
        """Hidden neurons of the model (units' windows)."""
        return sum(unit.output_space.channels * math.prod(unit.output_space.window) for unit in self.network.units)

    def work(self) -> tuple[float, float]:
        """Real flops of one factorization of the hidden part (with its right-hand sides), and
        bytes it holds."""
        layout = self.layouts[False]
        flops, held = 0.0, 0.0
        columns = self.variables[0].channels
        for index, level in enumerate(self.levels):
            n, k = layout.sizes[index], layout.fronts[index]
            s = k - n
            count = 1 if level.shared else self.fibers * level.positions
            if not level.shared and index:
                columns *= self.levels[index - 1].positions // level.positions
            elif level.shared:
                columns *= self.fibers * self.levels[index - 1].positions if index else 1
            flops += 4 * count * (n**3 / 3 + n * n * s + n * s * s + (n * n + n * s) * columns)
            held += 16 * count * (k * k + n * (n + s + columns) + s * columns)
        held += sum(self._stack_bytes(reader, source) for reader, source, _, _ in self.links)
        return flops, held


def _held_slope(unit) -> tuple[float, float]:
    """The slope range the SDP holds for a unit: its own, or ``[min(a, 0), max(b, 0)]`` where
    ``a·b > 0`` (a range containing 0 needs no coupling between the unit's inputs).

    Raises
    ------
    NotHeld
        For a unit known by its bound only.
    """
    if unit.slope is None:
        raise NotHeld(f"unit {unit.name!r} is known by its Lipschitz bound only (max pooling or a rule), "
                      "not by a slope range")
    a, b = unit.slope
    return (min(a, 0.0), max(b, 0.0)) if a * b > 0 else (float(a), float(b))


@dataclass
class _Front:
    """The fronts of one level: own block (..., n, n), own × support (..., n, s), support ×
    support (..., s, s; None for zero) and right-hand sides (..., n + s, cols) or None."""

    own: np.ndarray
    coupling: np.ndarray
    rest: np.ndarray | None
    right: np.ndarray | None


@dataclass
class _Eliminated:
    """One level's elimination: its factor blocks and what it passes to its parent."""

    factor: np.ndarray  # (Z, P, n, n) lower, or (Z, P, n) for a diagonal level
    coupling: np.ndarray  # Y = L⁻¹ E: (Z, P, n, s)
    solved: np.ndarray | None  # L⁻¹ B (Z, P, n, cols)
    schur: np.ndarray  # (Z, P, s, s), or summed over every fiber (s, s) below the root
    right_rest: np.ndarray | None  # (Z, P, s, cols)
    own_squares: np.ndarray  # ‖L‖_F² per (Z, P)


def _eliminate(front: _Front, diagonal: bool, *, summed: bool, paired) -> _Eliminated | None:
    """Eliminate the own rows of every front (partial Cholesky), in threads over the fibers.

    With ``summed`` (the parent is the one-point grid) the Schur complements of every fiber,
    and of the conjugates of the paired ones, are summed.
    """
    fibers, size = front.own.shape[0], front.own.shape[-1]
    halves = [slice(0, fibers // 2), slice(fibers // 2, fibers)] if fibers > 1 else [slice(0, fibers)]
    right = front.right

    def run(part):
        return _eliminate_part(front.own[part], front.coupling[part], size, diagonal,
                               None if right is None else right[part])

    results = parallel_map(run, halves)
    if any(r is None for r in results):
        return None
    factor, coupling, solved, own = (None if results[0][i] is None else np.concatenate([r[i] for r in results])
                                     for i in range(4))
    right_rest = None if right is None else right[..., size:, :] - np.conj(np.swapaxes(coupling, -1, -2)) @ solved
    if summed:
        lone = np.ones(fibers, dtype=bool)
        lone[paired] = False
        flat = coupling[lone].reshape(-1, coupling.shape[-1])
        twice = coupling[paired].reshape(-1, coupling.shape[-1])
        doubled = np.conj(twice.T) @ twice
        schur = -(np.conj(flat.T) @ flat) - (doubled + np.conj(doubled))
        if front.rest is not None:
            kept = front.rest[paired].sum(axis=(0, 1))
            schur += front.rest[lone].sum(axis=(0, 1)) + (kept + np.conj(kept))
    else:
        schur = -(np.conj(np.swapaxes(coupling, -1, -2)) @ coupling)
        if front.rest is not None:
            schur += front.rest
    return _Eliminated(factor, coupling, solved, schur, right_rest, own)


def _eliminate_part(own, coupling, size: int, diagonal: bool, right):
    if size == 0:
        return (np.zeros(own.shape[:2] + (0,)), coupling, None if right is None else right[..., :0, :],
                np.zeros(own.shape[:2]))
    if diagonal:
        entries = np.diagonal(own, axis1=-2, axis2=-1).real
        if not np.all(entries > 0):
            return None
        factor = np.sqrt(entries)
        y = coupling / factor[..., :, None]
        solved = None if right is None else right[..., :size, :] / factor[..., :, None]
        return factor, y, solved, np.sum(entries, axis=-1)
    try:
        factor = np.linalg.cholesky(own)
    except np.linalg.LinAlgError:
        return None
    y = lower_solve(factor, coupling)
    solved = None if right is None else lower_solve(factor, right[..., :size, :])
    squares = np.einsum("zpij,zpij->zp", factor.real, factor.real) + np.einsum("zpij,zpij->zp", factor.imag,
                                                                              factor.imag)
    return factor, y, solved, squares


#: Rows below which triangular solves substitute row by row.
_LEAF = 8


def lower_solve(factor: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``L⁻¹ B`` for a stack of lower triangular ``L`` by blocked forward substitution.

    Each entry is ``(b_i − Σ_j l_ij y_j) / l_ii`` with the sum split into blocks (BLAS
    products) and rows: a conventional substitution in another order of summation, so
    the rounding bounds of the Cholesky factorization hold for the blocks it computes.
    NumPy's products release the GIL, so stacks run in threads.

    Parameters
    ----------
    factor : ndarray, shape (..., n, n)
    right : ndarray, shape (..., n, k)

    Returns
    -------
    ndarray, shape (..., n, k)
    """
    n = factor.shape[-1]
    if n <= _LEAF:
        solution = np.array(right, dtype=np.result_type(factor, right), copy=True)
        for i in range(n):
            solution[..., i, :] /= factor[..., i, i, None]
            if i + 1 < n:
                solution[..., i + 1:, :] -= factor[..., i + 1:, i, None] * solution[..., i, None, :]
        return solution
    half = n // 2
    top = lower_solve(factor[..., :half, :half], right[..., :half, :])
    bottom = lower_solve(factor[..., half:, half:], right[..., half:, :] - factor[..., half:, :half] @ top)
    return np.concatenate([top, bottom], axis=-2)


def upper_solve(factor: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``L⁻ᴴ B`` for a stack of lower triangular ``L`` (backward substitution, blocked)."""
    n = factor.shape[-1]
    if n <= _LEAF:
        solution = np.array(right, dtype=np.result_type(factor, right), copy=True)
        for i in reversed(range(n)):
            solution[..., i, :] /= np.conj(factor[..., i, i, None])
            if i:
                solution[..., :i, :] -= np.conj(factor[..., i, :i, None]) * solution[..., i, None, :]
        return solution
    half = n // 2
    bottom = upper_solve(factor[..., half:, half:], right[..., half:, :])
    adjoint = np.conj(np.swapaxes(factor[..., half:, :half], -1, -2))
    top = upper_solve(factor[..., :half, :half], right[..., :half, :] - adjoint @ bottom)
    return np.concatenate([top, bottom], axis=-2)


def _gather_columns(values: np.ndarray, parents: int, channels: int) -> np.ndarray:
    """(Z, R·P, r, J·c) per child position → (Z, P, r, J·R·c) per parent.

    Child ``v·P + q`` of parent ``q`` holds columns ``(j, channel)`` for input position
    ``j·R·P + v·P + q``; the parent's columns ``(j·R + v, channel)`` hold input position
    ``(j·R + v)·P + q``: the children's columns interleaved.
    """
    fibers, count, rows, width = values.shape
    aliases = count // parents
    shaped = values.reshape(fibers, aliases, parents, rows, width // channels, channels)
    return shaped.transpose(0, 2, 3, 4, 1, 5).reshape(fibers, parents, rows, width * aliases)


class TreeFactor:
    """A factorization of :class:`FrequencySdp`'s matrix (or its hidden part ``G``) by fronts.

    Vectors on the input (:meth:`schur`, :meth:`solve`) are indexed by fiber (the formed
    fibers, then the conjugates of the paired ones), the finest level's position in the
    fiber, and channel: ``input_size`` entries, the input's Fourier coefficients.

    Attributes
    ----------
    square : float
        An upper bound of ``‖|R|‖₂²`` (computed in float64; see the module docstring).
    """

    def __init__(self, sdp: FrequencySdp, layout: _Layout, levels: list[_Eliminated], root, root_solved,
                 square: float, scales: dict[int, np.ndarray]):
        self.sdp = sdp
        self.layout = layout
        self.levels = levels
        self.root = root
        self.root_solved = root_solved
        self.square = square
        self.scales = scales
        self._blocks = None
        self.channels = sdp.variables[0].channels
        self.positions = sdp.levels[0].positions
        self.input_size = (sdp.fibers + len(sdp.paired)) * self.positions * self.channels

    # -- the input's vectors in fiber layout --------------------------------------------------

    def _split(self, vectors: np.ndarray) -> np.ndarray:
        """(input_size, k) → (Z, P₀, C₀, 2k): each formed fiber's values, then its conjugate
        fiber's values conjugated (zero where it has none), so that the formed fibers' blocks
        act on both."""
        k = vectors.shape[1]
        formed = self.sdp.fibers * self.positions * self.channels
        layout = np.zeros((self.sdp.fibers, self.positions, self.channels, 2 * k), dtype=np.complex128)
        layout[..., :k] = vectors[:formed].reshape(self.sdp.fibers, self.positions, self.channels, k)
        layout[self.sdp.paired, ..., k:] = np.conj(vectors[formed:]).reshape(-1, self.positions, self.channels, k)
        return layout

    def _join(self, layout: np.ndarray) -> np.ndarray:
        k = layout.shape[-1] // 2
        return np.concatenate([layout[..., :k].reshape(-1, k), np.conj(layout[self.sdp.paired, ..., k:]).reshape(-1, k)])

    def _grouped(self, layout: np.ndarray, index: int) -> np.ndarray:
        """(Z, P₀, C₀, m) → (Z, P_l, J·C₀, m): the input entries below each position of level ``index``."""
        positions = self.sdp.levels[index].positions
        fibers, _, channels, width = layout.shape
        shaped = layout.reshape(fibers, -1, positions, channels, width).transpose(0, 2, 1, 3, 4)
        return shaped.reshape(fibers, positions, -1, width)

    def _ungrouped(self, grouped: np.ndarray, index: int) -> np.ndarray:
        positions = self.sdp.levels[index].positions
        fibers, _, _, width = grouped.shape
        shaped = grouped.reshape(fibers, positions, -1, self.channels, width).transpose(0, 2, 1, 3, 4)
        return shaped.reshape(fibers, -1, self.channels, width)

    def _root_columns(self, vectors: np.ndarray) -> np.ndarray:
        """(input_size, k) → the root's column order: fiber, top position, entries below it."""
        top = self.sdp.levels[len(self.levels) - 1].positions
        k = vectors.shape[1]
        shaped = vectors.reshape(-1, self.positions // top, top, self.channels, k).transpose(0, 2, 1, 3, 4)
        return shaped.reshape(-1, k)

    def _from_root_columns(self, columns: np.ndarray) -> np.ndarray:
        top = self.sdp.levels[len(self.levels) - 1].positions
        k = columns.shape[1]
        shaped = columns.reshape(-1, top, self.positions // top, self.channels, k).transpose(0, 2, 1, 3, 4)
        return shaped.reshape(-1, k)

    # -- the Schur complement on the input and the hidden solution ----------------------------

    def schur(self, vectors: np.ndarray) -> np.ndarray:
        """``Bᴴ G⁻¹ B u = Zᴴ Z u`` (``Z = L⁻¹ B``) for input vectors (input_size, k).

        ``Z``'s rows of one frequency reach the input entries below it, so ``ZᴴZ`` is
        block-diagonal over the top in-fiber level's frequencies (blocks formed once), plus
        the one-point grid's rows, ``Z_rᴴ Z_r``, applied as two products.
        """
        if self._blocks is None:
            self._blocks = self._schur_blocks()
        top = len(self.levels) - 1
        layout = self._split(vectors)
        result = self._join(self._ungrouped(self._blocks @ self._grouped(layout, top), top))
        if self.root_solved is not None:
            reduced = self.root_solved @ self._root_columns(vectors)
            result += self._from_root_columns(np.conj(self.root_solved.T) @ reduced)
        return result

    def _schur_blocks(self) -> np.ndarray:
        """Σ over the in-fiber levels of ``Z_lᴴ Z_l``, as blocks of the top level's frequencies
        (Z, P_top, J·C₀, J·C₀): a level-l frequency ``p = a·P_top + q`` holds the input entries
        ``j·P_l + p``, entry ``j·R + a`` below top frequency ``q`` (``R = P_l / P_top``)."""
        top = self.sdp.levels[len(self.levels) - 1].positions
        fibers, channels = self.sdp.fibers, self.channels
        below = self.positions // top
        blocks = np.zeros((fibers, top, below, channels, below, channels), dtype=np.complex128)
        for index, part in enumerate(self.levels):
            if part.solved is None or not part.solved.shape[2]:
                continue
            positions = self.sdp.levels[index].positions
            ratio, count = positions // top, self.positions // positions
            gram = np.conj(np.swapaxes(part.solved, -1, -2)) @ part.solved
            gram = gram.reshape(fibers, ratio, top, count, channels, count, channels)
            spread = blocks.reshape(fibers, top, count, ratio, channels, count, ratio, channels)
            for a in range(ratio):
                spread[:, :, :, a, :, :, a, :] += gram[:, a]
        return blocks.reshape(fibers, top, below * channels, below * channels)

    def solve(self, vectors: np.ndarray):
        """``h = G⁻¹ B u`` for input vectors (input_size, k).

        Returns
        -------
        levels : list of ndarray, shape (Z, P_l, n_l, 2k)
            Each in-fiber level's own rows, in the layout of :meth:`_split` (a paired
            fiber's conjugate conjugated, in the last k columns).
        root : ndarray, shape (n_root, k), or None
        """
        layout = self._split(vectors)
        reduced = [None if part.solved is None else part.solved @ self._grouped(layout, index)
                   for index, part in enumerate(self.levels)]
        root = None
        if self.root is not None:
            root = upper_solve(self.root, self.root_solved @ self._root_columns(vectors))
        values: list = [None] * len(self.levels)
        for index in reversed(range(len(self.levels))):
            part = self.levels[index]
            support = self._support_values(index, values, root, reduced[index].shape[-1])
            right = reduced[index] - part.coupling @ support
            if part.factor.ndim == 3:  # diagonal
                values[index] = right / part.factor[..., None]
            else:
                values[index] = upper_solve(part.factor, right)
        return values, root

    def _support_values(self, index: int, values, root, width: int) -> np.ndarray:
        sdp, layout = self.sdp, self.layout
        positions = sdp.levels[index].positions
        blocks = []
        for v in layout.support[index]:
            target = sdp.level_of[v]
            rows = layout.offsets[target][v] + np.arange(sdp.variables[v].channels)
            if sdp.levels[target].shared:  # the same in every fiber; conjugated for the conjugate fibers
                half = root[rows]
                both = np.zeros((sdp.fibers, positions, len(rows), width), dtype=np.complex128)
                both[..., :width // 2] = half
                both[sdp.paired, ..., width // 2:] = np.conj(half)
                blocks.append(both)
            else:
                ancestors = np.arange(positions) % sdp.levels[target].positions
                blocks.append(values[target][:, ancestors][:, :, rows])
        if not blocks:
            return np.zeros((sdp.fibers, positions, 0, width), dtype=np.complex128)
        return np.concatenate(blocks, axis=2)
