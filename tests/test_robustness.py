"""Certified radii and accuracy: soundness against attacks, exactness on linear models, bad input."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import lipnorm  # noqa: E402
from lipnorm.robustness import certified_accuracy, certified_radius, logit_bounds, robustness  # noqa: E402
from lipnorm.robustness.evaluate import EVALUATION_TOLERANCE  # noqa: E402
from lipnorm.robustness.radii import certified_predictions  # noqa: E402

EPS = np.array([0.0, 0.1, 0.25, 0.5, 1.0])


def digits(count=300):
    """The first ``count`` test digits of the demo's split, (N, 1, 8, 8) float32 in [0, 1]."""
    pytest.importorskip("sklearn")
    from lipnorm.demo.digits import load_digits_split

    data = load_digits_split()
    return data, data.test_images[:count, None], data.test_labels[:count]


def small_cnn(seed=0):
    from lipnorm.backends.torch import spectral_norm

    torch.manual_seed(seed)
    return nn.Sequential(
        spectral_norm(nn.Conv2d(1, 4, 3, padding=1), mode="operator", input_shape=(1, 8, 8)), nn.ReLU(),
        spectral_norm(nn.Conv2d(4, 8, 3, stride=2, padding=1), mode="operator", input_shape=(4, 8, 8)),
        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )


@pytest.fixture(scope="module")
def trained():
    """A small Lipschitz CNN trained for a few epochs on the digits, and test data."""
    from lipnorm.demo.torch_cnn import train

    data, x, y = digits()
    model = small_cnn()
    train(model, data, epochs=4)
    return model.eval(), x, y


@pytest.fixture(scope="module")
def trained_bounds(trained):
    model, x, _ = trained
    return logit_bounds(model, x.shape[1:], 10, method="auto", time_budget=2.0)


def test_no_attack_crosses_a_certified_radius(trained, trained_bounds):
    fb = pytest.importorskip("foolbox")
    model, x, y = trained
    radii = certified_radius(model, x, y, bounds=trained_bounds)
    correct = radii > 0
    assert correct.mean() > 0.5
    torch.manual_seed(0)
    fmodel = fb.PyTorchModel(model, bounds=(-10.0, 10.0), device="cpu")
    xs, ys = torch.from_numpy(x[correct]), torch.from_numpy(y[correct])
    # a minimum-norm attack: every adversarial it finds must lie outside the radius
    _, found, success = fb.attacks.DDNAttack(steps=300)(fmodel, xs, ys, epsilons=None)
    distances = (found - xs).flatten(1).norm(dim=1).double().numpy()
    inside = success.numpy() & (distances <= radii[correct])
    assert not inside.any(), f"{inside.sum()} adversarial examples inside certified radii"
    # and PGD with many steps at each sample's own radius finds nothing
    pgd = fb.attacks.L2PGD(steps=200, rel_stepsize=0.02)
    for radius in np.unique(np.round(radii[correct], 1)):
        chosen = np.flatnonzero(np.round(radii[correct], 1) == radius)
        eps = float(np.min(radii[correct][chosen])) * (1 - 1e-6)
        _, _, success = pgd(fmodel, xs[chosen], ys[chosen], epsilons=[eps])
        assert not success.any(), f"PGD crossed a certified radius near {radius}"


def test_certified_at_most_empirical_at_most_clean(trained, trained_bounds):
    pytest.importorskip("foolbox")
    model, x, y = trained
    report = robustness(model, x, y, eps=EPS, attack=True, domain=(0, 1), bounds=trained_bounds)
    clean = float(np.mean(model(torch.from_numpy(x)).argmax(1).numpy() == y))
    assert report.clean_accuracy == clean
    assert report.certified_accuracy[0] == clean
    assert report.empirical_accuracy[0] == clean
    for certified, empirical in zip(report.certified_accuracy, report.empirical_accuracy):
        assert certified <= empirical <= clean
    assert list(report.certified_accuracy) == list(certified_accuracy(model, x, y, EPS, bounds=trained_bounds))


