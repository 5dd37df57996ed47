"""The margin losses for torch and Keras: the formula, agreement between them, errors."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from lipnorm.robustness.torch_loss import MarginLoss, pairwise_row_distances  # noqa: E402


def case(seed=0):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((5, 7)).astype(np.float32)
    logits = rng.standard_normal((9, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 9)
    return weight, logits, labels


def torch_loss(weight, logits, labels, **options):
    layer = nn.Linear(7, 5)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
    return MarginLoss(0.3, layer, **options), layer


def test_cross_entropy_form_raises_wrong_logits_by_eps_times_the_row_distance():
    weight, logits, labels = case()
    loss, _ = torch_loss(weight, logits, labels, temperature=0.5)
    distances = np.linalg.norm(weight[:, None] - weight[None], axis=-1)
    shifted = (logits + 0.3 * distances[labels]) / 0.5
    expected = np.mean(np.log(np.exp(shifted).sum(1)) - shifted[np.arange(9), labels])
    value = loss(torch.from_numpy(logits), torch.from_numpy(labels))
    np.testing.assert_allclose(value.item(), expected, rtol=1e-5)


def test_hinge_form_is_zero_once_every_margin_is_certified_and_trains_the_last_layer():
    weight, logits, labels = case()
    loss, layer = torch_loss(weight, logits, labels, kind="hinge")
    wide = logits.copy()
    wide[np.arange(9), labels] += 100.0
    assert loss(torch.from_numpy(wide), torch.from_numpy(labels)).item() == 0.0
    value = loss(torch.from_numpy(logits), torch.from_numpy(labels))
    value.backward()
    assert value.item() > 0 and float(layer.weight.grad.abs().sum()) > 0


def test_row_distances_have_a_finite_gradient_on_the_diagonal():
    weight = torch.randn(4, 3, requires_grad=True)
    pairwise_row_distances(weight).sum().backward()
    assert torch.isfinite(weight.grad).all()


def test_keras_loss_agrees_with_torch():
    keras = pytest.importorskip("keras")
    from lipnorm.robustness.keras_loss import MarginLoss as KerasMarginLoss

    weight, logits, labels = case(1)
    dense = keras.layers.Dense(5)
    dense.build((None, 7))
    dense.kernel.assign(weight.T)
    for kind in ("cross_entropy", "hinge"):
        ours, _ = torch_loss(weight, logits, labels, kind=kind)
        theirs = KerasMarginLoss(0.3, dense, kind=kind)
        expected = ours(torch.from_numpy(logits), torch.from_numpy(labels)).item()
        value = float(keras.ops.convert_to_numpy(theirs(labels, logits)))
        np.testing.assert_allclose(value, expected, rtol=1e-5, err_msg=kind)


@pytest.mark.parametrize("options, error, match", [
    ({"eps": 0.0}, ValueError, "must be positive"),
    ({"temperature": -1.0}, ValueError, "must be positive"),
    ({"kind": "squared"}, ValueError, "kind must be one of"),
    ({"last_layer": nn.ReLU()}, TypeError, "last linear layer"),
])
def test_bad_options_are_refused(options, error, match):
    arguments = {"eps": 0.5, "last_layer": nn.Linear(3, 2)} | options
    with pytest.raises(error, match=match):
        MarginLoss(arguments.pop("eps"), arguments.pop("last_layer"), **arguments)
