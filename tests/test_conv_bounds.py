"""Exact and certified conv norms against the dense SVD, the embedding claim, framework cross-checks."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lipnorm.conv import conv_operator
from lipnorm.conv.bounds import DENSE_MAX_COLUMNS, certified_rayleigh_lower, embedding_grid

from tests.test_conv_operator import conv_configs


def _random_op(cfg, layout):
    rng = np.random.default_rng(cfg["seed"])
    d, k, g = cfg["d"], cfg["k"], cfg["groups"]
    shape = (cfg["cin"], cfg["cout"] // g) if cfg["transposed"] else (cfg["cout"], cfg["cin"] // g)
    weight = rng.standard_normal(shape + (k,) * d) * rng.uniform(0.1, 3.0)
    input_shape = (cfg["cin"],) + (cfg["size"],) * d
    if layout == "keras":  # same layer in keras layout: (*k, cin/g, cout) or (*k, cout_T, cin_T)
        weight = np.transpose(weight, tuple(range(2, d + 2)) + (1, 0))
        input_shape = input_shape[1:] + input_shape[:1]
    return conv_operator(
        weight, input_shape, stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"],
        groups=g, transposed=cfg["transposed"], output_padding=cfg["output_padding"], layout=layout,
    )


@settings(max_examples=60, deadline=None)
@given(conv_configs(), st.sampled_from(["torch", "keras"]), st.sampled_from(["svd", "gram"]),
       st.sampled_from([0, DENSE_MAX_COLUMNS]))
def test_certified_interval_contains_dense_norm(cfg, layout, method, dense_max_columns):
    """Both zero-padding paths: the circular embedding (0) and the dense one for small layers."""
    op = _random_op(cfg, layout)
    truth = np.linalg.norm(op.to_dense(), 2)
    lower, upper = op.sigma_bounds(method=method, dense_max_columns=dense_max_columns)
    assert lower <= truth <= upper, (lower, truth, upper)
    assert lower >= 0.5 * truth  # the lower bound is informative, not just 0


@settings(max_examples=30, deadline=None)
@given(conv_configs(paddings=(0, 1, 2, "same", "valid")))
def test_small_zero_padded_layers_are_certified_dense_and_tight(cfg):
    op = _random_op(cfg, "torch")
    truth = np.linalg.norm(op.to_dense(), 2)
    interval = op.sigma_bounds()
    expected = "conv-pointwise" if cfg["k"] == 1 else "conv-dense-svd"  # 1x1: the channel matrices
    assert interval.method.startswith(expected)
    assert interval.lower <= truth <= interval.upper
    assert interval.upper <= interval.lower * (1 + 1e-9)


@settings(max_examples=30, deadline=None)
@given(conv_configs(paddings=("circular",)))
def test_circular_exact_equals_dense_svd(cfg):
    op = _random_op(cfg, "torch")
    truth = np.linalg.norm(op.to_dense(), 2)
    np.testing.assert_allclose(op.exact_sigma(), truth, rtol=1e-10)
    lower, upper = op.sigma_bounds()
    np.testing.assert_allclose([lower, upper], [truth, truth], rtol=1e-9)


@settings(max_examples=25, deadline=None)
@given(conv_configs(paddings=(0, 1, 2, "same", "valid")).filter(lambda c: not c["transposed"]))
def test_zero_padded_conv_is_a_sub_block_of_the_circular_embedding(cfg):
    op = _random_op(cfg, "torch")
    geom = op.geometry
    grid = embedding_grid(geom)
    assert all(n % s == 0 for n, s in zip(grid, geom.stride))
    weight = np.reshape(op.kernel, (geom.out_channels, -1) + geom.kernel_size)
    big = conv_operator(weight, (geom.in_channels,) + grid, stride=geom.stride, dilation=geom.dilation,
                        groups=geom.groups, padding="circular")
    # the circular layer's own offset is a shift of its input; undo it so the embedding offset is zero
    dense_big = big.to_dense().reshape((geom.out_channels,) + big.geometry.output_size
                                       + (geom.in_channels,) + grid)
    for axis, lo in enumerate(big.geometry.pad_lo):
        dense_big = np.roll(dense_big, lo, axis=geom.ndim + 2 + axis)
    rows = (slice(None),) + tuple(slice(0, m) for m in geom.output_size)
    cols = (slice(None),) + tuple(slice(lo, lo + n) for lo, n in zip(geom.pad_lo, geom.input_size))
    block = dense_big[rows + cols].reshape(op.shape)
    np.testing.assert_allclose(block, op.to_dense(), rtol=0, atol=1e-12)


def test_certified_lower_is_below_exact_rayleigh_quotient():
    rng = np.random.default_rng(1)
    op = conv_operator(rng.standard_normal((8, 4, 3, 3)), (4, 9, 9), stride=2, padding=1)
    x = rng.standard_normal((4, 9, 9))
    exact = np.linalg.norm(op.to_dense() @ x.ravel()) / np.linalg.norm(x)
    lower = certified_rayleigh_lower(np.asarray(op.kernel), op.geometry, x)
    assert exact * (1 - 1e-12) <= lower * (1 + 1e-10) and lower <= exact


def test_unknown_method_and_exact_on_zero_padding_are_refused():
    op = conv_operator(np.ones((2, 2, 3)), (2, 6), padding=1)
    with pytest.raises(ValueError, match="method must be one of"):
        op.sigma_bounds(method="lanczos")
    with pytest.raises(ValueError, match="needs padding='circular'"):
        op.exact_sigma()


def test_torch_conv2d_module_norm_matches_power_iteration_through_torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False).double()
    op = conv_operator(layer.weight.detach(), (3, 10, 10), stride=2, padding=1)
    x = torch.randn(1, 3, 10, 10, dtype=torch.float64)
    for _ in range(500):
        x = x.requires_grad_(True)
        y = layer(x)
        (grad,) = torch.autograd.grad(y, x, grad_outputs=y)  # A^T A x through torch's own conv
        x = (grad / grad.norm()).detach()
    sigma_torch = float(layer(x).detach().norm() / x.norm())
    lower, upper = op.sigma_bounds()
    assert lower <= upper
    np.testing.assert_allclose(sigma_torch, np.linalg.norm(op.to_dense(), 2), rtol=1e-8)
    assert lower <= sigma_torch * (1 + 1e-12) and sigma_torch <= upper


def test_keras_conv2d_layer_matches_operator():
    keras = pytest.importorskip("keras")
    rng = np.random.default_rng(2)
    layer = keras.layers.Conv2D(4, 3, strides=2, padding="same", use_bias=False, dtype="float64")
    layer.build((None, 7, 7, 3))
    kernel = rng.standard_normal(tuple(layer.kernel.shape))
    layer.kernel.assign(kernel)
    x = rng.standard_normal((7, 7, 3))
    ref = np.asarray(keras.ops.convert_to_numpy(layer(x[None])))[0]
    op = conv_operator(kernel, (7, 7, 3), stride=2, padding="same", layout="keras")
    np.testing.assert_allclose(op.matvec(x.ravel()), ref.ravel(), atol=1e-12)


def test_zero_kernel_has_norm_zero():
    for padding in (1, "circular"):
        lower, upper = conv_operator(np.zeros((2, 2, 3, 3)), (2, 6, 6), padding=padding).sigma_bounds()
        assert lower == 0.0 and 0.0 <= upper < 1e-300


@pytest.mark.parametrize(("padding", "kernel_size"), [("same", 3), ("valid", 3), ("valid", 1)])
def test_keras_conv2d_transpose_layer_matches_operator(padding, kernel_size):
    keras = pytest.importorskip("keras")
    rng = np.random.default_rng(3)
    layer = keras.layers.Conv2DTranspose(2, kernel_size, strides=2, padding=padding, use_bias=False, dtype="float64")
    layer.build((None, 4, 5, 3))
    kernel = rng.standard_normal(tuple(layer.kernel.shape))  # (kh, kw, filters, in_channels)
    layer.kernel.assign(kernel)
    x = rng.standard_normal((4, 5, 3))
    ref = np.asarray(keras.ops.convert_to_numpy(layer(x[None])))[0]
    op = conv_operator(kernel, (4, 5, 3), stride=2, padding=padding, layout="keras", transposed=True)
    y = op.matvec(x.ravel())
    assert y.shape == (ref.size,)
    np.testing.assert_allclose(y, ref.ravel(), atol=1e-12)


@pytest.mark.parametrize("padding, stride, size, expected", [
    (0, 2, 7, "conv-pointwise-svd"), (1, 3, 5, "conv-pointwise-svd"),
    ("circular", 2, 6, "conv-pointwise-svd"),
    (2, 3, 1, "conv-pointwise (reads only padding)"),  # outputs read positions -2 and 1 of [0, 1)
])
def test_pointwise_convolutions_are_bounded_by_their_channel_matrices(padding, stride, size, expected):
    rng = np.random.default_rng(4)
    op = conv_operator(rng.standard_normal((6, 2, 1)), (4, size), stride=stride, padding=padding, groups=2)
    truth = np.linalg.norm(op.to_dense(), 2)
    interval = op.sigma_bounds()
    assert interval.method == expected
    assert interval.lower <= truth <= interval.upper <= truth * (1 + 1e-12) + 1e-300


@pytest.mark.parametrize("scale", [1e-200, 1.0, 1e200])
@pytest.mark.parametrize("padding", [1, "circular"])
def test_strided_layer_with_narrow_input_is_certified_through_its_blocks(scale, padding):
    """3 -> 16 channels at stride 2 (S * cin = 12 < 16, like ResNet's stem): the stacked
    blocks' Gram matrices, one certificate threshold over all frequencies."""
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((16, 3, 3, 3))
    op = conv_operator(weight * scale, (3, 10, 10), stride=2, padding=padding)
    truth = np.linalg.norm(conv_operator(weight, (3, 10, 10), stride=2, padding=padding).to_dense(), 2) * scale
    interval = op.sigma_bounds(dense_max_columns=0)
    assert interval.method == ("conv-circular-svd" if padding == "circular" else "conv-embedding-svd")
    assert interval.lower <= truth <= interval.upper
    if padding == "circular":  # exact up to rounding
        assert interval.upper <= truth * (1 + 1e-9) and interval.lower >= truth * (1 - 1e-9)
    else:
        assert interval.upper <= truth * 1.1 and interval.lower >= truth * 0.9


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("dense_max_columns", [0, DENSE_MAX_COLUMNS])
def test_low_precision_torch_kernels_are_certified(dtype, dense_max_columns):
    """A half-precision kernel is widened exactly to float64 for the certificate."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    kernel = torch.from_numpy(rng.standard_normal((4, 2, 3, 3))).to(getattr(torch, dtype))
    op = conv_operator(kernel, (2, 8, 8), padding=1)
    exact = conv_operator(kernel.to(torch.float64).numpy(), (2, 8, 8), padding=1)
    truth = np.linalg.norm(exact.to_dense(), 2)
    lower, upper = op.sigma_bounds(dense_max_columns=dense_max_columns)
    assert lower <= truth <= upper
