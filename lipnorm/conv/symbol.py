r"""The Gram symbol of a strided circular convolution: its squared singular values
without forming the per-frequency blocks.

With the stacked block :math:`B(\eta)` of output frequency :math:`\eta`
(:mod:`lipnorm.conv.spectrum`) and :math:`H(\xi) = \sum_j W_j e^{2\pi i\, \xi \cdot j\delta / N}`,

.. math::

    Q(\eta) = \frac{B(\eta) B(\eta)^H}{S}
            = \sum_{j, j'} W_j W_{j'}^T \, \frac{1}{S} \sum_a e^{2\pi i\, (\eta + aM) \cdot (j - j')\delta / N}.

Per axis, :math:`\sum_{a=0}^{s-1} e^{2\pi i\, a M r / N} = \sum_a e^{2\pi i\, a r / s}` is
:math:`s` when :math:`s \mid r` and 0 otherwise, so

.. math::

    Q(\eta) = \sum_e P_e\, e^{2\pi i\, \eta \cdot e / M}, \qquad
    P_e = \sum_{(j - j')\delta = s e} W_j W_{j'}^T,

a trigonometric polynomial in :math:`\eta` with real ``cout_g x cout_g`` coefficients, and
the squared operator norm is :math:`\max_\eta \lambda_{\max}(Q(\eta))`. The
:math:`P_e` take about :math:`T^2/2` products of channel matrices in all, however large the
grid; each :math:`Q(\eta)` is then a combination of at most :math:`(2k - 1)^d` of them,
instead of a product :math:`B B^H` per frequency. A real kernel has
:math:`P_{-e} = P_e^T`, so :math:`Q(-\eta) = \overline{Q(\eta)}` and one frequency of each
pair ``{eta, -eta}`` suffices (:func:`lipnorm.conv.spectrum.half_frequencies`).

The output side is the small one when ``cout_g <= S cin_g``. For stride 1 with
``cin_g < cout_g`` the kernel with transposed channel matrices is used instead (its
:math:`H(\xi)^T` has the singular values of :math:`H(\xi)`). For a stride with
``S cin_g < cout_g`` the stacked blocks themselves are narrow, and their own Gram
matrices are the cheaper route (:func:`symbol_kernel` returns None).

Rounding
    An entry of the computed :math:`Q(\eta)` is a sum of terms :math:`w w' \varphi` that
    pass through one dot product of length at most ``T cin_g`` (the taps of a lag side by
    side) and one combination of ``E`` lags with computed phases
    (each within ``64 u`` of the true one, :func:`lipnorm.conv.spectrum.block_error_bound`)
    by a complex product whose real coefficients have exact zero imaginary parts (so at
    most ``2E`` rounded terms). So the real and the imaginary part are each within
    :math:`\varepsilon\, (A A^T)_{ik}`, :math:`A = \sum_j |W_j|`,
    :math:`\varepsilon = \gamma_{T c_{in} + 2E + 2} + 64u`
    (Higham, *Accuracy and Stability*, 2nd ed., §3.1: the bound holds for any order of
    summation), and the spectral norm of the error is at most
    :math:`\sqrt{2}\, \varepsilon\, \|A\|_F^2`; see :func:`symbol_error_bound`.
"""

from __future__ import annotations

import math

import numpy as np

from lipnorm._parallel import parallel_map
from lipnorm.conv.spectrum import _U, alias_count, gamma, phases, tap_offsets

__all__ = ["evaluate_symbol", "lag_coefficients", "symbol_error_bound", "symbol_kernel"]

_SMALLEST_SUBNORMAL = 2.0**-1074


def symbol_kernel(kernel: np.ndarray, stride) -> np.ndarray | None:
    """The kernel whose Gram symbol has the smaller blocks, or None where the blocks are cheaper.

    Parameters
    ----------
    kernel : ndarray, float64, shape (G, cout_g, cin_g, *kernel_size)
    stride : tuple of int

    Returns
    -------
    ndarray or None
        ``kernel`` itself (``cout_g <= S cin_g``), its channel-transposed copy (stride 1,
        ``cin_g < cout_g``), or None (a stride with ``S cin_g < cout_g``).
    """
    cout_g, cin_g = kernel.shape[1:3]
    if cout_g <= alias_count(stride) * cin_g:
        return kernel
    if alias_count(stride) == 1:
        return np.swapaxes(kernel, 1, 2)
    return None


