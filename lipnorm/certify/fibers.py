r"""Chains of torus convolutions, fiber by fiber: blocks, products, sums and certified norms.

A strided circular convolution from a grid :math:`N_s` to :math:`N_t = N_s / S` maps the
source frequencies :math:`\xi \equiv \eta \pmod{N_t}` to target frequency :math:`\eta`
(:class:`lipnorm.certify.torus.TorusConv`). With the *fiber grid* :math:`N_f` of a
:class:`~lipnorm.certify.torus.TorusNetwork` (every grid a multiple or a divisor of it),
the frequencies of every space split into fibers :math:`\zeta \in \mathbb{Z}_{N_f}`:
``ξ ≡ ζ (mod N_f)``. Every convolution maps fiber ζ into fiber ζ, so every product and sum
of them does, and the whole network decomposes into ``∏ N_f`` independent small problems.

In fiber ζ, a space with grid ``N`` holds ``K = N / N_f`` frequencies per axis
(``ξ = ζ + N_f k``, ``k ∈ Z_K``; one, ``ζ mod N``, where ``N`` divides ``N_f``). A
linear map from space ``s`` to space ``t`` built of these convolutions is a
:class:`FiberBlock`: for each of the target's fiber frequencies ``k_t`` a ``c_t × R c_s``
matrix, ``R = ∏ K_s / K_t``, whose column group ``v`` holds the source frequency
``k_s = k_t + K_t v`` (per axis). Its operator norm is the largest norm over the rows and
fibers where the target has as many fibers as frequencies (``N_f`` divides ``N_t``); where
the target grid is coarser (the one-point grid of a dense layer), one target frequency
gathers its columns from several fibers, and the norm comes from the sum of the fibers'
Gram matrices (:class:`NormAccumulator`).

A real map's block in fiber ``−ζ`` is the complex conjugate of the one in ``ζ``, up to
the order of frequencies, so only one fiber of each pair is formed
(:func:`lipnorm.conv.spectrum.half_frequencies`).

Rounding: every block carries ``error``, an upper bound of the spectral norm of
(computed − exact) of each of its row matrices, and ``norm``, an upper bound of the
spectral norm of each computed row matrix; products, sums and scalings grow ``error`` by
their rounding (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §3.5-3.6:
a complex dot product of length ``n`` is within :math:`\sqrt 2 \gamma_{n+2}` of the truth
relative to the absolute values, doubled here as everywhere in lipnorm). The ``norm`` of a
block whose norm was certified (:meth:`NormAccumulator.record`) is that certified bound, so
errors grow with the spectral norms of the factors rather than their Frobenius norms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lipnorm.bounds import round_up
from lipnorm.certificates import block_grams, certified_stack_bounds, certify_gram_stack
from lipnorm.certify.rounding import UNIT_ROUNDOFF, gamma
from lipnorm.certify.torus import TorusBlock, TorusConv, TorusNetwork, TorusSpace
from lipnorm.conv.spectrum import half_frequencies

__all__ = ["FiberAlgebra", "FiberBlock", "FiberChunk", "FiberCost", "NormAccumulator", "add", "channel_scaled",
           "compose", "conv_block", "evaluate", "fiber_chunks", "fiber_counts"]


@dataclass(frozen=True)
class FiberChunk:
    """Some fibers ``ζ`` of a network, evaluated together.

    Attributes
    ----------
    fiber_grid : tuple of int
    zetas : ndarray of int, shape (Z, d)
    paired : ndarray of bool, shape (Z,)
        Whether fiber ``−ζ`` is another fiber (its blocks are the conjugates, not formed).
    """

    fiber_grid: tuple[int, ...]
    zetas: np.ndarray
    paired: np.ndarray

    def weight(self) -> np.ndarray:
        """How many fibers each formed one stands for (2 where paired, else 1)."""
        return np.where(self.paired, 2, 1)


def fiber_chunks(network: TorusNetwork, entries_per_fiber: int, max_entries: int) -> list[FiberChunk]:
    """One fiber of each conjugate pair, in chunks of at most ``max_entries`` entries held.

    Parameters
    ----------
    network : TorusNetwork
    entries_per_fiber : int
        Complex entries the chain method holds at once for one fiber.
    max_entries : int
        Entries allowed at once (per chunk).

    Returns
    -------
    list of FiberChunk
    """
    grid = network.fiber_grid
    zetas = half_frequencies(grid)
    paired = np.any(np.mod(-zetas, np.asarray(grid)) != zetas, axis=1)
    per_chunk = max(1, max_entries // max(entries_per_fiber, 1))
    return [FiberChunk(grid, zetas[i:i + per_chunk], paired[i:i + per_chunk])
            for i in range(0, zetas.shape[0], per_chunk)]


def fiber_counts(space: TorusSpace, fiber_grid) -> tuple[int, ...]:
    """``K`` per axis: the frequencies of ``space`` in each fiber."""
    return tuple(n // f if n % f == 0 else 1 for n, f in zip(space.grid, fiber_grid))


def _column_sources(target_counts, source_counts) -> np.ndarray:
    """Flat source fiber index ``k_s = k_t + K_t v`` for each target row ``k_t`` and column group ``v``.

    Returns
    -------
    ndarray of int, shape (∏ K_t, ∏ K_s / K_t)
    """
    ratios = tuple(s // t for s, t in zip(source_counts, target_counts))
    rows = np.indices(target_counts).reshape(len(target_counts), -1).T  # (T, d)
    columns = np.indices(ratios).reshape(len(ratios), -1).T  # (R, d)
    k_s = rows[:, None, :] + np.asarray(target_counts) * columns[None, :, :]
    if not k_s.size:
        return np.zeros((rows.shape[0], columns.shape[0]), dtype=np.int64)
    return np.ravel_multi_index(tuple(np.moveaxis(k_s, -1, 0)), source_counts)


@dataclass
class FiberBlock:
    """A linear map from one space to another on a chunk of fibers (module docstring).

    Attributes
    ----------
    data : ndarray, complex128, shape (Z, T, c_t, R · c_s), or None
        None for the identity (``source == target``), scaled by ``scale``.
    source, target : TorusSpace
    fiber_grid : tuple of int
    error : float
        Upper bound of ‖computed − exact‖₂ of each row matrix.
    norm : float
        Upper bound of ‖computed‖₂ of each row matrix.
    scale : float
        The identity's factor (``data`` None only).
    """

    data: np.ndarray | None
    source: TorusSpace
    target: TorusSpace
    fiber_grid: tuple[int, ...]
    error: float
    norm: float
    scale: float = 1.0

    def dense(self, fibers: int | None = None) -> np.ndarray:
        """``data``, the identity formed (for ``fibers`` fibers) where it is None."""
        if self.data is not None:
            return self.data
        counts = fiber_counts(self.source, self.fiber_grid)
        eye = np.eye(self.source.channels, dtype=np.complex128) * self.scale
        return np.broadcast_to(eye, (fibers or 1, math.prod(counts)) + eye.shape).copy()


def _frobenius(stack: np.ndarray) -> np.ndarray:
    """‖matrix‖_F over the last two axes (rounding included)."""
    squares = (np.einsum("...ij,...ij->...", stack.real, stack.real)
               + np.einsum("...ij,...ij->...", stack.imag, stack.imag))
    return np.sqrt(squares) * (1 + gamma(stack.shape[-1] * stack.shape[-2] + 2))


def _row_frobenius(data: np.ndarray) -> np.ndarray:
    """‖row matrix‖_F for each (fiber, target frequency), rounding included: shape (Z, T)."""
    squares = np.einsum("ztij,ztij->zt", data.real, data.real) + np.einsum("ztij,ztij->zt", data.imag, data.imag)
    return np.sqrt(squares) * (1 + gamma(data.shape[2] * data.shape[3] + 2))


def conv_block(conv: TorusConv, chunk: FiberChunk) -> FiberBlock:
    """One convolution's block on a chunk of fibers.

    Parameters
    ----------
    conv : TorusConv
    chunk : FiberChunk

    Returns
    -------
    FiberBlock
        ``norm`` is the largest row's Frobenius norm (certify it for a spectral one).
    """
    grid = chunk.fiber_grid
    target_counts, source_counts = fiber_counts(conv.target, grid), fiber_counts(conv.source, grid)
    columns = _column_sources(target_counts, source_counts)  # (T, R)
    k_s = np.indices(source_counts).reshape(len(grid), -1).T  # (K_s, d)
    freqs = np.mod(chunk.zetas[:, None, :] + np.asarray(grid) * k_s[None, :, :], np.asarray(conv.source.grid))
    symbol = conv.symbol(freqs.reshape(-1, len(grid)))  # (Z·K_s, cout, cin)
    cout, cin = symbol.shape[1:]
    symbol = symbol.reshape(chunk.zetas.shape[0], -1, cout, cin)
    data = symbol[:, columns]  # (Z, T, R, cout, cin)
    data = np.ascontiguousarray(data.transpose(0, 1, 3, 2, 4)).reshape(
        chunk.zetas.shape[0], columns.shape[0], cout, columns.shape[1] * cin)
    error = conv.block_error(columns.shape[1])
    norm = round_up(float(_row_frobenius(data).max()) + error) if data.size else 0.0
    return FiberBlock(data, conv.source, conv.target, grid, error, norm)


def evaluate(block: TorusBlock, space: TorusSpace, chunk: FiberChunk, cache: dict) -> FiberBlock:
    """A sum of paths of convolutions on a chunk of fibers.

    Parameters
    ----------
    block : tuple of TorusPath
    space : TorusSpace
        The source's space (that of an identity path).
    chunk : FiberChunk
    cache : dict
        Convolution blocks already formed on this chunk (by ``id``), filled here.

    Returns
    -------
    FiberBlock
    """
    total = None
    for path in block:
        value = None
        for conv in path.convs:
            if id(conv) not in cache:
                cache[id(conv)] = conv_block(conv, chunk)
            value = cache[id(conv)] if value is None else compose(cache[id(conv)], value)
        if value is None:
            value = FiberBlock(None, space, space, chunk.fiber_grid, path.scale_error,
                               round_up(abs(path.scale) + path.scale_error), path.scale)
        elif path.scale != 1.0 or path.scale_error:
            value = _scaled(value, path.scale, path.scale_error)
        total = value if total is None else add(total, value)
    return total


def _scaled(block: FiberBlock, scale: float, scale_error: float = 0.0) -> FiberBlock:
    """``scale · block`` (exact scale within ``scale_error``), rounding in its error."""
    if block.data is None:
        value = block.scale * scale
        return FiberBlock(None, block.source, block.target, block.fiber_grid,
                          round_up(abs(scale) * block.error + scale_error * abs(block.scale)
                                   + UNIT_ROUNDOFF * abs(value)),
                          round_up(abs(value) * (1 + 2 * UNIT_ROUNDOFF)), value)
    data = block.data * scale
    rounding = UNIT_ROUNDOFF * float(_row_frobenius(data).max()) if data.size else 0.0
    error = abs(scale) * block.error + scale_error * (block.norm + block.error) + rounding
    return FiberBlock(data, block.source, block.target, block.fiber_grid, round_up(error),
                      round_up(abs(scale) * block.norm * (1 + 2 * UNIT_ROUNDOFF) + rounding))


def compose(left: FiberBlock, right: FiberBlock, scale: float = 1.0) -> FiberBlock:
    """``scale · left ∘ right`` (``right`` first), with its rounding in ``error``.

    Parameters
    ----------
    left : FiberBlock
        From space ``u`` to ``t``.
    right : FiberBlock
        From space ``s`` to ``u``.
    scale : float

    Returns
    -------
    FiberBlock
        From ``s`` to ``t``. Row ``k_t``'s column group ``v2`` of ``left`` reads right row
        ``k_u = k_t + K_t v2``, whose column group ``v1`` is source frequency
        ``k_s = k_u + K_u v1 = k_t + K_t (v2 + (K_u / K_t) v1)``: the product's columns are
        reordered to ``v = v2 + (K_u / K_t) v1`` per axis.
    """
    if scale != 1.0:
        left = _scaled(left, scale)
    if right.data is None:
        return _scaled(left, right.scale, right.error)
    if left.data is None:
        return _scaled(right, left.scale, left.error)
    grid = left.fiber_grid
    t_counts, u_counts = fiber_counts(left.target, grid), fiber_counts(left.source, grid)
    s_counts = fiber_counts(right.source, grid)
    zetas, rows, c_t = left.data.shape[:3]
    c_u = left.source.channels
    r2 = left.data.shape[3] // c_u
    if t_counts == u_counts:  # one right row per target row, the same one
        right_rows = right.data[:, :, None]
    else:
        right_rows = right.data[:, _column_sources(t_counts, u_counts)]  # (Z, T, R2, c_u, X)
    left_groups = left.data.reshape(zetas, rows, c_t, r2, c_u).transpose(0, 1, 3, 2, 4)  # (Z, T, R2, c_t, c_u)
    product = left_groups @ right_rows  # (Z, T, R2, c_t, X)
    # rounding: each column group's product is within 2γ(c_u + 2) ‖L_v‖_F ‖R_v‖_F, the groups side by side
    left_f = _frobenius(left_groups)
    right_f = _frobenius(right_rows)
    rounding = (2 * gamma(c_u + 2) * float(np.sqrt(np.sum((left_f * right_f) ** 2, axis=-1)).max())
                * (1 + gamma(c_u * (r2 + right.data.shape[3]) + 8))) if product.size else 0.0
    q2 = tuple(u // t for u, t in zip(u_counts, t_counts))
    q1 = tuple(s // u for s, u in zip(s_counts, u_counts))
    if r2 == 1:
        data = product[:, :, 0]
    elif math.prod(q1) == 1:  # the column groups v2 are already in order
        data = np.ascontiguousarray(product.transpose(0, 1, 3, 2, 4)).reshape(zetas, rows, c_t, -1)
    else:
        d = len(grid)
        shaped = product.transpose(0, 1, 3, 2, 4).reshape((zetas, rows, c_t) + q2 + q1 + (right.source.channels,))
        order = [0, 1, 2] + [i for axis in range(d) for i in (3 + d + axis, 3 + axis)] + [3 + 2 * d]
        data = np.ascontiguousarray(shaped.transpose(order)).reshape(zetas, rows, c_t, -1)
    error = left.norm * right.error + left.error * (right.norm + right.error) + rounding
    norm = left.norm * right.norm + rounding
    return FiberBlock(data, right.source, left.target, grid, round_up(error * (1 + 4 * UNIT_ROUNDOFF)),
                      round_up(norm * (1 + 4 * UNIT_ROUNDOFF)))


def add(left: FiberBlock, right: FiberBlock) -> FiberBlock:
    """The sum of two blocks between the same spaces, with its rounding in ``error``."""
    if left.data is None and right.data is None:
        value = left.scale + right.scale
        return FiberBlock(None, left.source, left.target, left.fiber_grid,
                          round_up(left.error + right.error + UNIT_ROUNDOFF * abs(value)),
                          round_up(abs(value) * (1 + 2 * UNIT_ROUNDOFF)), value)
    fibers = (left.data if left.data is not None else right.data).shape[0]
    data = left.dense(fibers) + right.dense(fibers)
    rounding = UNIT_ROUNDOFF * float(_row_frobenius(data).max()) if data.size else 0.0
    return FiberBlock(data, left.source, left.target, left.fiber_grid,
                      round_up(left.error + right.error + rounding), round_up(left.norm + right.norm + rounding))


def _coarse(space: TorusSpace, fiber_grid) -> bool:
    """Whether one frequency of ``space`` gathers columns from several fibers (its grid is a
    proper divisor of the fiber grid, or the one-point grid: norms through Gram sums)."""
    return all(n == 1 for n in space.grid) or any(n % f for n, f in zip(space.grid, fiber_grid))


def _rows_upper(rows: np.ndarray) -> float:
    """Certified upper bound of the largest ‖rows[i]‖₂ of a stack of complex matrices.

    The smaller Gram matrix of each (:func:`lipnorm.certificates.block_grams`), certified
    at one threshold (:func:`lipnorm.certificates.certify_gram_stack`). Entries far from 1
    (where squares could overflow or underflow wholesale) go through
    :func:`lipnorm.certificates.certified_stack_bounds`, which scales them first.
    """
    largest = float(np.max(np.abs(rows))) if rows.size else 0.0
    if largest == 0.0:
        return 0.0
    if not 2.0**-400 < largest < 2.0**400:
        return float(certified_stack_bounds(rows).upper)
    gram, formation = block_grams(rows)
    certificate = certify_gram_stack(gram, formation, complex_dtype=True, inner=max(rows.shape[-2:]))
    return round_up(math.sqrt(certificate.upper_squared) * (1 + 4 * UNIT_ROUNDOFF))


class NormAccumulator:
    """Certified norms of blocks recorded chunk by chunk (module docstring).

    A block whose target has whole fibers (``N_f`` divides its grid) is certified on each
    chunk (:func:`lipnorm.certificates.certified_stack_bounds` over its row matrices), and
    its ``norm`` is set to that bound; the norm is the largest over chunks plus ``error``.
    A block into a coarser grid adds each fiber's Gram matrix ``B Bᴴ`` (and the conjugate
    for the paired fiber ``−ζ``) to that of its target frequency; :meth:`norm` certifies
    the largest eigenvalue of the sums (:func:`lipnorm.certificates.certify_gram_stack`),
    with the formation and summation rounding, and adds the columns' errors
    (``‖[E_1 … E_n]‖ ≤ (Σ ‖E_i‖²)^{1/2}``).

    Parameters
    ----------
    fibers : int
        The number of fibers (``∏ N_f``).
    """

    def __init__(self, fibers: int):
        self.fibers = fibers
        self.upper: dict = {}
        self.grams: dict = {}

    def record(self, key, block: FiberBlock, chunk: FiberChunk) -> None:
        """Add a block's contribution on ``chunk`` to the norm kept under ``key``.

        A block from the one-point grid is the same in every fiber (that grid's one
        frequency is in all of them): it is counted once, from the first fiber of the
        chunk that holds fiber 0.
        """
        if all(n == 1 for n in block.source.grid) and block.data is not None:
            if not np.all(chunk.zetas[0] == 0):
                return
            chunk = FiberChunk(chunk.fiber_grid, chunk.zetas[:1], np.zeros(1, dtype=bool))
            block = FiberBlock(block.data[:1], block.source, block.target, block.fiber_grid, block.error,
                               block.norm, block.scale)
        if block.data is None:  # s·I
            self.upper[key] = max(self.upper.get(key, 0.0), round_up(abs(block.scale) + block.error))
            return
        if not _coarse(block.target, block.fiber_grid):
            bound = _rows_upper(block.data.reshape((-1,) + block.data.shape[2:]))
            block.norm = min(block.norm, round_up(bound))
            self.upper[key] = max(self.upper.get(key, 0.0), round_up(bound + block.error))
            return
        target = np.asarray(block.target.grid)
        entry = self.grams.get(key)
        if entry is None:
            count = int(np.prod(target))
            c = block.target.channels
            entry = self.grams[key] = {"gram": np.zeros((count, c, c), dtype=np.complex128),
                                       "squares": np.zeros(count), "errors": 0.0, "inner": 0}
        matrices = block.data[:, 0]  # (Z, c_t, R c_s): one target frequency per fiber
        grams = matrices @ np.conj(np.swapaxes(matrices, -1, -2))
        squares = np.sum(np.abs(matrices) ** 2, axis=(-2, -1)) * (1 + gamma(matrices[0].size + 2))
        here = np.ravel_multi_index(tuple(np.mod(chunk.zetas, target).T), tuple(target))
        there = np.ravel_multi_index(tuple(np.mod(-chunk.zetas, target).T), tuple(target))
        for z in range(matrices.shape[0]):
            entry["gram"][here[z]] += grams[z]
            entry["squares"][here[z]] += squares[z]
            if chunk.paired[z]:
                entry["gram"][there[z]] += np.conj(grams[z])
                entry["squares"][there[z]] += squares[z]
        entry["errors"] += float(np.sum(chunk.weight())) * block.error**2
        entry["count"] = entry.get("count", 0) + int(np.sum(chunk.weight()))
        entry["inner"] = max(entry["inner"], matrices.shape[-1])

    def norm(self, key) -> float:
        """The certified upper bound of the norm recorded under ``key`` (0 if nothing was)."""
        if key in self.upper:
            return self.upper[key]
        entry = self.grams.get(key)
        if entry is None:
            return 0.0
        gram = entry["gram"]
        # forming each fiber's Gram (2γ(inner + 2) per Higham §3.5-3.6) and summing the fibers (γ(fibers))
        formation = (2 * gamma(entry["inner"] + 2) + gamma(self.fibers + 2)) * entry["squares"]
        if not np.any(gram):
            squared = float(np.max(formation))
        else:
            squared = certify_gram_stack(gram, formation * (1 + 1e-12), complex_dtype=True,
                                         inner=entry["inner"] * self.fibers).upper_squared
        return round_up(math.sqrt(squared) * (1 + 4 * UNIT_ROUNDOFF) + math.sqrt(entry["errors"]) * (1 + 1e-12))

    def row_norms(self, key, rows: np.ndarray) -> np.ndarray | None:
        """Certified ``‖rows[i] · P‖`` for a block recorded into the one-point grid, else None.

        ``‖r P‖² = r (P Pᴴ) rᵀ``: the accumulated Gram read at each row, with its formation
        error times ``‖r‖²`` and the evaluation's rounding, plus ``‖r‖`` times the columns' errors.
        """
        entry = self.grams.get(key)
        if entry is None or entry["gram"].shape[0] != 1:
            return None
        gram = entry["gram"][0]
        formation = float((2 * gamma(entry["inner"] + 2) + gamma(self.fibers + 2)) * entry["squares"][0])
        row_squares = np.sum(rows**2, axis=1) * (1 + gamma(rows.shape[1] + 2))
        values = np.real(np.einsum("ij,jk,ik->i", rows, gram, rows))
        rounding = 2 * gamma(2 * rows.shape[1] + 4) * np.einsum("ij,jk,ik->i", np.abs(rows), np.abs(gram), np.abs(rows))
        squared = np.maximum(values + rounding + formation * row_squares, 0.0)
        return np.array([round_up(math.sqrt(v) * (1 + 4 * UNIT_ROUNDOFF) + math.sqrt(r * entry["errors"]) * (1 + 1e-12))
                         for v, r in zip(squared, row_squares)])


#: Complex entries of chain blocks held at once (all chunks' fibers together): 512 MiB.
MAX_HELD_ENTRIES = 2**25


class FiberAlgebra:
    """The torus view's blocks as the chain method's block operations, chunk by chunk.

    Parameters
    ----------
    network : TorusNetwork
    max_entries : int
        Complex entries held at once, which sets how many fibers a chunk takes.
    scalings : list of ndarray, optional
        A positive factor per channel of each unit's space (:mod:`lipnorm.certify.scaling`):
        the norms recorded are those of ``Λ_t P Λ_s⁻¹`` (the output and the input unscaled).
    """

    def __init__(self, network: TorusNetwork, max_entries: int = MAX_HELD_ENTRIES, scalings=None):
        self.network = network
        self.accumulator = NormAccumulator(math.prod(network.fiber_grid))
        self.chunks = fiber_chunks(network, held_entries_per_fiber(network), max_entries)
        self.scalings = scalings
        self.cache: dict = {}
        self.seen: dict = {}
        self.aliases: dict = {}

    def parts(self):
        for chunk in self.chunks:
            self.cache, self.seen = {}, {}
            yield chunk

    def evaluate(self, block: TorusBlock, source: int, part: FiberChunk) -> FiberBlock:
        return evaluate(block, self.network.source_space(source), part, self.cache)

    def compose(self, left: FiberBlock, right: FiberBlock, scale: float) -> FiberBlock:
        return compose(left, right, scale)

    def add(self, left: FiberBlock, right: FiberBlock) -> FiberBlock:
        return add(left, right)

    def record(self, key, block: FiberBlock, part: FiberChunk) -> None:
        """Record a block's share of a norm; a block already recorded under another key on
        this chunk (a chain that is its direct block) is certified once."""
        first = self.seen.get(id(block))
        if first is not None and first[1] is block:
            self.aliases[key] = first[0]
            return
        self.seen[id(block)] = (key, block)
        if self.scalings is not None:
            _, target, source = key
            count = len(self.network.units)
            block = channel_scaled(block, self.scalings[target] if target < count else None,
                                   self.scalings[source - 1] if source > 0 else None, part)
        self.accumulator.record(key, block, part)

    def norm(self, key) -> float:
        return self.accumulator.norm(self.aliases.get(key, key))

    def row_norms(self, key, rows: np.ndarray) -> np.ndarray | None:
        return self.accumulator.row_norms(self.aliases.get(key, key), rows)


def channel_scaled(block: FiberBlock, left: np.ndarray | None, right: np.ndarray | None,
                   chunk: FiberChunk) -> FiberBlock:
    """``diag(left) · block · diag(right)⁻¹`` per channel (None: unscaled), rounding in ``error``.

    Each entry is multiplied by a factor and by a computed reciprocal: within ``4u`` of the
    exact scaled entry; the block's own error grows by ``max(left) / min(right)``.
    """
    if left is None and right is None:
        return block
    data = block.dense(chunk.zetas.shape[0])
    growth = 1.0
    if left is not None:
        data = data * left[None, None, :, None]
        growth *= float(np.max(left))
    if right is not None:
        columns = data.shape[3] // right.size
        data = (data.reshape(data.shape[:3] + (columns, right.size)) * (1.0 / right)).reshape(data.shape)
        growth /= float(np.min(right))
    rounding = 8 * UNIT_ROUNDOFF * float(_row_frobenius(data).max()) if data.size else 0.0
    return FiberBlock(data, block.source, block.target, block.fiber_grid,
                      round_up((block.error * growth + rounding) * (1 + 4 * UNIT_ROUNDOFF)),
                      round_up((block.norm * growth + rounding) * (1 + 4 * UNIT_ROUNDOFF)))


def held_entries_per_fiber(network: TorusNetwork) -> int:
    """A generous estimate of the complex entries held per fiber: four chains of the largest
    size a unit's input can have from any source, and the largest convolution block."""
    grid = network.fiber_grid
    sources = [network.input_space] + [unit.output_space for unit in network.units]
    targets = [unit.input_space for unit in network.units] + [network.output_space]
    largest_source = max(s.channels * math.prod(fiber_counts(s, grid)) for s in sources)
    largest_target = max(t.channels for t in targets)
    return 4 * largest_source * largest_target


