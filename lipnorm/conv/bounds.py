r"""Exact and certified spectral norms of convolution operators.

Circular padding
    The operator is block-diagonal in Fourier space (:mod:`lipnorm.conv.spectrum`); its
    norm is the largest σ₁ over the stacked per-frequency blocks divided by
    :math:`\sqrt{S}`. The interval comes from certifying those blocks.

Zero padding: the circular embedding
    Let the zero-padded convolution read padded positions :math:`q = o s + j\delta \in
    [0, L)`, :math:`L = s(m-1) + e`, where input sample :math:`i` sits at :math:`q = i +
    p_{lo}`. Place the input on a torus :math:`\mathbb{Z}_N` at :math:`(i + p_{lo}) \bmod N`
    and run the circular convolution (same kernel, stride, dilation, zero offset) there.
    For :math:`o < m` it reads :math:`q \bmod N` with :math:`q \in [0, L)`. If
    :math:`q \equiv i + p_{lo} \pmod N` with :math:`i \in [0, n)`, then :math:`q - p_{lo}
    - i \in [-(p_{lo} + n) + 1, L - p_{lo} - 1]`, which holds no non-zero multiple of
    :math:`N` when :math:`N \ge \max(L - p_{lo},\ p_{lo} + n)`; so the circular
    convolution reads exactly the samples the zero-padded one reads, and zeros
    elsewhere. With also :math:`N \ge m s` (outputs distinct) and :math:`s \mid N`, the
    zero-padded matrix is a sub-block (rows :math:`o < m`, columns of the placed input)
    of the circular one, hence its norm is at most the circular norm. Since
    :math:`L \le n + p_{lo} + p_{hi}`, :math:`N = n + e - 1` rounded up to a multiple
    of :math:`s` is enough whenever the padding is at most :math:`e - 1`.

1x1 kernels
    Every output reads one input position, a different one per output, so the norm is
    that of the channel matrices (largest over groups), certified directly.

Zero padding: small layers
    When one group's operator has at most :data:`DENSE_MAX_COLUMNS` columns (and the
    whole one's Gram product costs at most :data:`DENSE_MAX_WORK`), the operator is built as a dense
    float64 matrix, one basis vector at a time; every entry is a single kernel tap
    times 1.0 plus exact zeros, so the matrix is exact, and the groups' diagonal blocks
    are certified as a stack (:func:`lipnorm.certificates.certified_stack_bounds`): an
    interval of relative width about 1e-12 instead of the embedding's gap.

Zero padding: lower bound
    :math:`\|A x\| / \|x\|` for a float64 vector :math:`x`, minus the rounding of the
    computation (:func:`certified_rayleigh_lower`). The vector is the top singular
    vector of the circular embedding restricted to the input window, refined by a few
    Golub-Kahan-Lanczos steps on the real operator.
"""

from __future__ import annotations

import math

import numpy as np

from lipnorm._parallel import parallel_map
from lipnorm.conv.geometry import ConvGeometry, ceil_to_multiple
from lipnorm.conv.spectrum import (
    _U,
    alias_count,
    block_error_bound,
    gamma,
    half_frequencies,
    stacked_blocks,
    to_numpy_float64,
)
from lipnorm.conv.operator import ConvOperator
from lipnorm.conv.symbol import evaluate_symbol, lag_coefficients, symbol_error_bound, symbol_kernel
from lipnorm.conv.taps import conv_forward
from lipnorm.krylov import lanczos, random_vector
from lipnorm.operators import DenseOperator
from lipnorm.certificates import (
    SigmaInterval,
    block_grams,
    certified_stack_bounds,
    certify_gram_chunks,
    certify_stack,
    gram_iteration_block_bounds,
)

__all__ = ["conv_sigma_bounds", "circular_sigma", "embedding_grid", "certified_rayleigh_lower"]

