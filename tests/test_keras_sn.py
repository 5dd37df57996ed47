"""Tests of lipnorm.backends.keras.SpectralNormalization on the active Keras backend.

The Keras backend is fixed per process by KERAS_BACKEND; every test id carries it
(``test_x[tensorflow]``). tests/test_keras_sn_backends.py runs this module under the
other backends in subprocesses, so ``pytest tests/`` covers tensorflow, jax and torch.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

keras = pytest.importorskip("keras")
from keras import ops  # noqa: E402

from lipnorm.backends._keras_kernel_views import kernel_matrix, kernel_views  # noqa: E402
from lipnorm.backends.keras import SpectralNormalization  # noqa: E402

from tests.keras_fixtures import BACKEND, keras_backend  # noqa: E402, F401  (autouse fixture)


@pytest.fixture
def float64():
    """float64 arithmetic for finite differences (JAX computes in float32 unless x64 is on)."""
    if BACKEND != "jax":
        yield
        return
    import jax

    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def true_sigma(matrix):
    return np.linalg.svd(np.asarray(matrix, dtype=np.float64), compute_uv=False)[0]


def loss_and_gradients(model, loss_fn, *inputs, training=True):
    """``loss_fn(model(*inputs))`` and its gradients w.r.t. ``model.trainable_variables``.

    Updates of non-trainable state (u, v) are kept on every backend.
    """
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(model, inputs, training)
        return loss, tape.gradient(loss, model.trainable_variables)
    if BACKEND == "torch":
        for variable in model.trainable_variables:
            variable.value.grad = None
        loss = loss_fn(model, inputs, training)
        loss.backward()
        return loss.detach(), [v.value.grad for v in model.trainable_variables]
    import jax

    def pure(trainable, non_trainable):
        with keras.StatelessScope(
            state_mapping=list(zip(model.trainable_variables, trainable))
            + list(zip(model.non_trainable_variables, non_trainable))
        ) as scope:
            loss = loss_fn(model, inputs, training)
        updated = [scope.get_current_value(v) for v in model.non_trainable_variables]
        return loss, updated

    (loss, updated), grads = jax.value_and_grad(pure, has_aux=True)(
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
    )
    for variable, value in zip(model.non_trainable_variables, updated):
        variable.assign(value)
    return loss, grads


def weighted_sum(weights):
    def loss_fn(model, inputs, training):
        return ops.sum(model(*inputs, training=training) * weights)

    return loss_fn


# --- layer families ------------------------------------------------------------------

FAMILIES = {
    "dense": (lambda: keras.layers.Dense(5, activation="tanh"), (3, 7)),
    "dense_3d_input": (lambda: keras.layers.Dense(4), (2, 3, 6)),
    "einsum_dense": (
        lambda: keras.layers.EinsumDense("abc,cd->abd", (3, 4), bias_axes="d"),
        (2, 3, 5),
    ),
    "conv1d": (lambda: keras.layers.Conv1D(4, 3, padding="same", activation="relu"), (2, 9, 3)),
    "conv1d_causal": (lambda: keras.layers.Conv1D(3, 3, padding="causal", dilation_rate=2), (2, 9, 2)),
    "conv2d": (lambda: keras.layers.Conv2D(4, 3, strides=2), (2, 9, 9, 3)),
    "conv3d": (lambda: keras.layers.Conv3D(2, 2), (1, 4, 4, 4, 2)),
    "conv2d_transpose": (lambda: keras.layers.Conv2DTranspose(5, 3, strides=2), (2, 5, 5, 3)),
    "conv1d_transpose": (lambda: keras.layers.Conv1DTranspose(2, 4, padding="same"), (2, 6, 3)),
    "depthwise_conv2d": (lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2), (2, 6, 6, 3)),
    "separable_conv2d": (lambda: keras.layers.SeparableConv2D(4, 3), (2, 6, 6, 3)),
    "embedding": (lambda: keras.layers.Embedding(11, 4), None),
}


def family_inputs(shape):
    rng = np.random.default_rng(1)
    if shape is None:
        return rng.integers(0, 11, size=(3, 5)).astype("int32")
    return rng.standard_normal(shape).astype("float32")


def reference_output(layer, inputs, sigmas, views):
    """The wrapped layer run with W / sigma assigned into a copy of its weights."""
    clone = layer.__class__.from_config(layer.get_config())
    clone.build(inputs.shape)
    clone.set_weights(layer.get_weights())
    for view, sigma in zip(views, sigmas):
        weight = getattr(clone, view.attribute)
        weight.assign(to_numpy(weight) / sigma)
    return to_numpy(clone(inputs))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_output_equals_layer_with_normalized_weight(family):
    make, shape = FAMILIES[family]
    inputs = family_inputs(shape)
    wrapper = SpectralNormalization(make(), power_iterations=2)
    wrapper(inputs)
    wrapper.layer.set_weights(
        [w + 0.1 * np.ones_like(w) for w in wrapper.layer.get_weights()]
    )  # nonzero bias
    trained = to_numpy(wrapper(inputs, training=True))
    sigmas = [float(to_numpy(s)) for s in wrapper.sigmas()]
    expected = reference_output(wrapper.layer, inputs, sigmas, wrapper._views)
    np.testing.assert_allclose(trained, expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(to_numpy(wrapper(inputs)), trained, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sigma_converges_to_largest_singular_value_of_matrix_view(family):
    make, shape = FAMILIES[family]
    wrapper = SpectralNormalization(make(), power_iterations=1)
    wrapper(family_inputs(shape))
    wrapper.warm_up(120)
    for view, sigma in zip(wrapper._views, wrapper.sigmas()):
        matrix = to_numpy(kernel_matrix(getattr(wrapper.layer, view.attribute), view))
        np.testing.assert_allclose(float(to_numpy(sigma)), true_sigma(matrix), rtol=2e-3)


def test_matrix_view_output_axes():
    """Conv*Transpose keeps the filters axis (-2); EinsumDense the axes in its output."""
    layers = {
        "transpose": keras.layers.Conv2DTranspose(5, 3),
        "einsum": keras.layers.EinsumDense("abc,cde->abde", (3, 4, 6)),
        "depthwise": keras.layers.DepthwiseConv2D(3, depth_multiplier=2),
    }
    layers["transpose"].build((None, 4, 4, 3))
    layers["einsum"].build((None, 3, 2))
    layers["depthwise"].build((None, 5, 5, 3))
    assert [v.output_axes for v in kernel_views(layers["transpose"])] == [(2,)]
    assert [v.output_axes for v in kernel_views(layers["einsum"])] == [(1, 2)]
    assert [v.output_axes for v in kernel_views(layers["depthwise"])] == [(2, 3)]


@pytest.mark.parametrize("family", ["dense", "conv2d", "embedding", "einsum_dense"])
@pytest.mark.parametrize("iterations", [1, 3])
def test_parity_with_keras_spectral_normalization(family, iterations):
    """Same u, same power iterations: same sigma, same normalized output, same new u."""
    make, shape = FAMILIES[family]
    inputs = family_inputs(shape)
    ours = SpectralNormalization(make(), power_iterations=iterations)
    theirs = keras.layers.SpectralNormalization(make(), power_iterations=iterations)
    ours(inputs)
    theirs(inputs)
    theirs.layer.set_weights(ours.layer.get_weights())
    u0 = np.random.default_rng(2).standard_normal(ours._vectors[0][0].shape).astype("float32")
    ours._vectors[0][0].assign(u0)
    theirs.vector_u.assign(u0[None, :])
    ours_out = to_numpy(ours(inputs, training=True))
    theirs(inputs, training=True)  # assigns W / sigma into its layer's kernel
    # Its own output is cast to the input dtype (zero for Embedding's int inputs).
    theirs_out = to_numpy(theirs.layer(inputs))
    np.testing.assert_allclose(ours_out, theirs_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        to_numpy(ours._vectors[0][0]), to_numpy(theirs.vector_u)[0], rtol=1e-5, atol=1e-6
    )


# --- gradient through sigma ------------------------------------------------------------

class Float64DenseStack(keras.layers.Layer):
    """Two normalized Dense layers: the first kernel's gradient passes through the second's
    input gradient."""

    def __init__(self):
        super().__init__(dtype="float64")
        self.first = SpectralNormalization(
            keras.layers.Dense(4, dtype="float64"), dtype="float64"
        )
        self.second = SpectralNormalization(keras.layers.Dense(3, dtype="float64"), dtype="float64")
        self.layers = [self.first, self.second]

    def build(self, input_shape):
        self.first.build(input_shape)
        self.second.build(self.first.compute_output_shape(input_shape))

    def call(self, inputs, training=False):
        return self.second(self.first(inputs, training=training), training=training)

    def compute_output_shape(self, input_shape):
        return self.second.compute_output_shape(self.first.compute_output_shape(input_shape))


def float64_wrapper(make, mode="matrix"):
    return lambda: SpectralNormalization(make(), mode=mode, dtype="float64")


GRADIENT_CASES = {
    "dense": (float64_wrapper(lambda: keras.layers.Dense(3, dtype="float64")), (4, 5)),
    "dense_3d_input": (float64_wrapper(lambda: keras.layers.Dense(3, dtype="float64")), (2, 3, 4)),
    "dense_stack": (Float64DenseStack, (4, 5)),
    "conv2d": (
        float64_wrapper(lambda: keras.layers.Conv2D(2, 3, padding="same", dtype="float64")),
        (2, 5, 5, 2),
    ),
    "conv2d_operator": (
        float64_wrapper(
            lambda: keras.layers.Conv2D(2, 3, strides=2, padding="same", dtype="float64"), "operator"
        ),
        (2, 6, 6, 2),
    ),
    "conv2d_transpose": (
        float64_wrapper(lambda: keras.layers.Conv2DTranspose(3, 2, strides=2, dtype="float64")),
        (2, 3, 3, 2),
    ),
    "depthwise_conv2d": (
        float64_wrapper(lambda: keras.layers.DepthwiseConv2D(2, depth_multiplier=2, dtype="float64")),
        (2, 4, 4, 2),
    ),
    "einsum_dense": (
        float64_wrapper(
            lambda: keras.layers.EinsumDense("ab,bc->ac", 3, bias_axes="c", dtype="float64")
        ),
        (4, 5),
    ),
    "embedding": (float64_wrapper(lambda: keras.layers.Embedding(6, 3, dtype="float64")), None),
}


@pytest.mark.parametrize("case", sorted(GRADIENT_CASES))
def test_gradient_through_sigma_matches_finite_differences(case, float64):
    make, shape = GRADIENT_CASES[case]
    rng = np.random.default_rng(3)
    inputs = rng.integers(0, 6, size=(3, 4)).astype("int32") if shape is None else rng.standard_normal(shape)
    model = make()
    model.build(inputs.shape)
    wrapper = model.layers[0] if isinstance(model, Float64DenseStack) else model
    weights = rng.standard_normal(tuple(model.compute_output_shape(inputs.shape)))
    loss_fn = weighted_sum(ops.convert_to_tensor(weights))
    _, grads = loss_and_gradients(model, loss_fn, inputs, training=False)
    kernel = getattr(wrapper.layer, wrapper._views[0].attribute)
    index = [id(v) for v in model.trainable_variables].index(id(kernel))
    analytic = to_numpy(grads[index])
    base = to_numpy(kernel).copy()
    numeric = np.zeros_like(base)
    # Keras's torch backend computes float64 matmul/conv in float32: use a coarser step.
    step, tolerance = (1e-2, 2e-3) if BACKEND == "torch" else (1e-6, 1e-6)
    for position in np.ndindex(base.shape):
        values = []
        for sign in (1, -1):
            moved = base.copy()
            moved[position] += sign * step
            kernel.assign(moved)
            values.append(float(to_numpy(loss_fn(model, (inputs,), False))))
        numeric[position] = (values[0] - values[1]) / (2 * step)
    kernel.assign(base)
    # Rounding in the loss is relative to its size, so the absolute tolerance scales with it.
    scale = max(1.0, float(np.abs(numeric).max()))
    np.testing.assert_allclose(analytic, numeric, rtol=tolerance, atol=tolerance * scale)


def test_inference_uses_stored_vectors_without_update():
    wrapper = SpectralNormalization(keras.layers.Dense(6))
    inputs = family_inputs((4, 8))
    trained = to_numpy(wrapper(inputs, training=True))
    u, v = (to_numpy(w).copy() for w in wrapper._vectors[0])
    for _ in range(3):
        np.testing.assert_allclose(to_numpy(wrapper(inputs)), trained, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(to_numpy(wrapper._vectors[0][0]), u)
    np.testing.assert_array_equal(to_numpy(wrapper._vectors[0][1]), v)
    wrapper(inputs, training=True)
    assert not np.array_equal(to_numpy(wrapper._vectors[0][1]), v)


def test_eval_before_training_is_normalized():
    """The warm-up at build puts sigma within 10% (from below) before any training step."""
    layer = keras.layers.Dense(32, kernel_initializer="random_normal")
    wrapper = SpectralNormalization(layer)
    wrapper(family_inputs((2, 48)))
    sigma = float(to_numpy(wrapper.sigmas()[0]))
    exact = true_sigma(to_numpy(layer.kernel))
    assert 0.9 * exact < sigma <= exact * (1 + 1e-6), (sigma, exact)


def test_zero_kernel_gives_no_nan_and_recovers():
    wrapper = SpectralNormalization(keras.layers.Dense(4, bias_initializer="ones"))
    model = keras.Sequential([keras.Input((5,)), wrapper])
    inputs = family_inputs((3, 5))
    wrapper.layer.kernel.assign(np.zeros((5, 4), "float32"))
    loss, grads = loss_and_gradients(model, weighted_sum(1.0), inputs)
    assert np.isfinite(to_numpy(loss))
    assert all(np.all(np.isfinite(to_numpy(g))) for g in grads)
    np.testing.assert_array_equal(to_numpy(model(inputs)), np.ones((3, 4), "float32"))
    u, v = (to_numpy(w) for w in wrapper._vectors[0])
    np.testing.assert_allclose([np.linalg.norm(u), np.linalg.norm(v)], [1.0, 1.0], rtol=1e-6)
    kernel = np.random.default_rng(4).standard_normal((5, 4)).astype("float32")
    wrapper.layer.kernel.assign(kernel)
    for _ in range(40):
        model(inputs, training=True)
    np.testing.assert_allclose(
        float(to_numpy(wrapper.sigmas()[0])), true_sigma(kernel), rtol=1e-3
    )


def test_kernel_is_never_overwritten():
    model = keras.Sequential(
        [keras.Input((6,)), SpectralNormalization(keras.layers.Dense(3))]
    )
    before = to_numpy(model.layers[0].layer.kernel).copy()
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="mse")
    model.fit(family_inputs((16, 6)), np.ones((16, 3), "float32"), epochs=2, verbose=0)
    np.testing.assert_array_equal(to_numpy(model.layers[0].layer.kernel), before)


def test_state_vectors_are_non_trainable_first_replica_weights():
    wrapper = SpectralNormalization(keras.layers.SeparableConv2D(4, 3))
    wrapper(family_inputs((1, 6, 6, 3)))
    state = [w for pair in wrapper._vectors for w in pair]
    assert len(state) == 4
    trainable_ids = {id(w) for w in wrapper.trainable_weights}
    for weight in state:
        assert id(weight) not in trainable_ids
        assert weight.aggregation == "only_first_replica"
        assert id(weight) in {id(w) for w in wrapper.non_trainable_weights}


# --- training ----------------------------------------------------------------------------

def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype("float32")[..., None]
    return x, data.target.astype("int32")


def test_digits_classifier_trains_with_fit_evaluate_predict():
    x, y = digits()
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            SpectralNormalization(keras.layers.Conv2D(16, 3, activation="relu"), mode="operator"),
            keras.layers.Flatten(),
            SpectralNormalization(keras.layers.Dense(64, activation="relu")),
            SpectralNormalization(keras.layers.Dense(10)),
            keras.layers.Lambda(lambda t: 10.0 * t),  # 10-Lipschitz logits
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(x[:1024], y[:1024], epochs=3, batch_size=64, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < 0.6 * losses[0], losses
    loss, accuracy = model.evaluate(x, y, verbose=0)
    assert np.isfinite(loss) and accuracy > 0.7, (loss, accuracy)
    predicted = model.predict(x[:32], verbose=0)
    np.testing.assert_allclose(predicted, to_numpy(model(x[:32])), rtol=1e-5, atol=1e-5)
    # One iteration per step tracks sigma from below while Adam moves W.
    kernel = to_numpy(model.layers[2].layer.kernel)
    sigma = float(to_numpy(model.layers[2].sigmas()[0]))
    assert 0.8 * true_sigma(kernel) < sigma < (1 + 1e-5) * true_sigma(kernel)


def test_custom_loop_with_two_discriminator_calls_per_step():
    """SN-GAN style D(real) - D(fake) in one step backpropagates through both sigmas."""
    discriminator = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            SpectralNormalization(keras.layers.Conv2D(8, 4, strides=2, padding="same")),
            keras.layers.LeakyReLU(0.2),
            keras.layers.Flatten(),
            SpectralNormalization(keras.layers.Dense(1)),
        ]
    )
    x, _ = digits()
    fake = np.random.default_rng(5).uniform(size=(32, 8, 8, 1)).astype("float32")
    optimizer = keras.optimizers.Adam(1e-3)

    def hinge(model, inputs, training):
        real, generated = inputs
        return ops.mean(ops.relu(1.0 - model(real, training=training))) + ops.mean(
            ops.relu(1.0 + model(generated, training=training))
        )

    losses = []
    for step in range(4):
        loss, grads = loss_and_gradients(discriminator, hinge, x[32 * step : 32 * step + 32], fake)
        assert all(np.all(np.isfinite(to_numpy(g))) for g in grads)
        optimizer.apply(grads, discriminator.trainable_variables)
        losses.append(float(to_numpy(loss)))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_iterates_in_float32_without_nan(policy):
    keras.config.set_dtype_policy(policy)
    x, y = digits()
    conv = SpectralNormalization(keras.layers.Conv2D(8, 3, activation="relu"))
    dense = SpectralNormalization(keras.layers.Dense(10))
    model = keras.Sequential([keras.Input((8, 8, 1)), conv, keras.layers.Flatten(), dense])
    for wrapper in (conv, dense):
        assert all(w.dtype == "float32" for pair in wrapper._vectors for w in pair)
    # A kernel large enough that x W overflows float16 before normalization.
    kernel = to_numpy(conv.layer.kernel)
    conv.layer.kernel.assign(kernel * 3e4)
    model.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    history = model.fit(x[:128], y[:128], epochs=1, batch_size=64, verbose=0)
    assert np.all(np.isfinite(history.history["loss"])), history.history["loss"]
    outputs = model(x[:8])
    assert keras.backend.standardize_dtype(outputs.dtype) == policy.split("_")[1]
    assert np.all(np.isfinite(to_numpy(ops.cast(outputs, "float32"))))
    kernel = to_numpy(conv.layer.kernel).astype(np.float64)
    np.testing.assert_allclose(
        float(to_numpy(conv.sigmas()[0])), true_sigma(kernel.reshape(-1, 8)), rtol=2e-2
    )


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize(
    "family", ["dense", "einsum_dense", "depthwise_conv2d", "separable_conv2d", "embedding"]
)
def test_mixed_precision_runs_every_family_in_the_compute_dtype(policy, family):
    """Called on its own and after a low-precision layer, in training and in inference."""
    keras.config.set_dtype_policy(policy)
    compute_dtype = policy.split("_")[1]
    make, shape = FAMILIES[family]
    inputs = family_inputs(shape)
    wrapper = SpectralNormalization(make())
    if shape is None:
        model = keras.Sequential([keras.Input(inputs.shape[1:], dtype="int32"), wrapper])
    else:
        model = keras.Sequential([keras.Input(shape[1:]), keras.layers.Identity(), wrapper])
    for call in (wrapper, model):
        for training in (True, False):
            outputs = call(inputs, training=training)
            assert keras.backend.standardize_dtype(outputs.dtype) == compute_dtype
    assert all(w.dtype == "float32" for pair in wrapper._vectors for w in pair)
    sigmas = [float(to_numpy(s)) for s in wrapper.sigmas()]
    expected = reference_output(wrapper.layer, inputs, sigmas, wrapper._views)
    np.testing.assert_allclose(
        to_numpy(ops.cast(outputs, "float32")), expected.astype("float32"), rtol=3e-2, atol=3e-2
    )


def test_save_and_load_round_trip(tmp_path):
    x, y = digits()
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            SpectralNormalization(
                keras.layers.Conv2D(4, 3, padding="same"), mode="operator", power_iterations=2
            ),
            keras.layers.Flatten(),
            SpectralNormalization(keras.layers.Dense(10), eps=1e-9),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x[:64], y[:64], epochs=1, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x[:16], verbose=0), model.predict(x[:16], verbose=0))
    first = loaded.layers[0]
    assert isinstance(first, SpectralNormalization)
    assert (first.mode, first.power_iterations) == ("operator", 2)
    assert loaded.layers[-1].eps == 1e-9
    for ours, theirs in zip(model.non_trainable_weights, loaded.non_trainable_weights):
        np.testing.assert_array_equal(to_numpy(ours), to_numpy(theirs))


# --- operator mode ----------------------------------------------------------------------

OPERATOR_CASES = {
    "conv2d_same_s1": (lambda f: keras.layers.Conv2D(3, 3, padding="same", data_format=f), (5, 5, 2)),
    "conv2d_same_s2_k4": (
        lambda f: keras.layers.Conv2D(3, 4, strides=2, padding="same", data_format=f),
        (6, 6, 2),
    ),
    "conv2d_same_s2_k3_odd": (
        lambda f: keras.layers.Conv2D(2, 3, strides=2, padding="same", data_format=f),
        (7, 7, 2),
    ),
    "conv2d_valid_s2": (
        lambda f: keras.layers.Conv2D(3, 3, strides=2, data_format=f),
        (8, 8, 2),
    ),
    "conv2d_dilated": (
        lambda f: keras.layers.Conv2D(2, 3, dilation_rate=2, padding="same", data_format=f),
        (6, 6, 2),
    ),
    "conv1d_valid_s3": (lambda f: keras.layers.Conv1D(3, 2, strides=3, data_format=f), (10, 2)),
    "conv3d_same": (lambda f: keras.layers.Conv3D(2, 2, padding="same", data_format=f), (3, 3, 3, 2)),
    "conv2d_transpose_same_s2": (
        lambda f: keras.layers.Conv2DTranspose(2, 4, strides=2, padding="same", data_format=f),
        (3, 3, 3),
    ),
    "conv1d_transpose_valid_s2": (
        lambda f: keras.layers.Conv1DTranspose(2, 3, strides=2, data_format=f),
        (4, 3),
    ),
}


def channels_first(shape):
    return (shape[-1],) + shape[:-1]


def dense_operator(wrapper, one_input_shape):
    """The layer's convolution (no bias) as a dense matrix, column by column."""
    linear_map = wrapper._maps[0]
    kernel = wrapper.layer.kernel
    size = int(np.prod(one_input_shape))
    basis = np.eye(size, dtype="float32").reshape((size,) + one_input_shape)
    columns = to_numpy(linear_map.forward(ops.convert_to_tensor(basis), kernel))
    return columns.reshape(size, -1).T


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("case", sorted(OPERATOR_CASES))
def test_operator_mode_adjoint_and_sigma(case, data_format):
    if data_format == "channels_first" and BACKEND == "tensorflow":
        pytest.skip("TensorFlow's CPU convolutions do not support channels_first")
    make, shape = OPERATOR_CASES[case]
    if data_format == "channels_first":
        shape = channels_first(shape)
    wrapper = SpectralNormalization(make(data_format), mode="operator")
    inputs = np.random.default_rng(6).standard_normal((2,) + shape).astype("float32")
    wrapper(inputs)
    linear_map, kernel = wrapper._maps[0], wrapper.layer.kernel
    u, v = (w.value for w in wrapper._vectors[0])
    rng = np.random.default_rng(7)
    u = ops.convert_to_tensor(rng.standard_normal(u.shape).astype("float32"))
    v = ops.convert_to_tensor(rng.standard_normal(v.shape).astype("float32"))
    lhs = float(to_numpy(ops.sum(linear_map.forward(v, kernel) * u)))
    rhs = float(to_numpy(ops.sum(v * linear_map.adjoint(u, kernel))))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-4, atol=1e-4)
    if data_format == "channels_first":
        return  # the same operator as channels_last once the adjoint is right
    wrapper.warm_up(150)
    operator = dense_operator(wrapper, shape)
    np.testing.assert_allclose(
        float(to_numpy(wrapper.sigmas()[0])), true_sigma(operator), rtol=2e-3
    )
    # Normalized: the layer's linear part is 1-Lipschitz, up to the power iteration's error.
    expected = reference_output(wrapper.layer, inputs, [float(to_numpy(wrapper.sigmas()[0]))], wrapper._views)
    np.testing.assert_allclose(to_numpy(wrapper(inputs)), expected, rtol=1e-4, atol=1e-5)


