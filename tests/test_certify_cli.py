"""The certify command: safe model loading, exit codes, JSON and plot output."""

import io
import json
import warnings

import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("rich")
from rich.console import Console  # noqa: E402
from torch import nn  # noqa: E402

from lipnorm.certify import cli  # noqa: E402


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(3 * 5 * 5, 2)).eval()


def run(argv):
    parser = __import__("argparse").ArgumentParser()
    cli.add_arguments(parser)
    out = io.StringIO()
    code = cli.run_certify(parser.parse_args(argv), console=Console(file=out, width=200))
    return code, out.getvalue()


def test_onnx_file_with_json_and_plot(tmp_path):
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(small_model(), (torch.zeros(1, 2, 5, 5),), str(path), dynamo=False)
    code, text = run([str(path), "--json", str(tmp_path / "c.json"), "--plot", str(tmp_path / "c.png")])
    assert code == 0, text
    assert "certified upper bound" in text
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["upper"] > 0 and data["input_shape"] == [2, 5, 5]
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_torch_export_program_matches_the_module(tmp_path):
    model = small_model()
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(1, 2, 5, 5),)), str(path))
    loaded = cli.load_model(path)
    from lipnorm.certify import certify

    assert certify(loaded, (2, 5, 5)).upper == certify(model, (2, 5, 5)).upper
    code, text = run([str(path), "--input-shape", "2,5,5", "--lower"])
    assert code == 0 and "lower bound" in text, text


def test_pickled_model_is_refused_without_trust(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(small_model(), path)
    code, text = run([str(path), "--input-shape", "2,5,5"])
    assert code == 1 and "arbitrary code" in text and "--trust-pickle" in text
    code, text = run([str(path), "--input-shape", "2,5,5", "--trust-pickle"])
    assert code == 0, text


def test_keras_file_loads_in_safe_mode(tmp_path):
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu"),
                              keras.layers.Dense(2)])
    path = tmp_path / "m.keras"
    model.save(path)
    code, text = run([str(path)])
    assert code == 0, text


@pytest.mark.parametrize("suffix", [".onnx", ".pt2", ".keras"])
def test_truncated_files_get_a_clear_error(tmp_path, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"PK\x03\x04 not really a model")
    with pytest.raises(cli.ModelFileError, match=r"(not a valid ONNX model|cannot read .*broken)"):
        cli.load_model(path)
    code, text = run([str(path), "--input-shape", "2,5,5"])
    assert code == 1 and "Traceback" not in text


def test_unknown_suffix_and_missing_file(tmp_path):
    path = tmp_path / "m.h5x"
    path.write_bytes(b"x")
    with pytest.raises(cli.ModelFileError, match="unknown model file type '.h5x'"):
        cli.load_model(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.load_model(tmp_path / "missing.onnx")


def test_uncertifiable_model_exits_with_2(tmp_path):
    class Square(nn.Module):
        def forward(self, x):
            return x * x

    path = tmp_path / "sq.pt2"
    torch.export.save(torch.export.export(Square(), (torch.zeros(1, 3),)), str(path))
    code, text = run([str(path), "--input-shape", "3"])
    assert code == 2 and "not certifiable" in text


def test_method_and_time_budget_show_the_ladder(tmp_path):
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(small_model(), (torch.zeros(1, 2, 5, 5),), str(path), dynamo=False)
    code, text = run([str(path), "--method", "chain", "--json", str(tmp_path / "c.json")])
    assert code == 0, text
    assert "the ladder of methods" in text and "chain" in text and "product" in text
    data = json.loads((tmp_path / "c.json").read_text())
    assert [run["method"] for run in data["ladder"]] == ["product", "chain"]
    assert data["upper"] == min(run["upper"] for run in data["ladder"])
    assert data["method"] in ("product", "chain")
    code, text = run([str(path), "--method", "auto", "--time-budget", "5"])
    assert code == 0 and "sdp" in text, text


@pytest.mark.parametrize("argv, message", [
    (["--method", "lipsdp"], "invalid choice"),
    (["--time-budget", "0"], "positive number of seconds"),
    (["--time-budget", "soon"], "number of seconds"),
])
def test_bad_method_or_budget_is_a_usage_error(tmp_path, capsys, argv, message):
    parser = __import__("argparse").ArgumentParser()
    cli.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["m.onnx", *argv])
    assert message in capsys.readouterr().err
