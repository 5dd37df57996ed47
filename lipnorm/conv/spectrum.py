r"""Per-frequency blocks of a strided circular convolution, with their rounding error.

A convolution on the torus :math:`\mathbb{Z}_N` (per axis) with stride :math:`s`,

.. math:: y[o] = \sum_j W_j\, x[(o s + j \delta) \bmod N], \qquad o \in \mathbb{Z}_M,\ M = N / s,

is block-diagonalized by the unitary DFTs on :math:`\mathbb{Z}_N` (input) and
:math:`\mathbb{Z}_M` (output). With :math:`H(\xi) = \sum_j W_j e^{2\pi i\, \xi \cdot j\delta / N}`
(a ``cout x cin`` matrix per input frequency :math:`\xi`), output frequency :math:`\eta`
receives the :math:`S = \prod s` aliased input frequencies :math:`\xi = \eta + aM`:

.. math:: \hat y(\eta) = S^{-1/2}\, [H(\eta + a M)]_{a}\; [\hat x(\eta + a M)]_{a},

so the operator norm is :math:`\max_\eta \sigma_1([H(\eta + aM)]_a) / \sqrt{S}` (Sedghi,
Gupta & Long 2019 for :math:`s = 1`). A real kernel gives :math:`H(-\xi) = \overline{H(\xi)}`,
so the block of :math:`-\eta` is the conjugate of that of :math:`\eta` with its aliases
permuted, and one frequency of each pair is formed (:func:`half_frequencies`).

The blocks are computed by direct summation over the few kernel taps (a matrix product
with exactly reduced phases), which has a simple rigorous error bound; see
:func:`block_error_bound`.

References
----------
H. Sedghi, V. Gupta, P. M. Long, "The Singular Values of Convolutional Layers", ICLR 2019.
"""

from __future__ import annotations

import math
from itertools import product

import numpy as np

from lipnorm._xp import to_numpy

__all__ = [
    "alias_count",
    "block_error_bound",
    "half_frequencies",
    "kernel_symbol",
    "phases",
    "stacked_blocks",
    "tap_offsets",
    "to_numpy_float64",
]

_U = np.finfo(np.float64).eps / 2


def gamma(n: int) -> float:
    """Higham's :math:`\\gamma_n = n u / (1 - n u)` for float64."""
    return n * _U / (1 - n * _U)


def to_numpy_float64(array) -> np.ndarray:
    """Copy a (small) array of any supported library to a host NumPy float64 array.

    Goes through :func:`lipnorm._xp.to_numpy`, which widens half precision (float16,
    bfloat16) to float32 exactly; every float dtype then widens exactly to float64.
    """
    return np.asarray(to_numpy(array), dtype=np.float64)


def alias_count(stride) -> int:
    """Number :math:`S = \\prod s` of input frequencies folding onto one output frequency."""
    return math.prod(stride)


def half_frequencies(out_grid) -> np.ndarray:
    """One output frequency of each pair ``{eta, -eta}`` (mod the grid), shape (F, d), int64.

    ``eta`` is kept when it is not lexicographically above ``-eta mod M``, so the
    self-conjugate frequencies are kept once and the others once per pair: together with
    their negatives they cover the whole output grid, ``(prod M + s) / 2`` of them where
    ``s`` is the number of self-conjugate ones.
    """
    grid = np.asarray(out_grid, dtype=np.int64)
    freqs = np.array(list(product(*(range(m) for m in out_grid))), dtype=np.int64).reshape(-1, len(out_grid))
    negated = np.mod(-freqs, grid)
    # lexicographic comparison of each frequency with its negative, first differing axis decides
    differs = freqs != negated
    first = np.argmax(differs, axis=1)
    rows = np.arange(freqs.shape[0])
    keep = ~differs.any(axis=1) | (freqs[rows, first] < negated[rows, first])
    return freqs[keep]


def phases(offsets, freqs, grid) -> np.ndarray:
    """``exp(+2 pi i sum_a xi_a o_a / N_a)`` for integer offsets (T, d) and frequencies (F, d): (T, F).

    Each axis's product ``xi_a o_a`` is reduced modulo ``N_a`` exactly in integers before
    the exponential (see :func:`block_error_bound` for the resulting accuracy).
    """
    phase = np.ones((offsets.shape[0], freqs.shape[0]), dtype=np.complex128)
    for a, n in enumerate(grid):
        turns = np.mod(np.outer(offsets[:, a], freqs[:, a]), n)  # exact integer reduction
        phase = phase * np.exp(2j * np.pi * (np.arange(n) / n))[turns]  # one exp per residue
    return phase