@dataclass(frozen=True)
class _Shape:
    """A block's shape on one fiber: rows ``T``, ``c_t``, columns ``R · c_s`` (None: identity)."""

    rows: int
    height: int
    width: int | None


class FiberCost:
    """The floating-point work of the chain method on a torus network, by a pass over shapes.

    The same recursion as :class:`FiberAlgebra` (:func:`lipnorm.certify.loop.chain_norms`),
    counting real flops: a complex product is four real ones, a certified norm a Gram matrix
    (``side² · other``) and a Cholesky factorization (``side³ / 3``) per row matrix.

    Parameters
    ----------
    network : TorusNetwork
    """

    def __init__(self, network: TorusNetwork):
        self.network = network
        self.fibers = half_frequencies(network.fiber_grid).shape[0]
        self.flops = 0.0
        self.entries = 0  # complex entries of every recorded block, all fibers
        self.seen: set = set()

    def parts(self):
        return [None]

    def _shape(self, target: TorusSpace, source: TorusSpace) -> _Shape:
        grid = self.network.fiber_grid
        t, s = fiber_counts(target, grid), fiber_counts(source, grid)
        return _Shape(math.prod(t), target.channels, math.prod(s) // math.prod(t) * source.channels)

    def evaluate(self, block: TorusBlock, source: int, part) -> _Shape:
        space = self.network.source_space(source)
        target = next((p.convs[-1].target for p in block if p.convs), space)
        for path in block:
            for conv in path.convs:
                if id(conv) not in self.seen:
                    self.seen.add(id(conv))
                    shape = self._shape(conv.target, conv.source)
                    self.flops += 8.0 * self.fibers * shape.rows * shape.height * shape.width * math.prod(conv.kernel.shape[2:])
        return _Shape(0, 0, None) if target == space and all(not p.convs for p in block) else self._shape(target, space)

    def compose(self, left: _Shape, right: _Shape, scale: float) -> _Shape:
        if left.width is None or right.width is None:
            return right if left.width is None else left
        inner = right.height
        self.flops += 8.0 * self.fibers * left.rows * left.height * left.width * (right.width / 1.0)
        return _Shape(left.rows, left.height, left.width // max(inner, 1) * right.width)

    def add(self, left: _Shape, right: _Shape) -> _Shape:
        return left if left.width is not None else right

    def record(self, key, block: _Shape, part) -> None:
        if block.width is None or key in self.seen:
            return
        self.seen.add(key)
        self.entries += self.fibers * block.rows * block.height * block.width
        side, other = sorted((block.height, block.width))
        self.flops += self.fibers * block.rows * (4.0 * side * side * other + 8.0 * side**3 / 3)

    def norm(self, key) -> float:
        return 0.0

    def row_norms(self, key, rows):
        return None