def test_operator_norm_differs_from_matrix_view():
    """On a 3x3 conv the operator norm exceeds the reshaped-kernel norm (pytorch#99149)."""
    layer = keras.layers.Conv2D(4, 3, padding="same")
    wrapper = SpectralNormalization(layer, mode="operator")
    wrapper(np.zeros((1, 8, 8, 4), "float32"))
    wrapper.warm_up(300)
    matrix = to_numpy(layer.kernel).reshape(-1, 4)
    assert float(to_numpy(wrapper.sigmas()[0])) > 1.2 * true_sigma(matrix)


# --- bad input -------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"power_iterations": 0}, "power_iterations` must be an integer >= 1"),
        ({"power_iterations": 1.5}, "power_iterations` must be an integer >= 1"),
        ({"power_iterations": True}, "power_iterations` must be an integer >= 1"),
        ({"mode": "spectral"}, "`mode` must be 'matrix' or 'operator'"),
        ({"mode": "operator"}, "mode='operator' applies to Conv"),
        ({"eps": 0.0}, "`eps` must be a positive float"),
        ({"autocast": True}, "do not pass autocast=True"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpectralNormalization(keras.layers.Dense(3), **kwargs)


def test_layer_without_kernel_raises():
    with pytest.raises(ValueError, match="needs a layer with a `kernel` or `embeddings`"):
        SpectralNormalization(keras.layers.Dropout(0.5))(np.ones((2, 3), "float32"))
    built = keras.layers.LayerNormalization()
    built.build((None, 3))
    with pytest.raises(ValueError, match="LayerNormalization has neither"):
        SpectralNormalization(built)


def test_operator_mode_needs_known_input_size():
    wrapper = SpectralNormalization(keras.layers.Conv2D(2, 3), mode="operator")
    with pytest.raises(ValueError, match="operator mode needs the full input shape"):
        keras.Sequential([keras.Input((None, None, 3)), wrapper])


def test_operator_mode_refuses_causal_padding():
    wrapper = SpectralNormalization(keras.layers.Conv1D(2, 3, padding="causal"), mode="operator")
    with pytest.raises(ValueError, match="padding='causal'.*use mode='matrix'"):
        wrapper(np.zeros((1, 6, 2), "float32"))


def test_operator_mode_refuses_grouped_convolution():
    wrapper = SpectralNormalization(keras.layers.Conv2D(4, 3, groups=2), mode="operator")
    with pytest.raises(ValueError, match="does not support grouped convolutions"):
        wrapper(np.zeros((1, 6, 6, 4), "float32"))


# --- distribution ----------------------------------------------------------------------

MIRRORED_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from lipnorm.backends.keras import SpectralNormalization
    keras.utils.set_random_seed(0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((8,)),
            SpectralNormalization(keras.layers.Dense(16, activation="relu")),
            SpectralNormalization(keras.layers.Dense(1)),
        ])
        model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8)).astype("float32")
    y = rng.standard_normal((64, 1)).astype("float32")
    before = np.array(model.layers[0]._vectors[0][0].value)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.all(np.isfinite(history.history["loss"])), history.history
    for layer in model.layers:
        for u, v in layer._vectors:
            for w in (u, v):
                replicas = [np.array(t) for t in strategy.experimental_local_results(w.value)]
                assert len(replicas) == 2, replicas
                np.testing.assert_array_equal(replicas[0], replicas[1])
                np.testing.assert_allclose(np.linalg.norm(replicas[0]), 1.0, rtol=1e-5)
    assert not np.array_equal(before, np.array(model.layers[0]._vectors[0][0].value))
    # Power iteration approaches sigma from below, and converges once the weights stop moving.
    layer = model.layers[0]
    exact = np.linalg.svd(np.array(layer.layer.kernel.value, dtype=np.float64), compute_uv=False)[0]
    assert 0.0 < float(layer.sigmas()[0]) <= exact * (1 + 1e-5)
    layer.warm_up(500)
    np.testing.assert_allclose(float(layer.sigmas()[0]), exact, rtol=1e-4)
    print("MIRRORED_OK")
    """
)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute needs the TensorFlow backend")
def test_mirrored_strategy_trains_and_keeps_u_consistent():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, KERAS_BACKEND="tensorflow", PYTHONPATH=root, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT], env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "MIRRORED_OK" in result.stdout, result.stderr[-4000:]


# --- masks and dtype policies --------------------------------------------------------------


class MaskProbe(keras.layers.Layer):
    """Identity that records the mask Keras hands it (``None`` when there is none)."""

    def __init__(self):
        super().__init__()
        self.supports_masking = True
        self.seen_mask = "not called"

    def call(self, inputs, mask=None):
        self.seen_mask = mask
        return inputs


@pytest.mark.parametrize(
    "make, supports_masking",
    [(lambda: keras.layers.Conv1D(3, 3, padding="valid"), False), (lambda: keras.layers.Dense(3), True)],
    ids=["conv1d", "dense"],
)
def test_wrapper_reports_masking_support_of_the_wrapped_layer(make, supports_masking):
    layer = make()
    assert layer.supports_masking is supports_masking
    assert SpectralNormalization(layer).supports_masking is supports_masking


def test_mask_is_dropped_by_a_layer_that_does_not_support_masking():
    """Embedding(mask_zero) -> SN(Conv1D 'valid') -> LSTM: the length-6 mask must not reach
    the length-4 output (JAX crashed on it, TensorFlow and torch used it silently)."""
    tokens = np.array([[1, 2, 3, 0, 0, 0], [4, 5, 6, 7, 8, 0]], "int32")

    def model_with(wrap):
        return keras.Sequential([
            keras.Input((6,), dtype="int32"),
            keras.layers.Embedding(10, 4, mask_zero=True),
            wrap(keras.layers.Conv1D(3, 3, padding="valid")),
            keras.layers.LSTM(2),
        ])

    normalized = model_with(SpectralNormalization)
    bare = model_with(lambda layer: layer)
    wrapper = normalized.layers[1]
    sigma = float(to_numpy(wrapper.sigmas()[0]))
    bare.layers[0].set_weights(normalized.layers[0].get_weights())
    bare.layers[1].set_weights([to_numpy(wrapper.layer.kernel) / sigma, to_numpy(wrapper.layer.bias)])
    bare.layers[2].set_weights(normalized.layers[2].get_weights())
    probe = MaskProbe()
    probe(wrapper(normalized.layers[0](tokens)))
    assert probe.seen_mask is None
    np.testing.assert_allclose(to_numpy(normalized(tokens)), to_numpy(bare(tokens)), rtol=1e-5, atol=1e-6)


def test_mask_is_propagated_by_a_layer_that_supports_masking():
    tokens = np.array([[1, 2, 0], [3, 0, 0]], "int32")
    embedding = keras.layers.Embedding(10, 4, mask_zero=True)
    wrapper = SpectralNormalization(keras.layers.Dense(3))
    probe = MaskProbe()
    probe(wrapper(embedding(tokens)))
    np.testing.assert_array_equal(to_numpy(probe.seen_mask), tokens != 0)


@pytest.mark.parametrize("family", ["dense", "einsum_dense", "conv2d", "embedding"])
def test_outputs_follow_the_wrappers_dtype_policy(family):
    """The wrapper's own policy decides its output dtype, as Keras's wrapper does, and the
    eager output, ``compute_output_spec`` and the functional graph agree."""
    make, shape = FAMILIES[family]
    inputs = family_inputs(shape)
    wrapper = SpectralNormalization(make(), dtype="mixed_float16")
    for training in (True, False):
        assert keras.backend.standardize_dtype(wrapper(inputs, training=training).dtype) == "float16"
    spec = wrapper.compute_output_spec(keras.KerasTensor(inputs.shape, dtype=str(inputs.dtype)))
    assert keras.backend.standardize_dtype(spec.dtype) == "float16"
    symbolic = keras.Input(inputs.shape[1:], dtype=str(inputs.dtype))
    model = keras.Model(symbolic, SpectralNormalization(make(), dtype="mixed_float16")(symbolic))
    assert keras.backend.standardize_dtype(model.outputs[0].dtype) == "float16"
    assert keras.backend.standardize_dtype(model(inputs).dtype) == "float16"
