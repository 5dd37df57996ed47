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

Zero padding: lower bound
    :math:`\|A x\| / \|x\|` for a float64 vector :math:`x`, minus the rounding of the
    computation (:func:`certified_rayleigh_lower`). The vector is the top singular
    vector of the circular embedding restricted to the input window, refined by a few
    power-iteration steps on the real operator.
"""

from __future__ import annotations

import math

import numpy as np

from lipnorm.conv.geometry import ConvGeometry, ceil_to_multiple
from lipnorm.conv.gram import gram_iteration_bounds
from lipnorm.conv.spectrum import (
    _U,
    alias_count,
    block_error_bound,
    gamma,
    half_frequencies,
    stacked_blocks,
    to_numpy_float64,
)
from lipnorm.conv.taps import conv_adjoint, conv_forward
from lipnorm.sigma import SigmaInterval, certified_stack_bounds

__all__ = ["conv_sigma_bounds", "circular_sigma", "embedding_grid", "certified_rayleigh_lower"]

_METHODS = ("svd", "gram")
_CHUNK_ENTRIES = 4_000_000  # complex entries of blocks held at once (64 MB)


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


def _frequency_chunks(kernel: np.ndarray, geom: ConvGeometry, grid):
    out_grid = tuple(n // s for n, s in zip(grid, geom.stride))
    freqs = half_frequencies(out_grid)
    per_freq = kernel.shape[0] * kernel.shape[1] * kernel.shape[2] * alias_count(geom.stride)
    step = max(1, _CHUNK_ENTRIES // per_freq)
    for start in range(0, freqs.shape[0], step):
        chunk = freqs[start : start + step]
        yield chunk, stacked_blocks(kernel, geom.stride, geom.dilation, grid, chunk)


def _circular_interval(kernel, geom: ConvGeometry, grid, method: str, gram_steps: int):
    """Certified (lower, upper) of the circular convolution on ``grid``, and its top block."""
    lower, upper = 0.0, 0.0
    for _, blocks in _frequency_chunks(kernel, geom, grid):
        stack = blocks.reshape((-1,) + blocks.shape[2:])
        if method == "gram":
            lo, hi = gram_iteration_bounds(stack, gram_steps)
            lo, hi = float(lo.max()), float(hi.max())
        else:
            lo, hi = certified_stack_bounds(stack)
        lower, upper = max(lower, lo), max(upper, hi)
    err = block_error_bound(kernel, geom.stride)
    root_s = math.sqrt(alias_count(geom.stride))
    lower = max(lower - err, 0.0) / root_s * (1 - 4 * _U)
    upper = (upper + err) / root_s * (1 + 4 * _U)
    return lower, upper


def _top_plane_wave(kernel, geom: ConvGeometry, grid, iterations: int = 12) -> np.ndarray:
    """A start vector for the real operator: the circular embedding's top singular vector.

    Estimates σ₁ of every block with a few batched power steps, takes the right singular
    vector of the largest, turns it into the real plane wave it stands for on the torus
    and crops it to the input window. Only a start vector: nothing certified rests on it.
    """
    best, best_vec, best_freq = -1.0, None, None
    rng = np.random.default_rng(0)
    for freqs, blocks in _frequency_chunks(kernel, geom, grid):
        v = rng.standard_normal(blocks.shape[:2] + (blocks.shape[-1],)) + 0j
        for _ in range(iterations):
            v = np.einsum("gfpq,gfp->gfq", blocks.conj(), np.einsum("gfpq,gfq->gfp", blocks, v))
            v /= np.linalg.norm(v, axis=-1, keepdims=True) + 1e-300
        gains = np.linalg.norm(np.einsum("gfpq,gfq->gfp", blocks, v), axis=-1)
        g, f = np.unravel_index(int(np.argmax(gains)), gains.shape)
        if gains[g, f] > best:
            best, best_vec, best_freq, best_group = gains[g, f], v[g, f], freqs[f], g
    groups, _, cin_g = kernel.shape[:3]
    out_grid = np.array([n // s for n, s in zip(grid, geom.stride)])
    coords = np.meshgrid(*(np.arange(n) for n in grid), indexing="ij")
    wave = np.zeros((cin_g,) + tuple(grid), dtype=np.complex128)
    for a, alias in enumerate(np.ndindex(*geom.stride)):
        xi = best_freq + np.array(alias) * out_grid
        angle = sum(2 * np.pi * x * c / n for x, c, n in zip(xi, coords, grid))
        amplitude = best_vec[a * cin_g : (a + 1) * cin_g]
        wave += amplitude.reshape((cin_g,) + (1,) * len(grid)) * np.exp(1j * angle)[None]
    window = tuple(slice(lo, lo + n) for lo, n in zip(geom.pad_lo, geom.input_size))
    start = np.zeros((groups, cin_g) + tuple(geom.input_size))
    start[best_group] = np.real(wave[(slice(None),) + window])
    return start.reshape(groups * cin_g, *geom.input_size)


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


def _power_refine(kernel, geom: ConvGeometry, x: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        x = conv_adjoint(np, kernel, conv_forward(np, kernel, x, geom), geom)
        norm = np.linalg.norm(x)
        if norm == 0.0:
            break
        x = x / norm
    return x


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
    best = 0.0
    for _, blocks in _frequency_chunks(kernel, geom, geom.input_size):
        best = max(best, float(np.linalg.svd(blocks, compute_uv=False)[..., 0].max()))
    return best / math.sqrt(alias_count(geom.stride))


def conv_sigma_bounds(op, *, method: str = "svd", gram_steps: int = 10, power_steps: int = 8) -> SigmaInterval:
    """Certified interval for the spectral norm of a :class:`~lipnorm.conv.ConvOperator`.

    Parameters
    ----------
    op : ConvOperator
    method : {"svd", "gram"}
        How the per-frequency blocks are certified: ``"svd"`` through
        :func:`lipnorm.sigma.certified_stack_bounds`, ``"gram"`` by Gram iteration
        (:func:`lipnorm.conv.gram.gram_iteration_bounds`; cheaper on wide layers).
    gram_steps : int
        Gram steps for ``method="gram"``.
    power_steps : int
        Power steps on the real operator refining the lower bound (zero padding).

    Returns
    -------
    SigmaInterval
        ``lower <= ||op||_2 <= upper``, float64 rounding included. Circular padding: both
        from the Fourier blocks. Zero padding: upper from the circular embedding
        (:func:`embedding_grid`), lower from :func:`certified_rayleigh_lower`.

    Raises
    ------
    ValueError
        For an unknown method.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    geom = op.geometry
    kernel = to_numpy_float64(op.kernel)
    if geom.circular:
        lower, upper = _circular_interval(kernel, geom, geom.input_size, method, gram_steps)
        return SigmaInterval(lower=lower, upper=upper, method=f"conv-circular-{method}")
    grid = embedding_grid(geom)
    _, upper = _circular_interval(kernel, geom, grid, method, gram_steps)
    x = _power_refine(kernel, geom, _top_plane_wave(kernel, geom, grid), power_steps)
    lower = certified_rayleigh_lower(kernel, geom, x)
    return SigmaInterval(lower=lower, upper=upper, method=f"conv-embedding-{method}")