_METHODS = ("svd", "gram")
_CHUNK_ENTRIES = 16_000_000  # complex entries of blocks held at once per thread (256 MB)
_MIN_CHUNKS = 4  # chunks of frequencies certified in parallel, at the least
_KEPT_ENTRIES = 16_000_000  # entries of Gram matrices (symbol or blocks) held from ranking to certificates, at most
_SCREEN_STEPS = 3  # Gram steps of the cheap per-block bound that decides which blocks to bound (method gram)
#: Zero-padded layers whose per-group operator has at most this many columns are certified dense,
DENSE_MAX_COLUMNS = 2048
#: ... when rows x columns x min(rows, columns) of the whole dense matrix (the cost of its Gram
#: product) is at most this.
DENSE_MAX_WORK = 2**30


def embedding_grid(geom: ConvGeometry) -> tuple[int, ...]:
    """Torus size ``N`` per axis on which a zero-padded convolution is a sub-block.

    ``N = max(L - pad_lo, pad_lo + n, m * s)`` rounded up to a multiple of the stride;
    see the module docstring for the proof.
    """
    return tuple(
        ceil_to_multiple(max(length - lo, lo + n, m * s), s)
        for length, lo, n, m, s in zip(
            geom.read_length, geom.pad_lo, geom.input_size, geom.output_size, geom.stride
        )
    )


