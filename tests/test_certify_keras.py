"""certify() on Keras models: soundness on random networks, exact linear maps, nesting,
refusals."""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras")
layers = keras.layers

from lipnorm.certify import NotCertifiableError, certify, lipschitz_lower_bound  # noqa: E402
from tests.helpers import FLOAT32_EVALUATION_SLACK  # noqa: E402

ACTIVATIONS = ["relu", "tanh", "sigmoid", "elu", "gelu", "silu", "softplus", "selu", "relu6",
               "hard_sigmoid", "mish", "linear"]


def max_secant(model, shape, pairs=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((pairs, *shape))
    scale = np.logspace(-2, 0, pairs).reshape(-1, *([1] * len(shape)))
    y = x + scale * rng.standard_normal((pairs, *shape))
    fx = np.asarray(model(x.astype("float32"), training=False), dtype=np.float64)
    fy = np.asarray(model(y.astype("float32"), training=False), dtype=np.float64)
    ratios = np.linalg.norm((fx - fy).reshape(pairs, -1), axis=1) / np.linalg.norm((x - y).reshape(pairs, -1), axis=1)
    return ratios.max()


@st.composite
def keras_networks(draw):
    keras.utils.set_random_seed(draw(st.integers(0, 2**16)))
    size, channels = draw(st.integers(5, 8)), draw(st.integers(1, 3))
    inputs = keras.Input((size, size, channels))
    x = inputs
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "depthwise", "separable", "bn", "act", "pool",
                                     "residual", "concat", "pad"]))
        padding = draw(st.sampled_from(["same", "valid"]))
        strides = draw(st.sampled_from([1, 2]))
        if kind in {"conv", "depthwise", "separable"} and (padding == "same" or size >= 3):
            if kind == "conv":
                x = layers.Conv2D(draw(st.integers(1, 4)), 3, strides=strides, padding=padding,
                                  activation=draw(st.sampled_from(ACTIVATIONS)))(x)
            elif kind == "depthwise":
                x = layers.DepthwiseConv2D(3, strides=strides, padding=padding,
                                           depth_multiplier=draw(st.integers(1, 2)))(x)
            else:
                x = layers.SeparableConv2D(draw(st.integers(1, 3)), 3, strides=strides, padding=padding)(x)
            size = -(-size // strides) if padding == "same" else (size - 3) // strides + 1
        elif kind == "bn":
            bn = layers.BatchNormalization()
            x = bn(x)
            bn.moving_variance.assign(np.random.default_rng(0).uniform(0.3, 3, bn.moving_variance.shape))
            bn.gamma.assign(np.random.default_rng(1).uniform(-2, 2, bn.gamma.shape))
        elif kind == "act":
            x = draw(st.sampled_from([layers.ReLU(max_value=6.0), layers.LeakyReLU(0.2),
                                      layers.ELU(1.5), layers.Activation("tanh"), layers.PReLU()]))(x)
        elif kind == "pool" and size >= 3:
            pool = draw(st.sampled_from([layers.MaxPooling2D, layers.AveragePooling2D]))
            x = pool(2, padding=padding)(x)
            size = -(-size // 2) if padding == "same" else size // 2
        elif kind == "residual":
            y = layers.Conv2D(x.shape[-1], 3, padding="same", activation="relu")(x)
            x = layers.Add()([x, y])
        elif kind == "concat":
            x = layers.Concatenate()([layers.Conv2D(2, 1)(x), layers.Activation("sigmoid")(x)])
        elif kind == "pad":
            x = layers.ZeroPadding2D(1)(x)
            size += 2
    x = draw(st.sampled_from([layers.Flatten(), layers.GlobalAveragePooling2D(), layers.GlobalMaxPooling2D()]))(x)
    outputs = layers.Dense(draw(st.integers(1, 4)))(layers.Dropout(0.3)(x))
    return keras.Model(inputs, outputs)


@given(keras_networks())
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_keras_networks_are_sound(model):
    shape = tuple(model.inputs[0].shape[1:])
    certificate = certify(model)
    assert np.isfinite(certificate.upper)
    secant = max_secant(model, shape)
    assert certificate.upper >= secant * (1 - FLOAT32_EVALUATION_SLACK), certificate.table()
    lower = lipschitz_lower_bound(model, input_shape=shape, starts=3, steps=6).value
    assert certificate.upper >= lower * (1 - FLOAT32_EVALUATION_SLACK), certificate.table()


@given(st.lists(st.integers(1, 6), min_size=2, max_size=4), st.integers(0, 2**16), st.booleans())
@settings(max_examples=10, deadline=None)
def test_linear_keras_network_equals_the_composed_map(widths, seed, with_bn):
    keras.utils.set_random_seed(seed)
    stack = [keras.Input((widths[0],))]
    for width in widths[1:]:
        stack.append(layers.Dense(width))
        if with_bn:
            stack.append(layers.BatchNormalization())
    model = keras.Sequential(stack)
    matrix = np.eye(widths[0])
    for layer in model.layers:
        if isinstance(layer, layers.Dense):
            matrix = np.asarray(layer.kernel, dtype=np.float64).T @ matrix
        else:
            variance = np.asarray(layer.moving_variance, dtype=np.float64)
            layer.moving_variance.assign(np.linspace(0.2, 3.0, variance.size))
            gamma = np.asarray(layer.gamma, dtype=np.float64)
            scale = gamma / np.sqrt(np.linspace(0.2, 3.0, variance.size).astype("float32").astype(np.float64) + layer.epsilon)
            matrix = scale[:, None] * matrix
    exact = np.linalg.svd(matrix, compute_uv=False)[0]
    certificate = certify(model)
    np.testing.assert_allclose(certificate.upper, exact, rtol=1e-6)
    assert len([r for r in certificate.layers if r.cumulative is not None]) == 1, certificate.table()


@pytest.mark.parametrize("mode", ["matrix", "operator"])
def test_lipnorm_spectral_normalization_is_bounded_by_its_actual_weights(mode):
    """An SN layer is bounded as inference runs it, with W / sigma, not by an assumed 1.

    The certificate must equal that of the same model without the wrappers and with each
    kernel set to W / sigma; in matrix mode the convolution's own bound is not 1.
    """
    from lipnorm.backends.keras import SpectralNormalization

    def network(wrap):
        keras.utils.set_random_seed(3)
        conv = layers.Conv2D(3, 3, padding="same", activation="tanh", name="conv")
        dense = layers.Dense(4, name="dense")
        return keras.Sequential([keras.Input((5, 5, 2)), wrap(conv, mode), layers.Flatten(),
                                 wrap(dense, "matrix")])

    normalized = network(lambda layer, m: SpectralNormalization(layer, mode=m, name=f"sn_{layer.name}"))
    plain = network(lambda layer, m: layer)
    for wrapper, layer in zip(normalized.layers[::2], plain.layers[::2]):
        layer.kernel.assign(np.asarray(wrapper.layer.kernel, dtype=np.float64)
                            / float(wrapper.sigmas()[0]))
    certificate = certify(normalized)
    np.testing.assert_allclose(certificate.upper, certify(plain).upper, rtol=1e-6)
    conv_row = certificate.layers[0]
    assert conv_row.name == "sn_conv/conv"
    if mode == "matrix":  # the reshaped kernel's sigma is not the convolution's norm
        assert conv_row.bound > 1.05, certificate.table()
    else:
        assert abs(conv_row.bound - 1) < 1e-2, certificate.table()


def test_a_layer_used_both_wrapped_and_unwrapped_keeps_its_raw_weights_unwrapped():
    from lipnorm.backends.keras import SpectralNormalization

    keras.utils.set_random_seed(5)
    inputs = keras.Input((6,))
    dense = layers.Dense(4, use_bias=False)
    dense.build((None, 6))
    dense.kernel.assign(10.0 * np.asarray(dense.kernel))  # sigma well above 1
    # depths: the wrapped use is translated first, the raw use after it
    normalized = layers.Identity()(SpectralNormalization(dense)(inputs))
    raw = dense(layers.Identity()(inputs))
    model = keras.Model(inputs, layers.Concatenate()([raw, normalized]))
    matrix = np.asarray(model(np.eye(6, dtype="float32"), training=False), dtype=np.float64).T
    exact = np.linalg.svd(matrix, compute_uv=False)[0]
    certificate = certify(model)
    assert certificate.upper >= exact * (1 - FLOAT32_EVALUATION_SLACK), certificate.table()


def test_nested_models_are_walked():
    inner = keras.Sequential([keras.Input((4,)), layers.Dense(3, activation="relu", name="hidden")],
                             name="inner")
    inputs = keras.Input((4,))
    outputs = layers.Dense(2, name="head")(inner(inputs))
    certificate = certify(keras.Model(inputs, outputs))
    names = [row.name for row in certificate.layers]
    assert names == ["inner/hidden", "inner/hidden.activation", "head"]


def test_keras_refusals_name_the_layer():
    inputs = keras.Input((3, 4))
    x = layers.MultiHeadAttention(2, 4, name="attn")(inputs, inputs)
    with pytest.raises(NotCertifiableError, match=r"'attn' \(MultiHeadAttention\).*rules="):
        certify(keras.Model(inputs, x))
    norm = keras.Sequential([keras.Input((4,)), layers.LayerNormalization(name="ln")])
    with pytest.raises(NotCertifiableError, match=r"'ln' \(LayerNormalization\).*'epsilon'"):
        certify(norm)
    assert certify(norm, rules={"ln": "epsilon"}).upper >= 1 / np.sqrt(norm.layers[0].epsilon)
    lam = keras.Sequential([keras.Input((4,)), layers.Lambda(lambda t: t * t, name="sq")])
    with pytest.raises(NotCertifiableError, match=r"'sq' \(Lambda\)"):
        certify(lam)
    assert certify(lam, rules={"Lambda": 2.0}).upper == 2.0


def functional(shape, build):
    inputs = keras.Input(shape)
    return keras.Model(inputs, build(inputs))


@pytest.mark.parametrize("build, shape, truth", [
    (lambda x: layers.Flatten()(layers.RepeatVector(4)(x)), (3,), 2.0),
    (lambda x: x + np.zeros((4, 5), "float32"), (1, 5), 2.0),
    (lambda x: layers.Add()([x, layers.Reshape((4, 5))(
        layers.Dense(20, kernel_initializer="zeros")(layers.Flatten()(x)))]),
     (1, 5), 2.0),
], ids=["repeat-vector", "add-constant", "add-layer"])
def test_copies_of_an_input_count_in_the_bound(build, shape, truth):
    assert certify(functional(shape, build)).upper >= truth


def test_a_normalization_over_several_axes_scales_each_entry():
    rng = np.random.default_rng(0)
    normalization = layers.Normalization(axis=(1, 2))
    normalization.adapt(rng.standard_normal((64, 2, 2, 4)) * np.array([[0.05, 3], [1, 2]]).reshape(1, 2, 2, 1))
    dense = layers.Dense(3)
    model = functional((2, 2, 4), lambda x: dense(normalization(x)))
    scale = 1 / np.sqrt(np.asarray(normalization.variance, dtype=np.float64))
    truth = np.max(scale) * np.linalg.norm(np.asarray(dense.kernel, dtype=np.float64), 2)
    assert certify(model).upper >= truth * (1 - 1e-6)


def test_a_rescaling_by_a_row_merges_with_the_next_dense_layer():
    dense = layers.Dense(2)
    model = functional((3,), lambda x: dense(layers.Rescaling(np.array([[1.0, 5.0, 0.1]]))(x)))
    truth = np.linalg.norm(np.asarray(dense.kernel, dtype=np.float64).T * np.array([1.0, 5.0, 0.1]), 2)
    np.testing.assert_allclose(certify(model).upper, truth, rtol=1e-6)


class _FixedMatmul(keras.layers.Layer):
    """x ↦ x M with a constant M; its config cannot rebuild it, so no float64 copy exists."""

    def __init__(self, matrix):
        super().__init__()
        self.matrix = self.add_weight(shape=matrix.shape, initializer="zeros", trainable=False)
        self.matrix.assign(matrix)

    def call(self, x):
        return keras.ops.matmul(x, self.matrix)


def test_lower_bound_of_a_float32_model_stays_below_its_norm():
    """Secants are measured between the float32 points the model saw, far enough apart that
    the rounding of f(y) - f(x) stays near 1e-5 (with float64 distances between unrounded
    points a linear map's secants exceeded its norm by 4e-4)."""
    matrix = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    inputs = keras.Input((16,))
    model = keras.Model(inputs, _FixedMatmul(matrix)(inputs))
    norm = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)[0]
    x = 10 * np.random.default_rng(1).standard_normal((8, 16))
    lower = lipschitz_lower_bound(model, x, seed=0).value
    assert norm * (1 - 1e-3) <= lower <= norm * (1 + 2e-5), lower / norm - 1
