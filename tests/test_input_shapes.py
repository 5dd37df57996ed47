"""Inputs of the wrong shape get a ValueError naming the shape the model takes and the one given.

Before this check, a spectrally normalized CNN given samples without their channel axis or
of another size failed deep inside a layer (``mat1 and mat2 shapes cannot be multiplied``).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import lipnorm  # noqa: E402
from lipnorm.backends.torch import spectral_norm  # noqa: E402
from lipnorm.certify.inputs import check_input_shape, expected_input_shape, format_shape  # noqa: E402

LABELS = np.arange(4) % 10


def sn_cnn():
    """The kind of model the digits demo trains: normalized convolutions, a linear classifier."""
    torch.manual_seed(0)
    return nn.Sequential(
        spectral_norm(nn.Conv2d(1, 4, 3, padding=1), mode="operator", input_shape=(1, 8, 8)), nn.ReLU(),
        spectral_norm(nn.Conv2d(4, 8, 3, stride=2, padding=1)), nn.ReLU(),
        nn.Flatten(), spectral_norm(nn.Linear(8 * 4 * 4, 10)),
    ).eval()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(spectral_norm(nn.Linear(6, 12)), nn.ReLU(), nn.Linear(12, 3)).eval()


#: (model, bad x, what the error says)
BAD_INPUTS = [
    pytest.param(sn_cnn, np.zeros((4, 8, 8), np.float32),
                 r"the model takes samples of shape \(1, any, any\), x has samples of shape \(8, 8\)",
                 id="cnn-without-channel-axis"),
    pytest.param(sn_cnn, np.zeros((4, 8, 8, 1), np.float32),
                 r"takes samples of shape \(1, any, any\), x has samples of shape \(8, 8, 1\)",
                 id="cnn-channels-last"),
    pytest.param(sn_cnn, np.zeros((4, 1, 4, 8), np.float32),
                 r"x has samples of shape \(1, 4, 8\), which the model does not take: its first layer takes "
                 r"samples of shape \(1, any, any\), and the model fails on this one: mat1 and mat2 shapes",
                 id="cnn-other-size"),
    pytest.param(mlp, np.zeros((4, 5), np.float32),
                 r"the model takes samples of shape \(\.\.\., 6\), x has samples of shape \(5,\)",
                 id="mlp-features"),
]


@pytest.mark.parametrize(("make", "x", "match"), BAD_INPUTS)
def test_certified_radius_names_both_shapes(make, x, match):
    with pytest.raises(ValueError, match=match):
        lipnorm.certified_radius(make(), x, LABELS, method="product")


@pytest.mark.parametrize(("make", "x", "match"), BAD_INPUTS)
def test_certified_accuracy_names_both_shapes(make, x, match):
    with pytest.raises(ValueError, match=match):
        lipnorm.certified_accuracy(make(), x, LABELS, [0.1], method="product")


@pytest.mark.parametrize(("make", "x", "match"), BAD_INPUTS)
def test_robustness_names_both_shapes(make, x, match):
    with pytest.raises(ValueError, match=match):
        lipnorm.robustness(make(), x, LABELS, eps=[0.1], method="product")


@pytest.mark.parametrize(("make", "x", "match"), BAD_INPUTS)
def test_lipschitz_lower_bound_names_both_shapes(make, x, match):
    with pytest.raises(ValueError, match=match.replace("x has samples", "inputs has samples")):
        lipnorm.lipschitz_lower_bound(make(), x, steps=1)


def test_lipschitz_lower_bound_names_a_wrong_input_shape():
    with pytest.raises(ValueError, match=r"takes samples of shape \(1, any, any\), input_shape is \(8, 8\)"):
        lipnorm.lipschitz_lower_bound(sn_cnn(), input_shape=(8, 8), steps=1)


def test_inputs_of_the_right_shape_pass():
    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    model = sn_cnn()
    check_input_shape(model, x.shape[1:])
    assert lipnorm.certified_radius(model, x, LABELS, method="product").shape == (4,)
    assert lipnorm.lipschitz_lower_bound(model, x, steps=1).value > 0
    assert lipnorm.lipschitz_lower_bound(mlp(), input_shape=(6,), steps=1).value > 0


def test_the_given_bounds_name_the_shape_they_hold_for():
    from lipnorm.robustness import logit_bounds

    bounds = logit_bounds(sn_cnn(), (1, 8, 8), 10, method="product")
    with pytest.raises(ValueError, match=r"the bounds hold for inputs of shape \(1, 8, 8\), "
                                         r"x has samples of shape \(1, 4, 8\)"):
        lipnorm.certified_radius(sn_cnn(), np.zeros((4, 1, 4, 8), np.float32), LABELS, bounds=bounds)


def test_expected_input_shape_of_each_format(tmp_path):
    assert expected_input_shape(sn_cnn()) == (1, None, None)
    assert expected_input_shape(mlp()) == (Ellipsis, 6)
    assert expected_input_shape(nn.Sequential(nn.ConvTranspose1d(3, 5, 2))) == (3, None)
    assert expected_input_shape(nn.Sequential(nn.ReLU(), nn.Linear(6, 2))) is None
    pytest.importorskip("onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(sn_cnn(), (torch.zeros(1, 1, 8, 8),), str(tmp_path / "m.onnx"), dynamo=False)
    assert expected_input_shape(str(tmp_path / "m.onnx")) == (1, 8, 8)
    with pytest.raises(ValueError, match=r"takes samples of shape \(1, 8, 8\), x has samples of shape \(1, 4, 8\)"):
        lipnorm.certified_radius(str(tmp_path / "m.onnx"), np.zeros((4, 1, 4, 8), np.float32), LABELS)


def test_expected_input_shape_of_a_keras_model():
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3), keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    assert expected_input_shape(model) == (8, 8, 1)
    with pytest.raises(ValueError, match=r"takes samples of shape \(8, 8, 1\), inputs has samples of shape \(1, 8, 8\)"):
        lipnorm.lipschitz_lower_bound(model, np.zeros((2, 1, 8, 8), np.float32), steps=1)


@pytest.mark.parametrize(("shape", "text"), [((6,), "(6,)"), ((Ellipsis, 6), "(..., 6)"),
                                             ((1, None, None), "(1, any, any)")])
def test_format_shape(shape, text):
    assert format_shape(shape) == text
