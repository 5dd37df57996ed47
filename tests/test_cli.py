"""The `lipnorm` command: `lipnorm sigma FILE` on every format and bad file, and `lipnorm demo`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

import lipnorm
from lipnorm.cli import main

RNG = np.random.default_rng(1)
FC1 = RNG.standard_normal((40, 30))
FC2 = RNG.standard_normal((10, 40)).astype(np.float32)
BIAS = RNG.standard_normal(10)
CONV = RNG.standard_normal((8, 3, 3, 3))


def sigma_max(matrix) -> float:
    return float(scipy.linalg.svdvals(np.asarray(matrix, dtype=np.float64))[0])


def run_json(capsys, *args: str) -> list[dict]:
    assert main(["sigma", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def run_failing(capsys, *args: str, code: int = 2) -> str:
    """Run the command expecting exit ``code``; return stderr, checked to be one line."""
    assert main(list(args)) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lipnorm: error: "), err
    return err


@pytest.fixture
def npz_file(tmp_path: Path) -> Path:
    path = tmp_path / "weights.npz"
    np.savez(path, fc1=FC1, bias=BIAS, conv=CONV, fc2=FC2)
    return path


def test_every_2d_to_5d_tensor_gets_a_row_with_sigma_and_a_certified_interval(capsys, npz_file):
    rows = run_json(capsys, str(npz_file))
    assert [row["name"] for row in rows] == ["fc1", "conv", "fc2"]
    assert [row["measure"] for row in rows] == ["matrix", "reshaped", "matrix"]
    for row, tensor in zip(rows, (FC1, CONV, FC2)):
        exact = sigma_max(tensor.reshape(len(tensor), -1))
        np.testing.assert_allclose(row["sigma"], exact, rtol=1e-5)
        assert row["lower"] <= exact <= row["upper"]
        assert row["upper"] / row["lower"] <= 1 + 1e-3
        assert row["shape"] == list(tensor.shape)
        assert row["dtype"] == str(tensor.dtype)
        assert row["method"] in ("svd", "lanczos", "power")
        assert isinstance(row["bounds_method"], str) and row["bounds_method"]
        assert row["converged"] is True
        assert row["sigma_seconds"] >= 0 and row["bounds_seconds"] >= 0
        assert row["error"] is None


def test_key_picks_one_tensor_and_method_is_honoured(capsys, npz_file):
    (row,) = run_json(capsys, str(npz_file), "--key", "fc1", "--method", "power", "--rtol", "1e-8")
    assert row["name"] == "fc1" and row["method"] == "power"
    np.testing.assert_allclose(row["sigma"], sigma_max(FC1), rtol=1e-6)
    (row,) = run_json(capsys, str(npz_file), "--key", "bias")
    np.testing.assert_allclose(row["sigma"], np.linalg.norm(BIAS), rtol=1e-6)
    assert row["lower"] <= np.linalg.norm(BIAS) <= row["upper"]


def test_table_output(capsys, npz_file):
    assert main(["sigma", str(npz_file)]) == 0
    out = capsys.readouterr().out
    assert "fc1" in out and "fc2" in out and "conv" in out and "bias" not in out
    assert "40×30" in out and "reshaped 8×27" in out and "--stack measures each matrix" in out
    assert f"{sigma_max(FC1):.5f}"[:6] in out
    assert "certified interval" in out


def test_table_without_rich_names_the_fix_and_json_still_works(capsys, npz_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "rich.console", None)
    monkeypatch.setitem(sys.modules, "rich.table", None)
    err = run_failing(capsys, "sigma", str(npz_file))
    assert "pip install 'lipnorm[cli]' (or pass --json)" in err
    assert len(run_json(capsys, str(npz_file))) == 3


def test_pt_state_dict(capsys, tmp_path):
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    path = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "step": 7}, path)
    rows = run_json(capsys, str(path))
    assert [row["name"] for row in rows] == ["model.0.weight", "model.2.weight"]
    for row, layer in zip(rows, (model[0], model[2])):
        exact = sigma_max(layer.weight.detach().numpy())
        np.testing.assert_allclose(row["sigma"], exact, rtol=1e-5)
        assert row["lower"] <= exact <= row["upper"]
        assert row["dtype"] == "float32"


def test_safetensors_bfloat16(capsys, tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    weight = torch.randn(16, 12, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file({"proj.weight": weight}, str(path))
    (row,) = run_json(capsys, str(path))
    exact = sigma_max(weight.float().numpy())
    np.testing.assert_allclose(row["sigma"], exact, rtol=1e-5)
    assert row["lower"] <= exact <= row["upper"]


def test_npy_file(capsys, tmp_path):
    path = tmp_path / "w.npy"
    np.save(path, FC2)
    (row,) = run_json(capsys, str(path))
    assert row["name"] == "w"
    np.testing.assert_allclose(row["sigma"], sigma_max(FC2), rtol=1e-5)


def test_pickled_pt_is_refused_without_running_code(capsys, tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(3, 3), "payload": RunsCode()}, path)
    err = run_failing(capsys, "sigma", str(path))
    assert "refused: loading it would run code from the file" in err
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "content", "extra", "message"),
    [
        ("absent.npz", None, [], "no such file"),
        ("w.npz", b"PK\x03\x04 cut short", [], "not a readable NumPy file"),
        ("w.txt", b"1 2 3", [], "unsupported file type '.txt'"),
        ("w.safetensors", b"\x05\x00", [], "not a valid .safetensors file"),
        ("weights.npz", "npz", ["--key", "fc3"], "no tensor named 'fc3'; its tensors are 'fc1', 'bias'"),
        ("w.npz", "6-d", ["--key", "t"], "has shape (1, 1, 1, 1, 2, 2); `lipnorm sigma` takes tensors with 1 to 5 axes"),
        ("vectors.npz", "vectors", [], "no floating-point tensors with 2 to 5 axes; pick a 1-D one with --key"),
        ("weights.npz", "npz", ["--rtol", "0"], "--rtol must be positive"),
    ],
    ids=["missing", "truncated", "wrong-format", "bad-safetensors", "key-not-found", "6-d-key",
         "no-2d", "bad-rtol"],
)
def test_bad_files_give_one_line_and_exit_2(capsys, tmp_path, name, content, extra, message):
    path = tmp_path / name
    if content == "npz":
        np.savez(path, fc1=FC1, bias=BIAS, conv=CONV)
    elif content == "vectors":
        np.savez(path, a=BIAS)
    elif content == "6-d":
        np.savez(path, t=np.ones((1, 1, 1, 1, 2, 2)))
    elif content is not None:
        path.write_bytes(content)
    err = run_failing(capsys, "sigma", str(path), *extra)
    assert message in err


def test_bad_file_from_the_console_has_no_traceback(tmp_path):
    path = tmp_path / "w.npy"
    np.save(path, FC1)
    path.write_bytes(path.read_bytes()[:100])
    result = subprocess.run(
        [sys.executable, "-m", "lipnorm.cli", "sigma", str(path)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("lipnorm: error: ") and result.stderr.count("\n") == 1
    assert "not a readable NumPy file" in result.stderr


def test_tensor_lipnorm_rejects_gets_an_error_row_and_exit_1(capsys, tmp_path):
    bad = FC1.copy()
    bad[0, 0] = np.nan
    path = tmp_path / "w.npz"
    np.savez(path, good=FC2, bad=bad)
    assert main(["sigma", str(path), "--json"]) == 1
    good, failed = json.loads(capsys.readouterr().out)
    assert good["error"] is None and good["sigma"] > 0
    assert failed["name"] == "bad" and failed["sigma"] is None
    assert "NaN" in failed["error"]
    assert main(["sigma", str(path)]) == 1
    assert "error:" in capsys.readouterr().out


def test_sparse_tensor_in_a_checkpoint_gets_an_error_row(capsys, tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "w.pt"
    torch.save({"dense": torch.eye(3), "sparse": torch.eye(3).to_sparse()}, path)
    assert main(["sigma", str(path), "--json"]) == 1
    dense, sparse = json.loads(capsys.readouterr().out)
    assert dense["error"] is None and dense["sigma"] == 1.0
    assert sparse["sigma"] is None and "to_dense()" in sparse["error"]


def test_unknown_method_and_missing_command_are_usage_errors(capsys, npz_file):
    with pytest.raises(SystemExit) as exit_info:
        main(["sigma", str(npz_file), "--method", "qr"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'qr'" in capsys.readouterr().err
    for option, value, message in [
        ("--input-size", "0,3", "expected integers >= 1, got '0,3'"),
        ("--stride", "2,a", "expected integers separated by commas, got '2,a'"),
        ("--padding", "half", "got 'half'; or 'same', 'valid', 'circular'"),
        ("--padding", "-1", "expected integers >= 0, got '-1'; or 'same'"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["sigma", str(npz_file), option, value])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


LONG_NAMES = [
    "encoder.layer.0.attention.self.query.weight",
    "encoder.layer.11.attention.output.dense.weight",
]


@pytest.mark.parametrize("width", [80, 200])
def test_tensor_names_are_never_cut(capsys, tmp_path, monkeypatch, width):
    from rich.console import Console
    from rich.table import Table

    path = tmp_path / "w.npz"
    np.savez(path, **{LONG_NAMES[0]: FC1, LONG_NAMES[1]: FC2, "features.0.weight": CONV})
    monkeypatch.setattr("lipnorm.cli.console.rich_table_console", lambda: (Console(width=width), Table))
    assert main(["sigma", str(path), "--input-size", "6,6"]) == 0
    out = capsys.readouterr().out
    for name in (*LONG_NAMES, "features.0.weight"):
        assert name in out
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= width
    # The columns that matter stay; what is dropped to fit is said.
    assert "reshaped 8×27" in out and "conv operator on 3×6×6" in out
    assert ("not shown to fit the terminal" in out) == (width < 200)
    # Too narrow for one table: each name heads its rows, on a line of its own.
    assert (LONG_NAMES[0] in out.splitlines()) == (width < 200)


def test_non_float_tensors_are_skipped_and_counted_unless_asked_for(capsys, tmp_path):
    path = tmp_path / "w.npz"
    ids = np.arange(512, dtype=np.int64).reshape(1, 512)
    np.savez(path, **{"embeddings.position_ids": ids, "mask": np.eye(3, dtype=bool), "fc": FC1})
    assert main(["sigma", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    assert [row["name"] for row in json.loads(captured.out)] == ["fc"]
    assert "skipped 2 non-float tensors (embeddings.position_ids, mask)" in captured.err
    assert main(["sigma", str(path)]) == 0
    assert "skipped 2 non-float tensors" in capsys.readouterr().out
    rows = run_json(capsys, str(path), "--include-non-float")
    assert [row["name"] for row in rows] == ["embeddings.position_ids", "mask", "fc"]
    assert rows[0]["dtype"] == "int64"
    np.testing.assert_allclose(rows[0]["sigma"], np.linalg.norm(ids.astype(float)), rtol=1e-6)
    assert rows[1]["lower"] <= 1.0 <= rows[1]["upper"]
    err = run_failing(capsys, "sigma", str(path), "--key", "mask")
    assert "'mask' is bool, not floating point" in err and "--include-non-float" in err
    (row,) = run_json(capsys, str(path), "--key", "mask", "--include-non-float")
    assert row["name"] == "mask"


def dense_conv_sigma(kernel: np.ndarray, input_shape, **geometry) -> float:
    """sigma_max of a torch convolution, from its dense matrix (one column per basis input)."""
    torch = pytest.importorskip("torch")
    conv = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d,
            5: torch.nn.functional.conv3d}[kernel.ndim]
    basis = torch.eye(int(np.prod(input_shape)), dtype=torch.float64).reshape(-1, *input_shape)
    outputs = conv(basis, torch.from_numpy(kernel).double(), **geometry)
    return sigma_max(outputs.reshape(len(basis), -1).numpy())


@pytest.mark.parametrize(
    ("kernel_shape", "input_size", "options", "geometry"),
    [
        ((4, 2, 3), "9", [], {}),
        ((8, 3, 3, 3), "6,7", ["--stride", "2", "--padding", "1"], {"stride": 2, "padding": 1}),
        ((6, 2, 3, 3), "5,5", ["--groups", "2", "--dilation", "2", "--padding", "2,1"],
         {"groups": 2, "dilation": 2, "padding": (2, 1)}),
        ((2, 2, 3, 3, 3), "4,4,4", ["--padding", "same"], {"padding": "same"}),
    ],
    ids=["conv1d", "conv2d-stride-padding", "conv2d-groups-dilation", "conv3d-same"],
)
def test_conv_kernels_get_reshaped_and_operator_rows(capsys, tmp_path, kernel_shape, input_size,
                                                     options, geometry):
    kernel = np.random.default_rng(5).standard_normal(kernel_shape)
    path = tmp_path / "w.npz"
    np.savez(path, kernel=kernel)
    reshaped, operator = run_json(capsys, str(path), "--input-size", input_size, *options)
    assert reshaped["measure"] == "reshaped"
    exact = sigma_max(kernel.reshape(kernel_shape[0], -1))
    np.testing.assert_allclose(reshaped["sigma"], exact, rtol=1e-6)
    assert reshaped["lower"] <= exact <= reshaped["upper"]
    groups = geometry.get("groups", 1)
    input_shape = (kernel_shape[1] * groups, *map(int, input_size.split(",")))
    assert operator["measure"] == "conv operator" and operator["sigma"] is None
    assert tuple(operator["input_shape"]) == input_shape
    true_norm = dense_conv_sigma(kernel, input_shape, **geometry)
    assert operator["lower"] <= true_norm * (1 + 1e-12) and true_norm <= operator["upper"]
    assert operator["upper"] <= 1.1 * true_norm


def test_input_size_of_another_rank_adds_no_operator_row(capsys, npz_file):
    rows = run_json(capsys, str(npz_file), "--input-size", "5,5,5")
    assert [row["measure"] for row in rows] == ["matrix", "reshaped", "matrix"]


def test_a_kernel_the_geometry_does_not_fit_gets_an_error_row(capsys, npz_file):
    assert main(["sigma", str(npz_file), "--input-size", "2,2", "--json"]) == 1
    operator = json.loads(capsys.readouterr().out)[2]
    assert operator["measure"] == "conv operator" and operator["error"]


def test_estimate_is_printed_to_its_precision_and_the_interval_outward(capsys, tmp_path):
    """A float32 estimate and its float64 interval print without contradicting each other.

    The estimate carries float32's rounding and the interval's ends are float64, so the
    estimate can fall just outside the interval; printed (6 digits, the ends rounded
    outward), the two never disagree by more than half a printed unit.
    """
    import re

    path = tmp_path / "w.npz"
    matrix = np.random.default_rng(0).standard_normal((1024, 512), dtype=np.float32)
    np.savez(path, w=matrix)
    exact = sigma_max(matrix)
    (row,) = run_json(capsys, str(path))
    assert main(["sigma", str(path)]) == 0
    out = capsys.readouterr().out
    estimate, lower, upper = re.search(r"│ (\S+) │ \[(\S+), (\S+)\]", out).groups()
    assert float(lower) <= row["lower"] and row["upper"] <= float(upper)
    assert float(lower) <= exact <= float(upper)
    assert len(estimate.replace(".", "").lstrip("0")) == 6  # rtol 1e-6: 6 significant digits
    half_unit = 0.5 * 10 ** (np.floor(np.log10(exact)) - 5)
    assert float(lower) - half_unit <= float(estimate) <= float(upper) + half_unit
    assert "printed to 6 significant digits" in out and "rounded outward" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lipnorm {lipnorm.__version__}"


def test_demo_sections_agree_with_the_svd(monkeypatch, tmp_path):
    """The demo on small matrices: every interval holds the SVD value, every section runs."""
    from rich.console import Console

    import lipnorm.demo
    import lipnorm.demo.sigma
    from lipnorm.demo.torch_cnn import CERTIFICATE_PLOT

    small = {
        "gaussian": np.random.default_rng(0).standard_normal((60, 50), dtype=np.float32),
        "diagonal": np.diag(np.linspace(1.0, 2.0, 40)),
    }
    monkeypatch.setattr(lipnorm.demo.sigma, "sigma_matrices", lambda seed=0: small)
    console = Console(record=True, width=150)
    lipnorm.demo.run_demo(console, tmp_path)
    text = console.export_text()
    for section in lipnorm.demo.SECTIONS:
        assert section.title in text
    assert "Skipped" not in text  # the test install has every framework
    assert text.count("yes") == len(small) and "NO" not in text
    assert f"{sigma_max(small['gaussian']):.8g}" in text
    assert "upper bound:" in text and "lower bound:" in text
    assert (tmp_path / CERTIFICATE_PLOT).stat().st_size > 0


def test_demo_command_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lipnorm.cli", "demo", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("yes") == 4 and " NO" not in result.stdout
    assert "Skipped" not in result.stdout


def test_demo_refuses_a_missing_output_directory(capsys, tmp_path):
    run_failing(capsys, "demo", "--output-dir", str(tmp_path / "missing"))


def test_installed_console_script_and_single_sourced_version():
    """pyproject's entry point and version: checked where lipnorm is installed (make test)."""
    from importlib import metadata

    try:
        installed = metadata.version("lipnorm")
    except metadata.PackageNotFoundError:
        pytest.skip("lipnorm is not installed (run through make test)")
    assert installed == lipnorm.__version__
    script = Path(sys.executable).parent / "lipnorm"
    assert script.exists(), f"console script missing next to {sys.executable}"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"lipnorm {lipnorm.__version__}"