def _frequency_splits(count: int, entries_per_frequency: int) -> list[slice]:
    """Split ``count`` frequencies into at least :data:`_MIN_CHUNKS` chunks (for the worker
    threads, :mod:`lipnorm._parallel`) of at most :data:`_CHUNK_ENTRIES` entries each.

    The split does not depend on the number of threads, so neither do the bounds (where
    the chunk boundaries fall moves their last digits: each chunk's matrices are ranked
    from their own random start vectors).
    """
    chunks = min(count, max(-(-count * entries_per_frequency // _CHUNK_ENTRIES), _MIN_CHUNKS))
    edges = np.linspace(0, count, chunks + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _frequency_chunks(geom: ConvGeometry, grid, entries_per_frequency: int):
    """The output grid, one output frequency of each conjugate pair, and their chunks.

    Returns
    -------
    out_grid : tuple of int
    freqs : ndarray of int, shape (F, d)
    chunks : list of slice
        From :func:`_frequency_splits`, for ``entries_per_frequency`` entries held per frequency.
    """
    out_grid = tuple(n // s for n, s in zip(grid, geom.stride))
    freqs = half_frequencies(out_grid)
    return out_grid, freqs, _frequency_splits(freqs.shape[0], entries_per_frequency)


def _block_entries(kernel: np.ndarray, geom: ConvGeometry) -> int:
    """Entries of the stacked blocks of one frequency, all groups (:func:`stacked_blocks`)."""
    return kernel.shape[0] * kernel.shape[1] * kernel.shape[2] * alias_count(geom.stride)


def _circular_upper(kernel, geom: ConvGeometry, grid, method: str, gram_steps: int):
    """Certified upper bound on the norm of the circular convolution on ``grid``.

    ``"svd"``: from the Gram symbol (:mod:`lipnorm.conv.symbol`) where its blocks are the
    smaller ones, else from the stacked blocks' Gram matrices (:func:`_blocks_upper`); both
    by Cholesky certificates at one threshold over all frequencies
    (:func:`lipnorm.certificates.certify_gram_chunks`). ``"gram"``: the blocks by Gram
    iteration (:func:`_gram_screened_bounds`). Chunks of frequencies run in threads
    (:func:`lipnorm._parallel.parallel_map`).

    Returns
    -------
    upper : float
        For the kernel as given, the rounding of the blocks (or of the symbol) included.
    top : dict
        Per group, ``(ranking value, frequency)`` of its highest-ranked block (where the
        lower bound's start vector comes from); empty if the kernel is zero.
    label : str
        ``"symbol"`` or ``method``: what certified the bound.
    """
    if method == "svd":
        side = symbol_kernel(kernel, geom.stride)
        if side is not None:
            return (*_symbol_upper(side, geom, grid), "symbol")
        return (*_blocks_upper(kernel, geom, grid), "svd")
    _, freqs, chunks = _frequency_chunks(geom, grid, _block_entries(kernel, geom))

    def certify_chunk(chunk: slice):
        blocks = stacked_blocks(kernel, geom.stride, geom.dilation, grid, freqs[chunk])
        _, chunk_upper, ranking = _gram_screened_bounds(blocks.reshape((-1,) + blocks.shape[2:]), gram_steps)
        return chunk_upper, ranking.reshape(blocks.shape[:2])

    upper, top = 0.0, {}
    for chunk, (chunk_upper, ranking) in zip(chunks, parallel_map(certify_chunk, chunks)):
        upper = max(upper, chunk_upper)
        _update_top(top, ranking, freqs[chunk])
    return _blocks_to_operator(upper, kernel, geom), top, method


def _blocks_to_operator(blocks_upper: float, kernel, geom: ConvGeometry) -> float:
    """The circular operator's bound from one on the computed stacked blocks: their rounding
    added, divided by ``sqrt(S)``."""
    err = block_error_bound(kernel, geom.stride)
    return (blocks_upper + err) / math.sqrt(alias_count(geom.stride)) * (1 + 4 * _U)


def _blocks_upper(kernel, geom: ConvGeometry, grid):
    """:func:`_circular_upper` from the stacked blocks' Gram matrices, one Cholesky
    certificate threshold over all frequencies (:func:`lipnorm.certificates.certify_gram_chunks`).

    The kernel should be scaled so that its largest entry is about 1.
    """
    groups = kernel.shape[0]
    _, freqs, chunks = _frequency_chunks(geom, grid, _block_entries(kernel, geom))

    def gram_chunk(index: int):
        blocks = stacked_blocks(kernel, geom.stride, geom.dilation, grid, freqs[chunks[index]])
        return block_grams(blocks.reshape((-1,) + blocks.shape[2:]))

    rows, columns = kernel.shape[1], kernel.shape[2] * alias_count(geom.stride)
    grams_upper, top = _certify_frequency_grams(gram_chunk, chunks, freqs, groups, min(rows, columns),
                                                inner=max(rows, columns))
    return _blocks_to_operator(grams_upper, kernel, geom), top


def _symbol_upper(kernel, geom: ConvGeometry, grid):
    """:func:`_circular_upper` from the Gram symbol of ``kernel`` (see :mod:`lipnorm.conv.symbol`).

    The kernel should be scaled so that its largest entry is about 1 (products of entries
    must neither overflow nor underflow wholesale).
    """
    groups, cout_g, cin_g = kernel.shape[:3]
    taps = math.prod(kernel.shape[3:])
    lags, coefficients = lag_coefficients(kernel, geom.stride, geom.dilation)
    error = symbol_error_bound(kernel, lags.shape[0])
    out_grid, freqs, chunks = _frequency_chunks(geom, grid, groups * cout_g * cout_g)

    def symbol_chunk(index: int):
        symbol = evaluate_symbol(lags, coefficients, out_grid, freqs[chunks[index]])
        return symbol.reshape(-1, cout_g, cout_g), error

    return _certify_frequency_grams(symbol_chunk, chunks, freqs, groups, cout_g,
                                    inner=cin_g * taps * taps + 4 * lags.shape[0])


def _certify_frequency_grams(gram_chunk, chunks, freqs: np.ndarray, groups: int, side: int, inner: int):
    """Certified bound on ``sqrt(lambda_max)`` over the Gram matrices of every frequency and
    group (:func:`lipnorm.certificates.certify_gram_chunks`, one threshold for all).

    ``gram_chunk(i)`` gives the ``side x side`` matrices of the frequencies ``chunks[i]``
    group by group, with their formation error; ``inner`` is the inner length of the
    products that formed them. They are held between the certificate's two passes when all
    of them fit in :data:`_KEPT_ENTRIES`.

    Returns
    -------
    upper : float
    top : dict
        As for :func:`_circular_upper`.
    """
    certificate = certify_gram_chunks(
        gram_chunk, len(chunks), complex_dtype=True, inner=inner,
        keep=freqs.shape[0] * groups * side * side <= _KEPT_ENTRIES,
    )
    top = {}
    sizes = [groups * (chunk.stop - chunk.start) for chunk in chunks]
    for chunk, estimates in zip(chunks, np.split(certificate.estimates, np.cumsum(sizes)[:-1])):
        _update_top(top, estimates.reshape(groups, -1), freqs[chunk])
    return math.sqrt(certificate.upper_squared) * (1 + 4 * _U), top


def _power_of_two_scaled(kernel: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The kernel times a power of two ``scale`` that brings its largest entry into [1/2, 1).

    Products of entries then neither overflow nor (for the entries that matter) underflow.
    Scaling down can round entries into the subnormal range: each moves by at most the
    smallest subnormal, so the operator norm of the scaled kernel moves by at most
    ``slack = T sqrt(cout_g cin_g)`` smallest subnormals (each tap is a partial shift
    times a channel matrix).

    Returns
    -------
    scaled, scale, slack
        ``scale`` is 0 for a zero kernel.
    """
    largest = float(np.max(np.abs(kernel)))
    if largest == 0.0:
        return kernel, 0.0, 0.0
    scale = math.ldexp(1.0, -math.frexp(largest)[1])
    cout_g, cin_g = kernel.shape[1:3]
    slack = math.prod(kernel.shape[3:]) * math.sqrt(cout_g * cin_g) * 2.0**-1074 if scale < 1.0 else 0.0
    return kernel * scale, scale, slack


def _update_top(top: dict, ranking: np.ndarray, freqs: np.ndarray) -> None:
    """Keep, per group, the frequency of the highest ranking value seen so far."""
    for group, index in enumerate(np.argmax(ranking, axis=1)):
        value = ranking[group, index]
        if value > 0 and value > top.get(group, (0.0,))[0]:
            top[group] = (value, freqs[index])


def _top_blocks(kernel, geom: ConvGeometry, grid, top: dict) -> dict:
    """Per group, the stacked block of its top frequency: ``{group: (frequency, block)}``."""
    return {
        group: (freq, stacked_blocks(kernel[group : group + 1], geom.stride, geom.dilation, grid, freq[None])[0, 0])
        for group, (_, freq) in top.items()
    }


def _circular_lower(kernel, geom: ConvGeometry, blocks: dict) -> float:
    """Certified lower bound on a circular convolution's norm from its top blocks."""
    if not blocks:
        return 0.0
    interval, _ = certify_stack(np.stack([block for _, block in blocks.values()]))
    err = block_error_bound(kernel, geom.stride)
    return max(interval.lower - err, 0.0) / math.sqrt(alias_count(geom.stride)) * (1 - 4 * _U)


def _gram_screened_bounds(stack: np.ndarray, gram_steps: int):
    """Gram-iteration bounds on the largest σ₁ of a stack, certifying only what can matter.

    Every block first gets a cheap certified upper bound (:data:`_SCREEN_STEPS` Gram steps).
    Blocks are then bounded with ``gram_steps`` in decreasing order of that cheap bound until
    the next cheap bound is at most the best upper bound so far; the blocks left out cannot
    raise the maximum.

    Returns
    -------
    lower, upper : float
        Bounds on the stack's largest σ₁.
    screen : ndarray
        The cheap per-block bounds.
    """
    _, screen = gram_iteration_block_bounds(stack, steps=_SCREEN_STEPS)
    lower, upper = 0.0, 0.0
    order = np.argsort(-screen)
    batch = max(4, len(order) // 16)
    for begin in range(0, len(order), batch):
        chosen = order[begin : begin + batch]
        if screen[chosen[0]] <= upper:
            break
        block_lower, block_upper = gram_iteration_block_bounds(stack[chosen], steps=gram_steps)
        lower, upper = max(lower, float(block_lower.max())), max(upper, float(block_upper.max()))
    return lower, upper, screen


def _top_plane_wave(geom: ConvGeometry, grid, blocks: dict) -> np.ndarray:
    """A start vector for the real operator: the circular embedding's top singular vectors.

    For each group, takes the right singular vector of its top block, turns it into the
    real plane wave it stands for on the torus, crops it to the input window, tapers it
    with a sine window (so the zero padding does not cut it off abruptly: on ResNet-18's
    layers of 28 px and more this alone comes within 0.5 % of the norm, against 3-4 %
    untapered) and scales it to unit norm (Lanczos then picks the group with the largest
    norm). Only a start vector: nothing certified rests on it.
    """
    cin_g = geom.in_channels // geom.groups
    out_grid = np.array([n // s for n, s in zip(grid, geom.stride)])
    coords = np.meshgrid(*(np.arange(n) for n in grid), indexing="ij")
    window = tuple(slice(lo, lo + n) for lo, n in zip(geom.pad_lo, geom.input_size))
    start = np.zeros((geom.groups, cin_g) + tuple(geom.input_size))
    taper = math.prod(
        np.sin(np.pi * (np.arange(n) + 0.5) / n).reshape([-1 if b == a else 1 for b in range(len(grid))])
        for a, n in enumerate(geom.input_size)
    )
    for group, (freq, block) in blocks.items():
        vector = _top_right_singular_vector(block)
        wave = np.zeros((cin_g,) + tuple(grid), dtype=np.complex128)
        for a, alias in enumerate(np.ndindex(*geom.stride)):
            xi = freq + np.array(alias) * out_grid
            angle = sum(2 * np.pi * x * c / n for x, c, n in zip(xi, coords, grid))
            amplitude = vector[a * cin_g : (a + 1) * cin_g]
            wave += amplitude.reshape((cin_g,) + (1,) * len(grid)) * np.exp(1j * angle)[None]
        cropped = np.real(wave[(slice(None),) + window]) * taper
        start[group] = cropped / max(float(np.linalg.norm(cropped)), np.finfo(np.float64).tiny)
    return start.reshape((geom.in_channels,) + tuple(geom.input_size))


def _top_right_singular_vector(block: np.ndarray) -> np.ndarray:
    """The top right singular vector of one block, by Lanczos (a start vector, not a bound)."""
    operator = DenseOperator(block, np)
    return np.asarray(lanczos(operator, random_vector(operator, block.shape[1], seed=0), rtol=1e-3, max_iter=500).v)


def certified_rayleigh_lower(kernel: np.ndarray, geom: ConvGeometry, x: np.ndarray) -> float:
    r"""A certified lower bound :math:`\|Ax\| / \|x\|` on the norm of the convolution.

    ``A x`` is computed by :func:`lipnorm.conv.taps.conv_forward` in float64. Its only
    rounding is one matrix product with inner length :math:`K = c_{in,g} T`, so
    :math:`|\mathrm{fl}(Ax) - Ax| \le \gamma_K |A||x|` entrywise, and :math:`\||A|\|_2 \le
    \sum_t \|W_t\|_F` (each tap is a partial shift, norm :math:`\le 1`, times a channel
    matrix). The norms add :math:`\gamma_{len+2}` each.

    Parameters
    ----------
    kernel : ndarray, float64, shape (G, cout_g, cin_g, *k)
    geom : ConvGeometry
    x : ndarray, float64, shape (cin, *input_size)

    Returns
    -------
    float
    """
    y = conv_forward(np, kernel, x, geom)
    taps = math.prod(kernel.shape[3:])
    inner = kernel.shape[2] * taps
    abs_norm = float(np.sqrt((kernel.reshape(kernel.shape[:3] + (-1,)) ** 2).sum(axis=(0, 1, 2))).sum())
    x_norm = float(np.linalg.norm(x)) * (1 + gamma(x.size + 2))
    y_norm = float(np.linalg.norm(y)) * (1 - gamma(y.size + 2))
    err = gamma(inner) * abs_norm * (1 + 4 * _U) * x_norm
    if x_norm == 0.0:
        return 0.0
    return max(y_norm - err, 0.0) / x_norm * (1 - 4 * _U)


def _host_operator(kernel: np.ndarray, geom: ConvGeometry) -> ConvOperator:
    """The forward convolution with a host kernel, channels first, in the kernel's dtype."""
    return ConvOperator(kernel, geom, transposed=False, channels_last=False)


def _lanczos_refine(kernel, geom: ConvGeometry, x: np.ndarray, steps: int, rtol: float) -> np.ndarray:
    """Golub-Kahan-Lanczos on the operator from ``x``, in float32: its top Ritz vector (float64).

    Stops after ``steps`` steps or once the Ritz pair's residual is at most ``rtol`` times
    its value.

    On the dense top of a convolution's spectrum Lanczos gets much closer to the top
    singular vector than as many power steps. Only a start for the certified Rayleigh
    quotient, which is computed in float64: nothing certified rests on it, so single
    precision (half the memory traffic) is enough.
    """
    operator = _host_operator(kernel.astype(np.float32), geom)
    start = x.reshape(-1)
    norm = np.linalg.norm(start)
    if norm == 0.0:
        return x
    result = lanczos(operator, (start / norm).astype(np.float32), rtol=rtol, max_iter=steps)
    return np.reshape(np.asarray(result.v, dtype=np.float64), x.shape)


def circular_sigma(op) -> float:
    """Spectral norm of a circular convolution: max over frequencies of σ₁ of the blocks.

    Computed in float64 from an SVD per frequency (an estimate accurate to rounding;
    use ``sigma_bounds`` for a certified interval).

    Raises
    ------
    ValueError
        If ``op`` does not use circular padding.
    """
    geom = op.geometry
    if not geom.circular:
        raise ValueError(
            "exact_sigma needs padding='circular'; for zero padding use sigma_bounds() (certified interval)"
        )
    kernel = to_numpy_float64(op.kernel)
    _, freqs, chunks = _frequency_chunks(geom, geom.input_size, _block_entries(kernel, geom))

    def largest(chunk: slice) -> float:
        blocks = stacked_blocks(kernel, geom.stride, geom.dilation, geom.input_size, freqs[chunk])
        return float(np.linalg.svd(blocks, compute_uv=False)[..., 0].max())

    best = max(parallel_map(largest, chunks))
    return best / math.sqrt(alias_count(geom.stride))


def conv_sigma_bounds(op, *, method: str = "svd", gram_steps: int = 10, lanczos_steps: int = 10,
                      lanczos_rtol: float = 1e-2, dense_max_columns: int = DENSE_MAX_COLUMNS) -> SigmaInterval:
    """Certified interval for the spectral norm of a :class:`~lipnorm.conv.ConvOperator`.

    Parameters
    ----------
    op : ConvOperator
    method : {"svd", "gram"}
        How the per-frequency blocks are certified: ``"svd"`` by Cholesky certificates
        (:func:`lipnorm.certificates.certify_gram_chunks`) of the Gram symbol
        (:mod:`lipnorm.conv.symbol`) or, where the stacked blocks are narrower, of the
        blocks' Gram matrices; ``"gram"`` by Gram iteration on the blocks
        (:func:`lipnorm.certificates.gram_iteration_block_bounds`; slower).
    gram_steps : int
        Gram steps for ``method="gram"``.
    lanczos_steps, lanczos_rtol : int, float
        Golub-Kahan-Lanczos on the real operator refines the lower bound's vector (zero
        padding) for at most ``lanczos_steps`` steps, stopping early once its Ritz
        residual is at most ``lanczos_rtol`` times the estimate.
    dense_max_columns : int
        Zero-padded layers with at most this many input entries per group (and a Gram
        product of at most ``DENSE_MAX_WORK``) are certified as a dense matrix; 0 always
        uses the circular embedding.

    Returns
    -------
    SigmaInterval
        ``lower <= ||op||_2 <= upper``, float64 rounding included. Circular padding: both
        from the Fourier blocks. Zero padding: from the exact dense operator for small
        layers; otherwise upper from the circular embedding (:func:`embedding_grid`),
        lower from :func:`certified_rayleigh_lower`. Its ``method`` says which:
        ``conv-pointwise-svd`` (1x1 kernels), ``conv-dense-svd``,
        ``conv-{circular,embedding}-symbol`` (the Gram symbol),
        ``conv-{circular,embedding}-svd`` (the blocks' Gram matrices) or ``-gram``.

    Raises
    ------
    ValueError
        For an unknown method.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    geom = op.geometry
    kernel = to_numpy_float64(op.kernel)
    if all(k == 1 for k in geom.kernel_size):
        return _pointwise_interval(kernel, geom)
    if not geom.circular and _is_small(geom, dense_max_columns):
        interval = certified_stack_bounds(_dense_group_blocks(kernel, geom))
        return SigmaInterval(lower=interval.lower, upper=interval.upper, method="conv-dense-svd")
    return _fourier_interval(kernel, geom, method, gram_steps, lanczos_steps, lanczos_rtol)


def _fourier_interval(kernel, geom: ConvGeometry, method: str, gram_steps: int, lanczos_steps: int,
                      lanczos_rtol: float) -> SigmaInterval:
    """Circular padding directly, zero padding through the circular embedding.

    Everything is computed for the kernel scaled by a power of two
    (:func:`_power_of_two_scaled`) and scaled back, with the slack of the scaling.
    """
    where = "circular" if geom.circular else "embedding"
    scaled, scale, slack = _power_of_two_scaled(kernel)
    if scale == 0.0:
        return SigmaInterval(lower=0.0, upper=0.0, method=f"conv-{where} (zero kernel)")
    grid = tuple(geom.input_size) if geom.circular else embedding_grid(geom)
    upper, top, label = _circular_upper(scaled, geom, grid, method, gram_steps)
    blocks = _top_blocks(scaled, geom, grid, top)
    if geom.circular:
        lower = _circular_lower(scaled, geom, blocks)
    else:
        x = _lanczos_refine(scaled, geom, _top_plane_wave(geom, grid, blocks), lanczos_steps, lanczos_rtol)
        lower = certified_rayleigh_lower(scaled, geom, x)
    return SigmaInterval(
        lower=max(lower - slack, 0.0) / scale * (1 - 4 * _U),
        upper=(upper + slack) / scale * (1 + 4 * _U),
        method=f"conv-{where}-{label}",
    )


def _pointwise_interval(kernel: np.ndarray, geom: ConvGeometry) -> SigmaInterval:
    """A 1x1 convolution: the channel matrix of each group applied at the positions read.

    Output position ``o`` reads input ``o * s - pad_lo`` (modulo ``n`` when circular), a
    distinct position per output, so the operator is (up to a permutation) a block
    diagonal of copies of each group's ``cout_g x cin_g`` matrix and zero rows: its norm
    is the largest σ of the groups' matrices when some output reads an input, else 0.
    """
    reads_input = geom.circular or all(
        any(0 <= o * s - lo < n for o in range(m))
        for n, m, s, lo in zip(geom.input_size, geom.output_size, geom.stride, geom.pad_lo)
    )
    if not reads_input:
        return SigmaInterval(lower=0.0, upper=0.0, method="conv-pointwise (reads only padding)")
    interval = certified_stack_bounds(kernel.reshape(kernel.shape[:3]))
    return SigmaInterval(lower=interval.lower, upper=interval.upper, method="conv-pointwise-svd")


def _is_small(geom: ConvGeometry, max_columns: int) -> bool:
    """Whether the dense form of the layer is cheap enough to certify directly."""
    columns = geom.in_channels * math.prod(geom.input_size)
    rows = geom.out_channels * math.prod(geom.output_size)
    return columns // geom.groups <= max_columns and rows * columns * min(rows, columns) <= DENSE_MAX_WORK


def _dense_group_blocks(kernel: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """The exact float64 operator of each group, shape ``(G, cout_g * M, cin_g * N)``.

    Column ``j`` of the whole operator (:meth:`ConvOperator.to_dense`) is the convolution of
    the ``j``-th basis signal; the operator is block diagonal over groups (channels-first
    flattening), so the blocks are its diagonal ones.
    """
    groups, cout_g, cin_g = kernel.shape[:3]
    inputs, outputs = math.prod(geom.input_size), math.prod(geom.output_size)
    dense = np.asarray(_host_operator(kernel, geom).to_dense())
    rows_per_group, columns_per_group = cout_g * outputs, cin_g * inputs
    return np.stack([
        dense[g * rows_per_group:(g + 1) * rows_per_group, g * columns_per_group:(g + 1) * columns_per_group]
        for g in range(groups)
    ])