def lag_coefficients(kernel: np.ndarray, stride, dilation) -> tuple[np.ndarray, np.ndarray]:
    """The lags ``e`` and coefficients ``P_e`` of the Gram symbol (module docstring).

    Parameters
    ----------
    kernel : ndarray, float64, shape (G, cout_g, cin_g, *kernel_size)
    stride, dilation : tuple of int

    Returns
    -------
    lags : ndarray, int64, shape (E, d)
        The lags in units of the output grid.
    coefficients : ndarray, complex128, shape (G, E, cout_g, cout_g)
        Real values, stored complex for :func:`evaluate_symbol`'s complex product.
    """
    groups, cout_g, cin_g = kernel.shape[:3]
    offsets = tap_offsets(kernel.shape[3:], dilation)  # (T, d)
    # W_j^T of every tap as one contiguous block: (G, T, cin_g, cout_g)
    transposed_taps = np.ascontiguousarray(np.transpose(kernel.reshape(groups, cout_g, cin_g, -1), (0, 3, 2, 1)))
    differences = offsets[:, None, :] - offsets[None, :, :]  # (T, T, d)
    kept = np.all(differences % np.asarray(stride) == 0, axis=-1)
    lags, lag_index = np.unique((differences // np.asarray(stride))[kept], axis=0, return_inverse=True)
    lag_of = np.full(kept.shape, -1)
    lag_of[kept] = lag_index.reshape(-1)
    # Pairs j <= j' (C order) have lags of one sign or zero; P_e for each of those is one
    # product of the first taps side by side with the second ones, and the opposite lag is
    # its transpose: P_{-e} = P_e^T, the same computed sums.
    upper_pairs = np.argwhere(np.triu(kept))
    pair_lags = lag_of[upper_pairs[:, 0], upper_pairs[:, 1]]

    def lag_matrix(lag: int) -> np.ndarray:
        pairs = upper_pairs[pair_lags == lag]
        left = transposed_taps[:, pairs[:, 0]].reshape(groups, -1, cout_g)  # W_j^T stacked
        # the zero lag pairs every tap with itself: one array, whose product NumPy computes
        # as a symmetric rank-k update (half the work)
        right = left
        if np.any(pairs[:, 0] != pairs[:, 1]):
            right = transposed_taps[:, pairs[:, 1]].reshape(groups, -1, cout_g)
        # 2-D products: NumPy's stacked matmul is slower on a stack of one
        return np.stack([left[g].T @ right[g] for g in range(groups)])

    coefficients = np.zeros((groups, lags.shape[0], cout_g, cout_g), dtype=np.complex128)
    own_lags = np.unique(pair_lags)
    for lag, matrix in zip(own_lags, parallel_map(lag_matrix, own_lags)):
        coefficients[:, lag].real = matrix
        first, second = upper_pairs[pair_lags == lag][0]
        coefficients[:, lag_of[second, first]] = np.swapaxes(coefficients[:, lag], 1, 2)
    return lags, coefficients


def evaluate_symbol(lags: np.ndarray, coefficients: np.ndarray, out_grid, freqs: np.ndarray) -> np.ndarray:
    """The Gram symbol at some output frequencies.

    Parameters
    ----------
    lags, coefficients : from :func:`lag_coefficients`
    out_grid : tuple of int
        The output torus ``M = N / s`` per axis.
    freqs : ndarray of int, shape (F, d)

    Returns
    -------
    ndarray, complex128, shape (G, F, c, c)
        ``Q(eta)`` for every group and frequency; Hermitian up to rounding.
    """
    groups, count, c = coefficients.shape[:3]
    phase = np.ascontiguousarray(phases(lags, freqs, out_grid).T)  # (F, E)
    symbol = phase @ coefficients.reshape(groups, count, c * c)
    return symbol.reshape(groups, freqs.shape[0], c, c)


def symbol_error_bound(kernel: np.ndarray, lag_count: int) -> float:
    """Bound on the spectral norm of the rounding error of any block of :func:`evaluate_symbol`.

    See the module docstring; maximized over groups, with an absolute term for products
    that underflow (each at most the smallest subnormal).

    Parameters
    ----------
    kernel : ndarray, float64, shape (G, cout_g, cin_g, *kernel_size)
        The kernel given to :func:`lag_coefficients`.
    lag_count : int
        ``E``, the number of lags.

    Returns
    -------
    float
    """
    groups, cout_g, cin_g = kernel.shape[:3]
    taps = math.prod(kernel.shape[3:])
    eps = 2.0 * (gamma(taps * cin_g + 2 * lag_count + 2) + 64 * _U)
    abs_sum = np.abs(kernel).reshape(groups, cout_g, cin_g, taps).sum(axis=-1)
    frobenius_squared = float((abs_sum**2).sum(axis=(1, 2)).max()) * (1 + gamma(taps + cout_g * cin_g + 4))
    underflow = cout_g * (cin_g * taps * taps + 4 * lag_count) * _SMALLEST_SUBNORMAL
    return (math.sqrt(2.0) * eps * frobenius_squared + 2 * underflow) * (1 + 8 * _U)