def test_interval_ends_are_rounded_outward_exactly():
    """The printed ends of an interval never cut into it, whatever the float."""
    from decimal import Decimal

    from lipnorm.cli.sigma_table import _significant

    values = np.random.default_rng(2).lognormal(0, 8, size=2000)
    for value in [*values, 54.58703129197087, 4.9999999999999999, 1e-300, 9.999999999999e20]:
        assert Decimal(_significant(value, 7, "down")) <= Decimal(value)
        assert Decimal(value) <= Decimal(_significant(value, 7, "up"))
    assert _significant(54.587032318115234, 6, "nearest") == "54.5870"


# --- checkpoints: low-precision dtypes, scales, packed integers, shards ---


def save_torch_safetensors(path: Path, tensors: dict) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file({name: t.contiguous() for name, t in tensors.items()}, str(path))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float8_e4m3fn", "float8_e5m2"])
def test_low_precision_tensors_show_their_own_dtype_and_are_measured_exactly(capsys, tmp_path, dtype):
    torch = pytest.importorskip("torch")
    weight = (torch.randn(48, 40, generator=torch.Generator().manual_seed(3)) * 8).to(getattr(torch, dtype))
    path = tmp_path / "w.safetensors"
    save_torch_safetensors(path, {"proj.weight": weight})
    (row,) = run_json(capsys, str(path))
    assert row["dtype"] == dtype and row["dequantized"] is None
    exact = sigma_max(weight.float().numpy())  # the stored values, widened exactly
    np.testing.assert_allclose(row["sigma"], exact, rtol=1e-5)
    assert row["lower"] <= exact <= row["upper"]
    assert main(["sigma", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"│ {dtype} " in out and "printed to 6 significant digits" in out  # float32's precision


def test_fp8_with_block_scales_is_measured_as_the_models_matrix(capsys, tmp_path):
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(260, 140, generator=generator) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 2, generator=generator) / 100
    path = tmp_path / "fp8.safetensors"
    save_torch_safetensors(path, {"mlp.weight": weight, "mlp.weight_scale_inv": scale})
    (row,) = run_json(capsys, str(path))
    assert row["name"] == "mlp.weight" and row["dtype"] == "float8_e4m3fn"
    assert row["dequantized"] == "× weight_scale_inv per 128×128 block"
    blocks = scale.repeat_interleave(128, 0)[:260].repeat_interleave(128, 1)[:, :140]
    exact = sigma_max((weight.float() * blocks).numpy())
    np.testing.assert_allclose(row["sigma"], exact, rtol=1e-5)
    assert row["lower"] <= exact <= row["upper"]
    assert main(["sigma", str(path)]) == 0
    out = capsys.readouterr().out
    assert "matrix × weight_scale_inv per 128×128 block" in out
    assert "× scale: a float8 or int8 weight times its scale tensor" in out


def test_packed_quantizations_are_skipped_counted_and_explained(capsys, tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "gptq.safetensors"
    save_torch_safetensors(path, {
        "layer.qweight": torch.zeros(16, 64, dtype=torch.int32),
        "layer.qzeros": torch.zeros(1, 8, dtype=torch.int32),
        "layer.scales": torch.ones(1, 64, dtype=torch.float16),
        "lm_head.weight": torch.from_numpy(FC2),
    })
    assert main(["sigma", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    assert [row["name"] for row in json.loads(captured.out)] == ["lm_head.weight"]
    assert ("skipped 3 tensors of packed integer quantizations (layer.qweight, layer.qzeros, "
            "layer.scales), which lipnorm does not unpack") in captured.err
    err = run_failing(capsys, "sigma", str(path), "--key", "layer.qweight")
    assert ("tensor 'layer.qweight' is a packed int32 quantization (GPTQ/AWQ qweight), which "
            "lipnorm does not unpack") in err


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    """A checkpoint of two shards and their index; returns the index."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    shards = {"model-00001-of-00002.safetensors": {"fc1": FC1, "bias": BIAS},
              "model-00002-of-00002.safetensors": {"fc2": FC2}}
    for name, arrays in shards.items():
        safetensors_numpy.save_file(arrays, str(tmp_path / name))
    weight_map = {name: shard for shard, arrays in shards.items() for name in arrays}
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def test_a_sharded_checkpoint_is_one_model(capsys, sharded):
    for path in (sharded, sharded.parent):
        rows = run_json(capsys, str(path))
        assert [row["name"] for row in rows] == ["fc1", "fc2"]
        for row, tensor in zip(rows, (FC1, FC2)):
            np.testing.assert_allclose(row["sigma"], sigma_max(tensor), rtol=1e-5)


def test_bad_checkpoints_give_one_line_naming_the_file_and_tensor(capsys, sharded):
    index = json.loads(sharded.read_text())
    index["weight_map"]["head"] = "model-00003-of-00003.safetensors"
    sharded.write_text(json.dumps(index))
    err = run_failing(capsys, "sigma", str(sharded))
    assert "model.safetensors.index.json: names shard 'model-00003-of-00003.safetensors', which is missing" in err
    # safetensors knows this dtype, lipnorm does not read it.
    path = sharded.parent / "mx.safetensors"
    header = b'{"w": {"dtype": "F8_E8M0", "shape": [2, 2], "data_offsets": [0, 4]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    err = run_failing(capsys, "sigma", str(path))
    assert f"{path}: tensor 'w' has dtype F8_E8M0, which lipnorm cannot read" in err


@pytest.mark.parametrize(
    "header",
    [b'{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 64]}}',
     b'{"w": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}}',
     b'{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}',
     b'{"w": {"dtype": "Q4", "shape": [2, 2], "data_offsets": [0, 16]}}'],
    ids=["offsets-past-the-end", "shape-vs-offsets", "offsets-leave-a-gap", "unknown-dtype"],
)
def test_a_header_that_lies_is_one_line_and_exit_2_from_the_console(tmp_path, header):
    path = tmp_path / "w.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    result = subprocess.run(
        [sys.executable, "-m", "lipnorm.cli", "sigma", str(path)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"lipnorm: error: {path}: ") and result.stderr.count("\n") == 1


def test_an_expert_stack_without_stack_says_what_was_measured(capsys, tmp_path):
    path = tmp_path / "moe.npz"
    experts = RNG.standard_normal((8, 64, 128)).astype(np.float32)
    np.savez(path, **{"mlp.experts.w1": experts})
    (row,) = run_json(capsys, str(path))
    assert row["measure"] == "reshaped"
    np.testing.assert_allclose(row["sigma"], sigma_max(experts.reshape(8, -1)), rtol=1e-5)
    assert main(["sigma", str(path)]) == 0
    out = capsys.readouterr().out
    assert "reshaped 8×8192" in out and "kernel" not in out.split("\n")[3]
    assert "for a stack of matrices (experts, heads), --stack measures each matrix" in out


def test_no_bounds_gives_estimates_only(capsys, npz_file):
    rows = run_json(capsys, str(npz_file), "--no-bounds")
    for row, tensor in zip(rows, (FC1, CONV, FC2)):
        np.testing.assert_allclose(row["sigma"], sigma_max(tensor.reshape(len(tensor), -1)), rtol=1e-5)
        assert row["lower"] is None and row["upper"] is None and row["bounds_method"] is None
        assert row["bounds_seconds"] is None and row["sigma_seconds"] >= 0
    assert main(["sigma", str(npz_file), "--no-bounds"]) == 0
    out = capsys.readouterr().out
    assert "certified interval ┃" not in out and "No certified interval (--no-bounds)." in out


def test_json_has_the_frobenius_norm_and_the_stable_rank(capsys, npz_file):
    rows = run_json(capsys, str(npz_file))
    for row, tensor in zip(rows, (FC1, CONV, FC2)):
        frobenius = float(np.linalg.norm(tensor.astype(np.float64)))
        np.testing.assert_allclose(row["frobenius"], frobenius, rtol=1e-12)
        np.testing.assert_allclose(row["stable_rank"], frobenius**2 / sigma_max(tensor.reshape(len(tensor), -1))**2,
                                   rtol=1e-5)
        assert 1 <= row["stable_rank"] <= min(tensor.shape[0], tensor[0].size)


def test_a_progress_bar_runs_over_the_tensors_on_a_terminal(capsys, npz_file, monkeypatch):
    import io

    from rich.console import Console

    terminal = io.StringIO()
    monkeypatch.setattr("lipnorm.cli.sigma._progress_console",
                        lambda: Console(file=terminal, force_terminal=True, width=100))
    rows = run_json(capsys, str(npz_file))  # stdout is the JSON alone
    assert len(rows) == 3
    shown = terminal.getvalue()
    assert "3/3 fc2" in shown  # the last refresh: (3 of 3 tensors) measuring fc2
    assert shown.endswith("\x1b[2K")  # erased when done


# --- stacks of matrices: --stack ---


def test_stack_measures_each_matrix_of_the_last_two_axes(capsys, tmp_path):
    experts = RNG.standard_normal((8, 64, 128)).astype(np.float32)
    heads = RNG.standard_normal((2, 3, 16, 24))
    path = tmp_path / "moe.npz"
    np.savez(path, **{"mlp.experts.w1": experts, "attn.heads": heads, "fc": FC1})
    rows = run_json(capsys, str(path), "--stack")
    assert [row["measure"] for row in rows] == ["stack", "stack", "matrix"]
    for row, stack in zip(rows, (experts, heads)):
        exact = np.linalg.svd(stack.astype(np.float64), compute_uv=False)[..., 0]
        assert np.shape(row["sigmas"]) == stack.shape[:-2]
        np.testing.assert_allclose(row["sigmas"], exact, rtol=1e-5)
        np.testing.assert_allclose(row["sigma"], exact.max(), rtol=1e-5)
        assert row["lower"] <= exact.max() <= row["upper"]
        assert row["upper"] / row["lower"] <= 1 + 1e-3
        frobenius = np.linalg.norm(stack.astype(np.float64), axis=(-2, -1))
        np.testing.assert_allclose(row["frobenius_norms"], frobenius, rtol=1e-12)
        np.testing.assert_allclose(row["stable_ranks"], frobenius**2 / exact**2, rtol=1e-4)
        assert row["frobenius"] is None and row["stable_rank"] is None
    assert rows[2]["sigmas"] is None and rows[2]["frobenius"] > 0
    assert main(["sigma", str(path), "--stack"]) == 0
    out = capsys.readouterr().out
    assert "stack of 8 64×128" in out and "stack of 6 16×24" in out
    assert "stack: each matrix of the last two axes; sigma and the interval are of the largest" in out


def test_stack_takes_any_number_of_leading_axes_and_no_bounds(capsys, tmp_path):
    stack = RNG.standard_normal((2, 1, 2, 1, 3, 5))
    path = tmp_path / "w.npz"
    np.savez(path, t=stack)
    err = run_failing(capsys, "sigma", str(path), "--key", "t")
    assert "takes tensors with 1 to 5 axes (or more with --stack)" in err
    (row,) = run_json(capsys, str(path), "--key", "t", "--stack", "--no-bounds")
    exact = np.linalg.svd(stack, compute_uv=False)[..., 0]
    np.testing.assert_allclose(row["sigmas"], exact, rtol=1e-6)
    assert row["lower"] is None and row["upper"] is None


def test_a_nan_in_one_matrix_of_a_stack_gets_an_error_row(capsys, tmp_path):
    stack = RNG.standard_normal((4, 6, 5))
    stack[2, 1, 3] = np.nan
    path = tmp_path / "w.npz"
    np.savez(path, experts=stack, fc=FC1)
    assert main(["sigma", str(path), "--stack", "--json"]) == 1
    bad, good = json.loads(capsys.readouterr().out)
    assert bad["sigma"] is None and bad["sigmas"] is None
    assert "matrix [2] of the stack" in bad["error"] and "NaN" in bad["error"]
    assert good["error"] is None
