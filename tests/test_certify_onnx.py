"""certify() on ONNX models exported from torch, and agreement between the front ends."""

import io
import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from torch import nn  # noqa: E402

from lipnorm.certify import NotCertifiableError, certify, lipschitz_lower_bound  # noqa: E402
from tests.test_certify_torch import networks_with_shape  # noqa: E402


def export(model, shape, fold=True):
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, *shape),), buffer, dynamo=False,
                          do_constant_folding=fold)
    return onnx.load_from_string(buffer.getvalue())


def onnx_secant(proto, shape, pairs=48, seed=0):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((pairs, *shape)).astype(np.float32)
    y = (x + np.logspace(-2, 0, pairs).reshape(-1, *([1] * len(shape))) * rng.standard_normal(x.shape)).astype(np.float32)
    best = 0.0
    for a, b in zip(x, y):
        fa = session.run(None, {name: a[None]})[0].astype(np.float64)
        fb = session.run(None, {name: b[None]})[0].astype(np.float64)
        best = max(best, np.linalg.norm(fa - fb) / np.linalg.norm(a.astype(np.float64) - b))
    return best


@given(networks_with_shape(), st.booleans())
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_onnx_export_certifies_like_torch_and_soundly(case, fold):
    model, shape = case
    from_torch = certify(model, shape)
    proto = export(model, shape, fold)
    from_onnx = certify(proto)
    assert from_onnx.input_shape == shape
    # the exporter may fold BatchNorm into the convolution in float32 first: agree to 1e-5
    np.testing.assert_allclose(from_onnx.upper, from_torch.upper, rtol=1e-5)
    # soundness judged against the float32 ONNX runtime, which rounds at ~1e-6 relative
    assert from_onnx.upper * (1 + 1e-5) >= onnx_secant(proto, shape), from_onnx.table()


def test_onnx_selu_keeps_its_slope_range():
    """Regression: ONNX's Selu was read as a bare Lipschitz constant, so the chain and the
    SDP saw an opaque layer where torch's front end gives the slope range [0, γα]; the two
    certificates of one model then differed (0.43 against 0.41 on a drawn example)."""
    from tests.test_certify_torch import Branches

    torch.manual_seed(7)
    model = nn.Sequential(nn.SELU(), Branches(nn.Conv2d(3, 2, 1), nn.Sequential(nn.Tanh(), nn.Conv2d(3, 1, 3, padding=1))),
                          nn.Flatten(), nn.Linear(3 * 5 * 5, 4)).eval()
    proto = export(model, (3, 5, 5))
    for method in ("product", "chain", "sdp"):
        from_torch, from_onnx = certify(model, (3, 5, 5), method=method), certify(proto, method=method)
        assert from_onnx.method == from_torch.method == method
        # ONNX stores γ and α in float32: γα is 5e-8 below torch's 1.7581 (rounded up)
        np.testing.assert_allclose(from_onnx.upper, from_torch.upper, rtol=1e-6)


def test_torch_keras_and_onnx_agree_on_one_mlp(tmp_path):
    keras = pytest.importorskip("keras")
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    twin = keras.Sequential([keras.Input((5,)), keras.layers.Dense(7, activation="tanh"),
                             keras.layers.Dense(4, activation="relu"), keras.layers.Dense(2)])
    for dense, linear in zip([l for l in twin.layers], [m for m in model if isinstance(m, nn.Linear)]):
        dense.set_weights([linear.weight.detach().numpy().T, linear.bias.detach().numpy()])
    path = tmp_path / "mlp.onnx"
    onnx.save(export(model, (5,)), path)
    for method in ("product", "auto"):
        bounds = {
            "torch": certify(model, (5,), method=method).upper,
            "keras": certify(twin, method=method).upper,
            "onnx": certify(export(model, (5,)), method=method).upper,
            "onnx file": certify(str(path), method=method).upper,
        }
        if method == "product":  # the same products of the same certified norms
            assert len(set(bounds.values())) == 1, bounds
        else:  # the SDP's multipliers follow the rounding of each front end's matrices
            np.testing.assert_allclose(list(bounds.values()), bounds["torch"], rtol=1e-5)


