"""The Gram symbol of a strided circular convolution against its stacked blocks and the dense SVD."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lipnorm.conv import conv_operator
from lipnorm.conv.spectrum import alias_count, half_frequencies, stacked_blocks
from lipnorm.conv.symbol import evaluate_symbol, lag_coefficients, symbol_error_bound, symbol_kernel


@st.composite
def symbol_configs(draw):
    d = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2]))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(d))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(d))
    kernel_size = tuple(draw(st.integers(1, 4 if d < 3 else 3)) for _ in range(d))
    out_grid = tuple(draw(st.integers(1, 5 if d < 3 else 3)) for _ in range(d))
    shape = (groups, draw(st.integers(1, 4)), draw(st.integers(1, 4))) + kernel_size
    kernel = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal(shape)
    return kernel, stride, dilation, tuple(m * s for m, s in zip(out_grid, stride))


@settings(max_examples=80, deadline=None)
@given(symbol_configs())
def test_symbol_equals_the_gram_matrix_of_the_stacked_blocks(config):
    """Q(eta) = B(eta) B(eta)^H / S at every frequency, within the stated rounding bound."""
    kernel, stride, dilation, grid = config
    out_grid = tuple(n // s for n, s in zip(grid, stride))
    freqs = half_frequencies(out_grid)
    blocks = stacked_blocks(kernel, stride, dilation, grid, freqs)
    expected = blocks @ np.conj(np.swapaxes(blocks, -1, -2)) / alias_count(stride)
    lags, coefficients = lag_coefficients(kernel, stride, dilation)
    symbol = evaluate_symbol(lags, coefficients, out_grid, freqs)
    difference = np.max(np.linalg.norm(symbol - expected, ord=2, axis=(-2, -1)))
    scale = max(float(np.max(np.linalg.norm(expected, ord=2, axis=(-2, -1)))), 1e-300)
    assert difference <= 1e-12 * scale
    assert difference <= symbol_error_bound(kernel, lags.shape[0]) + 1e-13 * scale  # + the reference's rounding


def test_symbol_side_is_the_smaller_one():
    kernel = np.zeros((1, 8, 3, 3, 3))  # cout_g = 8, cin_g = 3
    assert symbol_kernel(kernel, (1, 1)).shape[1:3] == (3, 8)  # stride 1: channel-transposed
    assert symbol_kernel(kernel, (2, 2)) is kernel  # 8 <= 4 * 3: output side
    assert symbol_kernel(kernel[:, :, :1], (2, 2)) is None  # 8 > 4 * 1: the blocks are narrower


@pytest.mark.parametrize("scale", [1e-200, 1e-30, 1.0, 1e30, 1e200])
@pytest.mark.parametrize("padding", [1, "circular"])
def test_symbol_bounds_hold_at_extreme_scales(scale, padding):
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((6, 4, 3, 3))
    op = conv_operator(weight * scale, (4, 6, 6), stride=2, padding=padding)
    truth = np.linalg.norm(conv_operator(weight, (4, 6, 6), stride=2, padding=padding).to_dense(), 2) * scale
    interval = op.sigma_bounds(dense_max_columns=0)
    assert interval.method.endswith("symbol")
    assert interval.lower <= truth <= interval.upper
    assert truth * 0.9 <= interval.lower and interval.upper <= truth * 1.1


def test_wide_layer_is_certified_through_the_symbol_tightly():
    """A layer the size of a small network's: the symbol path against the dense SVD."""
    rng = np.random.default_rng(6)
    op = conv_operator(rng.standard_normal((24, 16, 3, 3)) / 12, (16, 10, 10), padding=1)
    truth = np.linalg.norm(op.to_dense(), 2)
    interval = op.sigma_bounds(dense_max_columns=0)
    assert interval.method == "conv-embedding-symbol"
    assert interval.lower <= truth <= interval.upper
    assert interval.upper <= truth * 1.05 and interval.lower >= truth * 0.99


@pytest.mark.parametrize("out_grid", [(1,), (2,), (5,), (9, 9), (4, 6), (3, 4, 2), (57, 57)])
def test_half_frequencies_hold_one_of_each_conjugate_pair(out_grid):
    grid = np.array(out_grid)
    kept = {tuple(f) for f in half_frequencies(out_grid)}
    negatives = {tuple(np.mod(-np.array(f), grid)) for f in kept}
    assert len(kept | negatives) == np.prod(grid)  # every frequency or its negative
    self_conjugate = sum(f in negatives for f in kept)
    assert len(kept) == (np.prod(grid) + self_conjugate) // 2  # and nothing twice
