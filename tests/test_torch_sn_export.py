"""Spectrally normalized torch models export to ONNX as plain layers, run in onnxruntime, certify.

In eval mode a layer normalized by ``lipnorm.backends.torch.spectral_norm`` exports as the
layer itself with its weight ``W / sigma`` (sigma from the stored u, v), through both of
``torch.onnx.export``'s exporters; the file runs in onnxruntime like the torch model and
``lipnorm certify model.onnx`` certifies it like the torch model.
"""

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("rich")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import lipnorm  # noqa: E402
from lipnorm.backends.torch import remove_spectral_norm, spectral_norm  # noqa: E402
from lipnorm.cli import main  # noqa: E402

EXPORTERS = [pytest.param(False, id="torchscript"),
             pytest.param(True, id="dynamo", marks=pytest.mark.skipif(
                 __import__("importlib").util.find_spec("onnxscript") is None,
                 reason="torch.onnx.export(dynamo=True) needs onnxscript: pip install 'lipnorm[onnx]'"))]
#: The operators a plain CNN of convolutions, ReLUs and a linear layer exports to.
PLAIN_OPERATORS = {"Conv", "Relu", "Flatten", "Reshape", "Gemm"}
INPUT_SHAPE = (1, 8, 8)


def trained_sn_cnn():
    """A CNN with spectral norm in matrix and operator mode, trained a few Adam steps; eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(
        spectral_norm(nn.Conv2d(1, 8, 3, padding=1)), nn.ReLU(),
        spectral_norm(nn.Conv2d(8, 8, 3, stride=2, padding=1), mode="operator"), nn.ReLU(),
        nn.Flatten(), spectral_norm(nn.Linear(8 * 4 * 4, 10)),
    )
    images, labels = torch.rand(32, *INPUT_SHAPE), torch.randint(0, 10, (32,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return model.eval(), images


def export(model, path, dynamo):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation, onnxscript's notices
        torch.onnx.export(model, (torch.zeros(1, *INPUT_SHAPE),), str(path), dynamo=dynamo)


def run_onnx(path, images):
    """The file's output for each image, one at a time (the exported batch size is 1)."""
    session = ort.InferenceSession(str(path))
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: image[None].numpy()})[0] for image in images])


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_trained_sn_cnn_exports_runs_in_onnxruntime_and_certifies(dynamo, tmp_path):
    model, images = trained_sn_cnn()
    path = tmp_path / "model.onnx"
    export(model, path, dynamo)

    graph = onnx.load(path).graph
    assert {node.op_type for node in graph.node} <= PLAIN_OPERATORS, [node.op_type for node in graph.node]
    weights = sorted((init for init in graph.initializer if len(init.dims) >= 2), key=lambda init: len(init.dims))
    expected_weights = sorted((layer.weight.detach() for layer in model if hasattr(layer, "weight_orig")),
                              key=lambda weight: weight.ndim)
    assert [tuple(init.dims) for init in weights] != []
    for init, expected in zip(weights, expected_weights, strict=True):  # W / sigma, not W
        np.testing.assert_allclose(onnx.numpy_helper.to_array(init), expected.numpy(), rtol=1e-6, atol=1e-7)

    with torch.no_grad():
        expected_output = model(images[:8]).numpy()
    np.testing.assert_allclose(run_onnx(path, images[:8]), expected_output, rtol=1e-5, atol=1e-6)

    report = tmp_path / "certificate.json"
    assert main(["certify", str(path), "--method", "chain", "--json", str(report)]) == 0
    certified = json.loads(report.read_text())
    assert certified["input_shape"] == list(INPUT_SHAPE)
    from_torch = lipnorm.certify(model, INPUT_SHAPE, method="chain")
    np.testing.assert_allclose(certified["upper"], from_torch.upper, rtol=1e-5)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_removing_spectral_norm_exports_the_same_plain_model(dynamo, tmp_path):
    model, images = trained_sn_cnn()
    with torch.no_grad():
        normalized_output = model(images).numpy()
    for layer in model:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            remove_spectral_norm(layer)
    assert [type(layer) for layer in model] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.Flatten, nn.Linear]
    with torch.no_grad():
        np.testing.assert_allclose(model(images).numpy(), normalized_output, rtol=1e-5, atol=1e-6)
    export(model, tmp_path / "plain.onnx", dynamo)
    np.testing.assert_allclose(run_onnx(tmp_path / "plain.onnx", images[:8]), normalized_output[:8],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_export_keeps_u_and_v(dynamo, tmp_path):
    """Exporting runs no power-iteration step, whatever the mode: the state is left as it was."""
    model, _ = trained_sn_cnn()
    model.train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    export(model, tmp_path / "model.onnx", dynamo)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_operator_mode_exported_on_another_input_size_is_refused(tmp_path):
    model, _ = trained_sn_cnn()
    with pytest.raises(ValueError, match=r"u, v for inputs of shape \(8, 8, 8\).*exported on inputs of shape \(8, 16, 16\)"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.zeros(1, 1, 16, 16),), str(tmp_path / "m.onnx"), dynamo=False)


def test_embedding_and_linear_export_with_normalized_weights(tmp_path):
    """Layers without the output-scaling path (Embedding) read W / sigma as torch's SN does."""
    torch.manual_seed(0)
    model = nn.Sequential(spectral_norm(nn.Embedding(10, 4)), spectral_norm(nn.Linear(4, 3))).eval()
    tokens = torch.tensor([[1, 2, 3]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (tokens,), str(tmp_path / "m.onnx"), dynamo=False)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    with torch.no_grad():
        expected = model(tokens).numpy()
    got = session.run(None, {session.get_inputs()[0].name: tokens.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