def test_onnx_refuses_unknown_operators():
    class Exp(nn.Module):
        def forward(self, x):
            return torch.exp(x)

    with pytest.raises(NotCertifiableError, match=r"\(Exp\).*no known Lipschitz rule.*rules="):
        certify(export(Exp().eval(), (3,)))
    certificate = certify(export(Exp().eval(), (3,)), rules={"Exp": 5.0})
    assert certificate.upper == 5.0


def test_malformed_onnx_file_gets_a_clear_error(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(export(nn.Linear(2, 2).eval(), (2,)).SerializeToString()[:40])
    with pytest.raises(ValueError, match="is not a valid ONNX model"):
        certify(str(path))


def onnx_graph(nodes, shape, constants=(), opset=18):
    """A float32 ONNX model reading ``x`` of shape (1, *shape) and writing ``y``."""
    helper = onnx.helper
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, *shape])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.asarray(value), name) for name, value in constants])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("nodes, shape, constants, truth", [
    ([("Add", ["x", "c"])], (1, 5), [("c", np.zeros((4, 5), np.float32))], 2.0),
    ([("Mul", ["x", "c"])], (1, 5), [("c", np.ones((4, 5), np.float32))], 2.0),
    ([("ReduceSum", ["x", "axes"], {"keepdims": 1}), ("Add", ["x", "s"])], (5,),
     [("axes", np.array([1], np.int64))], 6.0),
    ([("ReduceSum", ["x", "axes"], {"keepdims": 1})], (5,), [("axes", np.array([], np.int64))], 5**0.5),
], ids=["add-constant", "mul-constant", "add-sum", "sum-empty-axes"])
def test_onnx_copies_of_an_input_count_in_the_bound(nodes, shape, constants, truth):
    outputs = ["s"] * (len(nodes) - 1) + ["y"]
    proto = onnx_graph([onnx.helper.make_node(op, inputs, [out], **(rest[0] if rest else {}))
                        for (op, inputs, *rest), out in zip(nodes, outputs)], shape, constants)
    assert certify(proto).upper >= truth


@pytest.mark.parametrize("nodes, constants, match", [
    ([("Cast", ["x"], ["i"], {"to": onnx.TensorProto.INT32}),
      ("Cast", ["i"], ["y"], {"to": onnx.TensorProto.FLOAT})], [], "non-floating"),
    ([("Dropout", ["x", "ratio", "training"], ["y"], {})],
     [("ratio", np.array(0.5, np.float32)), ("training", np.array(True))], "training mode"),
    ([("Celu", ["x"], ["y"], {"alpha": -1.0})], [], "alpha > 0"),
], ids=["integer-cast", "dropout-in-training", "celu"])
def test_onnx_maps_without_a_lipschitz_constant_are_refused(nodes, constants, match):
    proto = onnx_graph([onnx.helper.make_node(op, inputs, outputs, **attributes)
                        for op, inputs, outputs, attributes in nodes], (3,), constants)
    with pytest.raises(NotCertifiableError, match=match):
        certify(proto)


def test_onnx_pad_with_axes_pads_only_those_axes():
    """Opset 18's Pad reads its pads for the axes listed in its fourth input."""
    def padded(inputs, constants):
        node = onnx.helper.make_node("Pad", inputs, ["y"], mode="reflect")
        return certify(onnx_graph([node], (2, 6), constants)).upper

    on_axes = padded(["x", "pads", "", "axes"],
                     [("pads", np.array([2, 2], np.int64)), ("axes", np.array([-1], np.int64))])
    full = padded(["x", "pads"], [("pads", np.array([0, 0, 2, 0, 0, 2], np.int64))])
    assert on_axes == full
    assert full > 1.0  # reflect padding by 2 copies entries


def test_onnx_dilated_average_pooling_is_refused():
    node = onnx.helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2], dilations=[2])
    with pytest.raises(NotCertifiableError, match="dilated average pooling"):
        certify(onnx_graph([node], (1, 8), opset=19))


def test_onnx_batch_norm_in_training_mode_is_refused():
    statistics = [("scale", np.ones(3, np.float32)), ("bias", np.zeros(3, np.float32)),
                  ("mean", np.zeros(3, np.float32)), ("var", np.full(3, 1e-4, np.float32))]
    node = onnx.helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"],
                                 ["y", "running_mean", "running_var"], training_mode=1)
    with pytest.raises(NotCertifiableError, match="training mode"):
        certify(onnx_graph([node], (3, 4), statistics))
