"""``lipnorm robustness``: an ONNX file and an .npz of samples, table, JSON, plot, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from torch import nn  # noqa: E402

from lipnorm.cli import main  # noqa: E402
from lipnorm.robustness import certified_radius  # noqa: E402
from tests.test_robustness import export_onnx, mlp  # noqa: E402


@pytest.fixture
def files(tmp_path):
    model = mlp()
    path = tmp_path / "mlp.onnx"
    path.write_bytes(export_onnx(model, (6,)).SerializeToString())
    x = np.random.default_rng(0).standard_normal((30, 6)).astype(np.float32)
    y = model(torch.from_numpy(x)).argmax(1).numpy()
    y[:3] = (y[:3] + 1) % 3
    np.savez(tmp_path / "samples.npz", x=x, y=y)
    return model, path, tmp_path / "samples.npz", x, y


def test_json_report_matches_the_api(files, capsys, tmp_path):
    model, path, samples, x, y = files
    plot = tmp_path / "robust.png"
    assert main(["robustness", str(path), "--data", str(samples), "--eps", "0.05,0.2",
                 "--method", "product", "--json", "--plot", str(plot)]) == 0
    report = json.loads(capsys.readouterr().out)
    radii = certified_radius(model, x, y, method="product")
    assert report["eps"] == [0.05, 0.2] and report["clean_accuracy"] == pytest.approx(27 / 30)
    assert report["certified_accuracy"] == [float(np.mean(radii > e)) for e in (0.05, 0.2)]
    np.testing.assert_allclose(report["radii"], radii, rtol=1e-5, atol=1e-7)
    assert plot.stat().st_size > 0


def test_table_and_an_attack_on_onnx_is_refused(files, capsys):
    _, path, samples, _, _ = files
    assert main(["robustness", str(path), "--data", str(samples), "--eps", "0.1", "--method", "product"]) == 0
    assert "clean accuracy 90.0%" in capsys.readouterr().out
    assert main(["robustness", str(path), "--data", str(samples), "--attack", "--method", "product"]) == 1
    assert "attack the torch or Keras model" in capsys.readouterr().err


def test_pickled_or_incomplete_samples_are_refused(files, capsys, tmp_path):
    _, path, _, x, _ = files
    np.savez(tmp_path / "objects.npz", x=x, y=np.array([{"label": 1}], dtype=object))
    assert main(["robustness", str(path), "--data", str(tmp_path / "objects.npz")]) == 1
    assert "without pickle" in capsys.readouterr().err
    np.savez(tmp_path / "no_labels.npz", x=x)
    assert main(["robustness", str(path), "--data", str(tmp_path / "no_labels.npz")]) == 1
    assert "missing ['y']" in capsys.readouterr().err
    assert main(["robustness", str(path), "--data", str(tmp_path / "absent.npz")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_bad_labels_and_uncertifiable_models_get_their_exit_status(files, capsys, tmp_path):
    _, path, _, x, _ = files
    np.savez(tmp_path / "bad.npz", x=x, y=np.full(30, 7))
    assert main(["robustness", str(path), "--data", str(tmp_path / "bad.npz")]) == 1
    assert "label 7 at sample 0 is out of range" in capsys.readouterr().err

    class Exp(nn.Module):
        def forward(self, x):
            return torch.exp(x)

    exp = tmp_path / "exp.onnx"
    exp.write_bytes(export_onnx(Exp().eval(), (3,)).SerializeToString())
    np.savez(tmp_path / "three.npz", x=np.ones((2, 3), np.float32), y=np.zeros(2, np.int64))
    assert main(["robustness", str(exp), "--data", str(tmp_path / "three.npz")]) == 2
    assert "no known Lipschitz rule" in capsys.readouterr().err