def test_pairwise_radii_at_least_the_global_form(trained, trained_bounds):
    model, x, y = trained
    found = certified_predictions(model, x, y, bounds=trained_bounds)
    margins = np.sort(found.logits, axis=1)
    # margin / (sqrt(2) L), with the same network bound, without the rounding allowances
    loose = (margins[:, -1] - margins[:, -2]) / (np.sqrt(2) * trained_bounds.global_upper)
    global_radii = certified_radius(model, x, y, bounds=trained_bounds, bound="global")
    assert np.all(found.radii >= global_radii)
    assert np.all(global_radii <= np.maximum(loose, 0))
    # smaller by no more than the stated evaluation allowance 2E / (sqrt(2) L)
    allowance = 2 * EVALUATION_TOLERANCE["float32"] * (1 + np.abs(found.logits).max(axis=1))
    slack = allowance / (np.sqrt(2) * trained_bounds.global_upper) * (1 + 1e-9)
    certified = global_radii > 0
    assert np.all(loose[certified] - global_radii[certified] <= slack[certified])
    assert np.all(trained_bounds.pairwise <= np.sqrt(2) * trained_bounds.global_upper * (1 + 1e-15))


def test_random_networks_are_sound_too():
    fb = pytest.importorskip("foolbox")
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                          nn.Linear(16, 5)).eval()
    x = torch.rand(64, 1, 8, 8)
    radii = certified_radius(model, x, method="product")
    predicted = model(x).argmax(1)
    fmodel = fb.PyTorchModel(model, bounds=(-10.0, 10.0), device="cpu")
    _, found, success = fb.attacks.DDNAttack(steps=300)(fmodel, x, predicted, epsilons=None)
    distances = (found - x).flatten(1).norm(dim=1).double().numpy()
    assert not (success.numpy() & (distances <= radii)).any()


def test_linear_classifier_radius_is_the_distance_to_the_decision_boundary():
    rng = np.random.default_rng(0)
    weight, bias = rng.standard_normal((4, 6)), rng.standard_normal(4)
    model = nn.Linear(6, 4).double().eval()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(weight))
        model.bias.copy_(torch.from_numpy(bias))
    x = rng.standard_normal((50, 6))
    logits = x @ weight.T + bias
    predicted = logits.argmax(1)
    exact = np.full(len(x), np.inf)
    for j in range(4):
        other = predicted != j
        gap = logits[other, predicted[other]] - logits[other, j]
        exact[other] = np.minimum(exact[other], gap / np.linalg.norm(weight[predicted[other]] - weight[j], axis=1))
    radii = certified_radius(model, x)
    assert np.all(radii <= exact)
    np.testing.assert_allclose(radii, exact, rtol=1e-9)


def test_inputs_wider_than_the_model_lose_their_rounding_distance():
    model = nn.Linear(3, 2).eval()
    x = np.array([[0.1, 0.2, 0.3]])
    bounds = logit_bounds(model, (3,), 2)
    from_float64 = certified_radius(model, x, bounds=bounds)
    from_float32 = certified_radius(model, x.astype(np.float32), bounds=bounds)
    moved = np.linalg.norm(x - x.astype(np.float32).astype(np.float64))
    assert 0 < from_float32[0] - from_float64[0] <= 2 * moved


def export_onnx(model, shape):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, *shape),), buffer, dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


def mlp(seed=2):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).eval()


def test_torch_keras_and_onnx_give_the_same_radii(tmp_path):
    keras = pytest.importorskip("keras")
    model = mlp()
    twin = keras.Sequential([keras.Input((6,)), keras.layers.Dense(12, activation="relu"), keras.layers.Dense(3)])
    for dense, linear in zip(twin.layers, [m for m in model if isinstance(m, nn.Linear)]):
        dense.set_weights([linear.weight.detach().numpy().T, linear.bias.detach().numpy()])
    x = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32)
    proto = export_onnx(model, (6,))
    path = tmp_path / "mlp.onnx"
    path.write_bytes(proto.SerializeToString())
    radii = {name: certified_radius(m, x, method="product")
             for name, m in {"torch": model, "keras": twin, "onnx": proto, "onnx file": str(path)}.items()}
    for name, value in radii.items():
        np.testing.assert_allclose(value, radii["torch"], rtol=1e-4, atol=1e-6, err_msg=name)


def test_onnx_model_with_a_fixed_batch_of_one():
    onnx = pytest.importorskip("onnx")
    model = mlp()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 6),), buffer, dynamo=False)
    x = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)
    radii = certified_radius(onnx.load_from_string(buffer.getvalue()), x, method="product")
    np.testing.assert_allclose(radii, certified_radius(model, x, method="product"), rtol=1e-4, atol=1e-6)


