"""lipnorm.backends.keras.SpectralConstraint on the current Keras backend (the others run it
through test_keras_sn_backends.py): the cap after every update of model.fit, checked by SciPy's
SVD; kernels under the cap untouched; the bound is an upper bound; config round-trip; bad input."""

import numpy as np
import pytest
import scipy.linalg

keras = pytest.importorskip("keras")
from keras import ops  # noqa: E402

from lipnorm.backends._keras_constraint import working_dtype  # noqa: E402
from lipnorm.backends.keras import SpectralConstraint  # noqa: E402
from tests.keras_fixtures import keras_backend  # noqa: E402,F401

RTOL = 1e-3


def _sigma(kernel, axis=-1):
    matrix = np.moveaxis(np.asarray(ops.convert_to_numpy(kernel), dtype=np.float64), axis, -1)
    return float(scipy.linalg.svdvals(matrix.reshape(-1, matrix.shape[-1]))[0])


def _model():
    return keras.Sequential([
        keras.Input((8, 8, 2)),
        keras.layers.Conv2D(4, 3, padding="same", activation="relu", kernel_constraint=SpectralConstraint()),
        keras.layers.Conv2DTranspose(3, 2, strides=2, kernel_constraint=SpectralConstraint(axis=-2)),
        keras.layers.Flatten(),
        keras.layers.Dense(16, activation="tanh", kernel_constraint=SpectralConstraint(2.0)),
        keras.layers.Dense(1, kernel_constraint=SpectralConstraint()),
    ])


def test_fit_keeps_every_kernel_under_the_cap():
    generator = np.random.default_rng(0)
    x = generator.standard_normal((64, 8, 8, 2)).astype("float32")
    y = generator.standard_normal((64, 1)).astype("float32")
    model = _model()
    model.compile(keras.optimizers.AdamW(0.05), "mse")
    layers = [layer for layer in model.layers if getattr(layer, "kernel_constraint", None) is not None]
    ratios = []

    class CheckCap(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if hasattr(self.model, "jax_state_sync"):  # JAX keeps the weights apart during fit
                self.model.jax_state_sync()
            for layer in layers:
                constraint = layer.kernel_constraint
                ratio = _sigma(layer.kernel, constraint.axis) / constraint.max_sigma
                assert ratio <= 1.0 + RTOL, (layer.name, ratio)
                ratios.append(ratio)

    model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[CheckCap()])
    assert len(ratios) == 4 * 4 * 3 and max(ratios) >= 0.99  # the cap was reached, and held


def test_kernel_under_the_cap_is_returned_bit_for_bit():
    generator = np.random.default_rng(1)
    kernel = generator.standard_normal((20, 30)).astype("float32")
    kernel *= np.float32(0.9 / _sigma(kernel))
    out = ops.convert_to_numpy(SpectralConstraint()(ops.convert_to_tensor(kernel)))
    assert np.array_equal(out.view(np.int32), kernel.view(np.int32))


@pytest.mark.parametrize("shape", [(30, 20), (12, 40), (3, 3, 4, 8), (64, 1), (1, 5)])
@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e20])
def test_upper_bound_and_scaled_result(shape, scale):
    generator = np.random.default_rng(sum(shape))
    kernel = (generator.standard_normal(shape) * scale).astype("float32")
    true = _sigma(kernel)
    constraint = SpectralConstraint(max_sigma=0.5)
    upper = float(ops.convert_to_numpy(constraint.upper(ops.convert_to_tensor(kernel))))
    # float32 arithmetic (JAX without x64) bounds the first Gram product's rounding loosely.
    slack = 1e-6 if working_dtype() == "float64" else 1e-2
    assert true <= upper <= true * (1 + RTOL / 2 + slack)
    scaled = _sigma(constraint(ops.convert_to_tensor(kernel)))
    if upper <= 0.5 * (1 + RTOL):
        assert scaled == true  # under the cap: untouched
    else:
        assert 0.5 * (1 - RTOL / 2 - slack) <= scaled <= 0.5


def test_low_rank_and_zero_kernels():
    generator = np.random.default_rng(2)
    rank_one = np.outer(generator.standard_normal(16), generator.standard_normal(9)).astype("float32")
    upper = float(ops.convert_to_numpy(SpectralConstraint().upper(ops.convert_to_tensor(rank_one))))
    assert _sigma(rank_one) <= upper <= _sigma(rank_one) * (1 + 1e-5)
    zero = np.zeros((4, 3), "float32")
    assert np.array_equal(ops.convert_to_numpy(SpectralConstraint()(ops.convert_to_tensor(zero))), zero)


def test_config_round_trip_and_saved_model(tmp_path):
    constraint = SpectralConstraint(max_sigma=2.5, rtol=1e-2, axis=-2)
    config = constraint.get_config()
    assert config == {"max_sigma": 2.5, "rtol": 1e-2, "axis": -2}
    assert SpectralConstraint.from_config(config).get_config() == config
    model = _model()
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    restored = [layer.kernel_constraint for layer in loaded.layers if getattr(layer, "kernel_constraint", None)]
    assert [c.get_config() for c in restored] == [
        {"max_sigma": 1.0, "rtol": RTOL, "axis": -1}, {"max_sigma": 1.0, "rtol": RTOL, "axis": -2},
        {"max_sigma": 2.0, "rtol": RTOL, "axis": -1}, {"max_sigma": 1.0, "rtol": RTOL, "axis": -1}]
    assert all(isinstance(c, SpectralConstraint) for c in restored)


@pytest.mark.parametrize("value", [0.0, -2.0, float("nan"), float("inf"), True])
def test_bad_cap(value):
    with pytest.raises(ValueError, match="max_sigma must be a positive finite number"):
        SpectralConstraint(max_sigma=value)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"rtol must be a number in \(0, 1\)"):
        SpectralConstraint(rtol=1.5)
    with pytest.raises(ValueError, match="axis must be an integer"):
        SpectralConstraint(axis=1.0)
    with pytest.raises(ValueError, match=r"at least two axes, got shape \(4,\)"):
        SpectralConstraint()(ops.zeros((4,)))
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        SpectralConstraint(axis=2)(ops.zeros((4, 3)))


def test_nan_kernel_is_named():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="capped",
                                                                    kernel_constraint=SpectralConstraint())])
    model.compile(keras.optimizers.SGD(1e30), "mse")
    with pytest.raises(Exception, match="capped/kernel holds NaN or Inf after the optimizer step"):
        model.fit(np.full((8, 4), 1e30, "float32"), np.ones((8, 3), "float32"), epochs=2, verbose=0)
