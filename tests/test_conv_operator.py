"""conv_operator: matvec against torch/keras convolutions, exact adjoint, bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lipnorm.conv import conv_operator

torch = pytest.importorskip("torch")
F = torch.nn.functional

FORWARD = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
TRANSPOSED = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@st.composite
def conv_configs(draw, paddings=(0, 1, 2, "same", "valid", "circular")):
    """Small random convolution configurations (forward or transposed, torch layout).

    ``paddings`` restricts the forward convolutions' padding; transposed ones are drawn
    only when it includes integer padding.
    """
    d = draw(st.integers(1, 3))
    k = draw(st.integers(1, 5 if d < 3 else 3))
    stride = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    groups = draw(st.sampled_from([1, 2]))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 2))
    transposed = any(isinstance(p, int) for p in paddings) and draw(st.booleans())
    extent = dilation * (k - 1) + 1
    if transposed:
        size = draw(st.integers(1, 4 if d < 3 else 2))
        padding = draw(st.integers(0, min(extent - 1, ((size - 1) * stride + extent - 1) // 2)))
        output_padding = draw(st.integers(0, stride - 1))
    else:
        padding = draw(st.sampled_from(list(paddings)))
        output_padding = 0
        low = max(extent - 2 * (padding if isinstance(padding, int) else 0), 1)
        size = draw(st.integers(low, low + (6 if d < 3 else 2)))
        if padding == "circular":
            size = stride * max(1, -(-max(size, extent) // stride))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(
        d=d, k=k, stride=stride, dilation=dilation, groups=groups, cin=cin, cout=cout,
        transposed=transposed, padding=padding, output_padding=output_padding, size=size, seed=seed,
    )


def _build(cfg, layout="torch"):
    rng = np.random.default_rng(cfg["seed"])
    d, k = cfg["d"], cfg["k"]
    if cfg["transposed"]:
        weight = rng.standard_normal((cfg["cin"], cfg["cout"] // cfg["groups"]) + (k,) * d)
    else:
        weight = rng.standard_normal((cfg["cout"], cfg["cin"] // cfg["groups"]) + (k,) * d)
    op = conv_operator(
        weight,
        (cfg["cin"],) + (cfg["size"],) * d,
        stride=cfg["stride"],
        padding=cfg["padding"],
        dilation=cfg["dilation"],
        groups=cfg["groups"],
        transposed=cfg["transposed"],
        output_padding=cfg["output_padding"],
    )
    return op, weight, rng


def torch_reference(cfg, weight, x):
    """The layer's output through torch's own convolution."""
    d = cfg["d"]
    xt = torch.from_numpy(x.reshape((1, cfg["cin"]) + (cfg["size"],) * d))
    wt = torch.from_numpy(weight)
    common = dict(stride=cfg["stride"], dilation=cfg["dilation"], groups=cfg["groups"])
    if cfg["transposed"]:
        out = TRANSPOSED[d](xt, wt, padding=cfg["padding"], output_padding=cfg["output_padding"], **common)
    elif cfg["padding"] == "circular":
        extent = cfg["dilation"] * (cfg["k"] - 1) + 1
        lo = (extent - 1) // 2
        out = FORWARD[d](F.pad(xt, (lo, extent - 1 - lo) * d, mode="circular"), wt, **common)
    elif cfg["padding"] == "same" and cfg["stride"] > 1:  # torch refuses 'same' with stride: pad like TF
        n, s = cfg["size"], cfg["stride"]
        extent = cfg["dilation"] * (cfg["k"] - 1) + 1
        total = max((-(-n // s) - 1) * s + extent - n, 0)
        out = FORWARD[d](F.pad(xt, (total // 2, total - total // 2) * d), wt, **common)
    else:
        out = FORWARD[d](xt, wt, padding=cfg["padding"], **common)
    return out.numpy().ravel()


@settings(max_examples=60, deadline=None)
@given(conv_configs())
def test_matvec_matches_torch_and_rmatvec_is_adjoint(cfg):
    op, weight, rng = _build(cfg)
    x = rng.standard_normal(op.shape[1])
    y = op.matvec(x)
    np.testing.assert_allclose(y, torch_reference(cfg, weight, x), rtol=1e-12, atol=1e-12)
    v = rng.standard_normal(op.shape[0])
    lhs, rhs = float(v @ y), float(op.rmatvec(v) @ x)
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, np.linalg.norm(v) * np.linalg.norm(y) + np.linalg.norm(x) ** 2)


@settings(max_examples=20, deadline=None)
@given(conv_configs())
def test_dense_matrix_rmatvec_is_transpose(cfg):
    op, _, rng = _build(cfg)
    dense = op.to_dense()
    assert dense.shape == op.shape
    dense_t = np.stack([op.rmatvec(e) for e in np.eye(op.shape[0])], axis=1)
    np.testing.assert_allclose(dense_t, dense.T, rtol=0, atol=1e-12)


def test_keras_layout_matches_torch_layout():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 2, 3, 3))  # torch (cout, cin/groups, kh, kw), groups=2
    x = rng.standard_normal((4, 7, 8))
    op_t = conv_operator(w, (4, 7, 8), stride=2, padding="same", groups=2)
    op_k = conv_operator(np.transpose(w, (2, 3, 1, 0)), (7, 8, 4), stride=2, padding="same", groups=2, layout="keras")
    y_t = op_t.matvec(x.ravel()).reshape(6, 4, 4)
    y_k = op_k.matvec(np.transpose(x, (1, 2, 0)).ravel()).reshape(4, 4, 6)
    np.testing.assert_allclose(np.transpose(y_k, (2, 0, 1)), y_t, atol=1e-12)


def test_keras_depthwise_matches_grouped_torch():
    rng = np.random.default_rng(4)
    k = rng.standard_normal((3, 3, 3, 2))  # (kh, kw, cin, depth_multiplier)
    x = rng.standard_normal((3, 6, 6))
    op_k = conv_operator(k, (6, 6, 3), padding="same", depthwise=True, layout="keras")
    torch_w = np.transpose(k, (2, 3, 0, 1)).reshape(6, 1, 3, 3)  # out channel c * dm + j
    ref = F.conv2d(torch.from_numpy(x[None]), torch.from_numpy(torch_w), padding="same", groups=3).numpy()[0]
    y = op_k.matvec(np.transpose(x, (1, 2, 0)).ravel()).reshape(6, 6, 6)
    np.testing.assert_allclose(np.transpose(y, (2, 0, 1)), ref, atol=1e-12)


def test_matvec_runs_on_torch_tensors():
    rng = np.random.default_rng(5)
    w = torch.from_numpy(rng.standard_normal((4, 2, 3, 3)))
    op = conv_operator(w, (2, 6, 6), stride=2, padding=1)
    x = torch.from_numpy(rng.standard_normal(op.shape[1]))
    y = op.matvec(x)
    assert isinstance(y, torch.Tensor)
    ref = F.conv2d(x.reshape(1, 2, 6, 6), w, stride=2, padding=1).ravel()
    np.testing.assert_allclose(y.numpy(), ref.numpy(), atol=1e-12)
    assert isinstance(op.rmatvec(y), torch.Tensor)


def test_matvec_runs_on_array_api_strict():
    xp = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(6)
    w = rng.standard_normal((4, 2, 3))
    op_xp = conv_operator(xp.asarray(w), (2, 10), stride=2, padding="circular", dilation=2)
    op_np = conv_operator(w, (2, 10), stride=2, padding="circular", dilation=2)
    x = rng.standard_normal(op_np.shape[1])
    y = op_xp.matvec(xp.asarray(x))
    np.testing.assert_allclose(np.from_dlpack(y), op_np.matvec(x), atol=1e-12)
    v = rng.standard_normal(op_np.shape[0])
    np.testing.assert_allclose(np.from_dlpack(op_xp.rmatvec(xp.asarray(v))), op_np.rmatvec(v), atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kernel_shape=(4, 2, 3, 3), input_shape=(3, 8, 8)), "expects 2 input channels"),
        (dict(kernel_shape=(4, 2, 3), input_shape=(2, 8, 8)), "needs a kernel with 4 axes"),
        (dict(kernel_shape=(4, 2, 3, 3), input_shape=(1, 2, 8, 8)), "needs a kernel with 5 axes"),
        (dict(kernel_shape=(4, 2, 3, 3), input_shape=(2, 8, 8), stride=0), "stride must be >= 1"),
        (dict(kernel_shape=(4, 2, 3, 3), input_shape=(2, 8, 8), padding=-1), "padding must be >= 0"),
        (dict(kernel_shape=(4, 2, 3, 3), input_shape=(2, 8, 8), padding="reflect"), "padding must be"),
        (dict(kernel_shape=(3, 1, 3, 3), input_shape=(2, 8, 8), groups=2), "must divide the 3 output"),
        (dict(kernel_shape=(4, 1, 3, 3), input_shape=(3, 8, 8), groups=2), "expects 2 input channels"),
        (dict(kernel_shape=(4, 2, 3, 3), input_shape=(2, 8, 8), layout="jax"), "layout must be"),
        (dict(kernel_shape=(4, 2, 3, 3), input_shape=(2, 9, 9), stride=2, padding="circular"), "multiple of"),
        (dict(kernel_shape=(4, 2, 5, 5), input_shape=(2, 3, 3)), "smaller than the dilated kernel"),
        (dict(kernel_shape=(2, 4, 3, 3), input_shape=(2, 4, 4), transposed=True, stride=2, output_padding=2),
         "must be smaller than stride"),
        (dict(kernel_shape=(4, 2, 3, 3), input_shape=(2, 8, 8), output_padding=1), "transposed convolutions only"),
        (dict(kernel_shape=(2, 4, 3), input_shape=(2, 4), transposed=True, padding="Circular"), "zero padding only"),
        (dict(kernel_shape=(4, 2, 0, 3), input_shape=(2, 8, 8)), "kernel of shape .* is empty"),
        (dict(kernel_shape=(0, 2, 3, 3), input_shape=(2, 8, 8)), "kernel of shape .* is empty"),
        (dict(kernel_shape=(4, 0, 3, 3), input_shape=(0, 8, 8)), "every size must be >= 1"),
        (dict(kernel_shape=(4, 2, 3, 3), input_shape=(2, 0, 8), padding=2), "every size must be >= 1"),
        (dict(kernel_shape=(4, 2, 3, 3), input_shape=(2, 8.5, 8)), "input_shape must hold integers"),
    ],
)
def test_bad_input_is_refused(kwargs, message):
    kwargs = dict(kwargs)
    kernel = np.ones(kwargs.pop("kernel_shape"))
    input_shape = kwargs.pop("input_shape")
    with pytest.raises(ValueError, match=message):
        conv_operator(kernel, input_shape, **kwargs)


def test_numpy_integers_are_accepted_as_python_integers():
    kernel = np.random.default_rng(3).standard_normal((4, 2, 3, 3))
    reference = conv_operator(kernel, (2, 9, 9), stride=2, padding=(1, 2), dilation=1, groups=1)
    op = conv_operator(kernel, (np.int64(2), np.int64(9), 9), stride=np.int64(2),
                       padding=(np.int32(1), np.int64(2)), dilation=np.int64(1), groups=np.int64(1))
    assert op.shape == reference.shape
    x = np.random.default_rng(4).standard_normal(op.shape[1])
    np.testing.assert_array_equal(op.matvec(x), reference.matvec(x))
    with pytest.raises(ValueError, match="stride must be an int"):
        conv_operator(kernel, (2, 9, 9), stride=np.float64(2.0))


@pytest.mark.parametrize("spelling", ["SAME", "Same", "VALID"])
def test_transposed_padding_strings_are_case_insensitive(spelling):
    """As for forward convolutions (and in Keras), the case of ``"same"``/``"valid"`` does not matter."""
    kernel = np.ones((2, 4, 2))
    reference = conv_operator(kernel, (2, 3), stride=3, padding=spelling.lower(), transposed=True)
    op = conv_operator(kernel, (2, 3), stride=3, padding=spelling, transposed=True)
    assert op.shape == reference.shape
    assert op.geometry == reference.geometry


def test_nan_and_integer_kernels_are_refused():
    kernel = np.ones((2, 2, 3, 3))
    kernel[0, 0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        conv_operator(kernel, (2, 5, 5))
    with pytest.raises(ValueError, match="real floating dtype"):
        conv_operator(np.ones((2, 2, 3, 3), dtype=np.int64), (2, 5, 5))


def test_wrong_vector_length_is_refused():
    op = conv_operator(np.ones((2, 2, 3)), (2, 5))
    with pytest.raises(ValueError, match="length 10"):
        op.matvec(np.ones(9))