def test_agrees_with_orthogonium_vra_for_the_same_global_bound(trained, trained_bounds, monkeypatch):
    orthogonium_losses = pytest.importorskip("orthogonium.losses")
    # orthogonium 0.0.4's VRA moves a mask to CUDA unconditionally; keep it on the CPU
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    model, x, y = trained
    logits = model(torch.from_numpy(x)).detach()
    radii = certified_radius(model, x, y, bounds=trained_bounds, bound="global")
    # orthogonium's radius margin / (√2 L), and how much lipnorm takes off it for the rounding
    # of the model's evaluation (2E per margin, E = τ·(1 + max|f|), see lipnorm.robustness.radii)
    theirs_radii = orthogonium_losses.VRA(logits, torch.from_numpy(y), last_layer_type="global",
                                          L=trained_bounds.global_upper, return_certs=True).numpy()
    allowance = (2 * EVALUATION_TOLERANCE["float32"] * (1 + np.abs(logits.numpy()).max(axis=1))
                 / (np.sqrt(2) * trained_bounds.global_upper))
    for eps in (0.05, 0.1, 0.25, 0.5):
        theirs = orthogonium_losses.VRA(logits, torch.from_numpy(y), last_layer_type="global",
                                        L=trained_bounds.global_upper, eps=eps).numpy().astype(bool)
        np.testing.assert_array_equal(theirs, theirs_radii > eps)
        ours = radii > eps
        assert not (ours & ~theirs).any()
        # the same samples, apart from those whose radius is within lipnorm's allowance of eps
        only_theirs = theirs & ~ours
        assert np.all(theirs_radii[only_theirs] <= (eps + allowance[only_theirs]) * (1 + 1e-9)), eps


def test_a_model_certify_refuses_is_refused_with_its_message():
    class Gate(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    model = nn.Sequential(nn.Linear(4, 3), Gate()).eval()
    x = np.ones((2, 4), dtype=np.float32)
    with pytest.raises(lipnorm.NotCertifiableError) as expected:
        lipnorm.certify(model, (4,))
    with pytest.raises(lipnorm.NotCertifiableError) as refused:
        certified_radius(model, x)
    assert str(refused.value) == str(expected.value)


@pytest.mark.parametrize("x, y, eps, error, match", [
    (np.ones((2, 6), np.float32), np.array([0, 3]), 0.1, ValueError, r"label 3 at sample 1 is out of range.*0\.\.2"),
    (np.ones((2, 6), np.float32), np.array([0, -1]), 0.1, ValueError, r"label -1 at sample 1"),
    (np.ones((2, 6), np.float32), np.array([0.0, 1.0]), 0.1, TypeError, r"labels y must be integers"),
    (np.ones((2, 6), np.float32), np.array([0, 1, 2]), 0.1, ValueError, r"labels y must have shape \(2,\)"),
    (np.array([[np.nan] * 6, [0] * 6], np.float32), np.array([0, 1]), 0.1, ValueError, r"NaN or Inf.*sample 0"),
    (np.ones((2, 6), np.float32), np.array([0, 1]), -0.1, ValueError, r"eps must be finite and >= 0"),
    (np.ones((2, 6), np.float32), np.array([0, 1]), float("nan"), ValueError, r"eps must be finite"),
    (np.array(["a"] * 6), np.array([0]), 0.1, TypeError, r"x must hold real numbers"),
    (np.ones(6, np.float32), np.array([0]), 0.1, ValueError, r"non-empty batch"),
])
def test_bad_input_gets_a_specific_error(x, y, eps, error, match):
    with pytest.raises(error, match=match):
        certified_accuracy(mlp(), x, y, eps, method="product")


def test_a_shape_mismatch_names_both_shapes():
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match=r"takes samples of shape \(6,\), x has samples of shape \(5,\)"):
        certified_radius(model, np.ones((2, 5), np.float32))
    bounds = logit_bounds(mlp(), (6,), 3, method="product")
    with pytest.raises(ValueError, match=r"bounds hold for inputs of shape \(6,\), x has samples of shape \(7,\)"):
        certified_radius(mlp(), np.ones((2, 7), np.float32), bounds=bounds)


def test_a_model_with_one_output_is_not_a_classifier():
    with pytest.raises(ValueError, match=r"1 output; certified radii need a classifier"):
        certified_radius(nn.Linear(6, 1).eval(), np.ones((2, 6), np.float32))


def test_report_table_json_and_plot(trained, trained_bounds, tmp_path):
    pytest.importorskip("matplotlib")
    model, x, y = trained
    report = robustness(model, x, y, eps=[0.1, 0.5], bounds=trained_bounds, domain=(0, 1))
    assert "certified (global L)" in report.table() and "not used by the radii" in report.table()
    import json

    data = json.loads(report.to_json(tmp_path / "report.json"))
    assert data["certified_accuracy"] == list(report.certified_accuracy) and len(data["radii"]) == len(y)
    report.plot(tmp_path / "report.png")
    assert (tmp_path / "report.png").stat().st_size > 0