def tap_offsets(kernel_size, dilation, origin=None) -> np.ndarray:
    """Offsets ``j * delta + origin`` of the kernel taps, in C order, shape (T, d), int64."""
    taps = np.array(list(product(*(range(k) for k in kernel_size))), dtype=np.int64)
    offsets = taps.reshape(-1, len(kernel_size)) * np.asarray(dilation, dtype=np.int64)
    return offsets if origin is None else offsets + np.asarray(origin, dtype=np.int64)


def kernel_symbol(kernel, dilation, grid, freqs, origin=None) -> np.ndarray:
    """The kernel's Fourier symbol ``H(xi) = sum_j W_j exp(2 pi i xi . (j delta + origin) / N)``.

    Parameters
    ----------
    kernel : ndarray, float64, shape (G, cout_g, cin_g, *kernel_size)
    dilation, grid : tuple of int, shape (d,)
        ``grid`` is the input torus size ``N``.
    freqs : ndarray of int, shape (F, d)
        Input frequencies ``xi``.
    origin : tuple of int, shape (d,), optional
        Where tap 0 reads, relative to ``o * stride`` (``-pad_lo`` for a zero-padded layer
        placed on the torus with its windows at the origin); 0 by default.

    Returns
    -------
    ndarray, complex128, shape (G, F, cout_g, cin_g)
        With the rounding of :func:`block_error_bound` (one alias).
    """
    groups, cout_g, cin_g = kernel.shape[:3]
    phase = phases(tap_offsets(kernel.shape[3:], dilation, origin), freqs, grid)  # (T, F)
    flat = kernel.reshape(groups * cout_g * cin_g, -1)
    symbol = (flat @ phase).reshape(groups, cout_g, cin_g, freqs.shape[0])
    return symbol.transpose(0, 3, 1, 2)


def stacked_blocks(kernel, stride, dilation, grid, freqs) -> np.ndarray:
    """Stacked aliased blocks of the circular convolution for some output frequencies.

    Parameters
    ----------
    kernel : ndarray, float64, shape (G, cout_g, cin_g, *kernel_size)
    stride, dilation, grid : tuple of int, shape (d,)
        ``grid`` is the input torus size ``N``, a multiple of ``stride`` per axis.
    freqs : ndarray of int, shape (F, d)
        Output frequencies ``eta`` in ``0 .. N/s - 1``.

    Returns
    -------
    ndarray, complex128, shape (G, F, cout_g, S * cin_g)
        Not divided by :math:`\\sqrt{S}`.
    """
    groups, cout_g, cin_g = kernel.shape[:3]
    out_grid = np.array([n // s for n, s in zip(grid, stride)], dtype=np.int64)
    aliases = np.array(list(product(*(range(s) for s in stride))), dtype=np.int64)  # (S, d)
    xi = (freqs[:, None, :] + aliases[None, :, :] * out_grid).reshape(-1, len(grid))  # (F*S, d)
    symbol = kernel_symbol(kernel, dilation, grid, xi)  # (G, F*S, cout_g, cin_g)
    blocks = symbol.reshape(groups, freqs.shape[0], aliases.shape[0], cout_g, cin_g)
    blocks = blocks.transpose(0, 1, 3, 2, 4)  # (G, F, cout_g, S, cin_g)
    return blocks.reshape(groups, freqs.shape[0], cout_g, aliases.shape[0] * cin_g)


def block_error_bound(kernel, stride) -> float:
    """Bound on the spectral norm of the rounding error of any block of :func:`stacked_blocks`.

    Each entry is a sum of ``T`` real kernel values times computed unit phases. A phase
    is a product of ``d <= 3`` values ``exp(2 pi i r / N)`` with an exactly reduced integer
    ``r``; each is within ``16 u`` of the true unit number (argument rounding plus the
    library's ``exp``), so a product is within ``64 u``. The complex dot product adds at
    most :math:`\\sqrt{2}\\gamma_{T+2}` (Higham, *Accuracy and Stability*, 2nd ed., §3.6)
    times :math:`\\sum_t |w_t|`. The error matrix of one stacked block is then bounded
    entrywise by ``eps * A`` repeated ``S`` times, ``A[o, c] = sum_t |W[o, c, t]|``, and its
    spectral norm by the Frobenius norm, ``eps * sqrt(S) * ||A||_F``, maximized over groups.

    Returns
    -------
    float
    """
    taps = math.prod(kernel.shape[3:])
    eps = 2.0 * gamma(taps + 2) + 128 * _U
    abs_sum = np.abs(kernel).reshape(kernel.shape[:3] + (-1,)).sum(axis=-1)  # (G, cout_g, cin_g)
    frob = np.sqrt((abs_sum**2).sum(axis=(1, 2))).max()
    return float(eps * math.sqrt(alias_count(stride)) * frob * (1 + 8 * _U * (taps + 4)))
