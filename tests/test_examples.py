"""The scripts of examples/ run, in their fast mode, as a user runs them: ``python SCRIPT --fast``.

Each runs in its own process (the Keras example picks its backend before importing Keras)
and in a temporary directory (they write checkpoints, ONNX files and plots there), and its
output is checked for what docs/examples.md says it shows.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, cwd: Path) -> str:
    """Run ``examples/NAME --fast ARGS`` in ``cwd``; return its stdout, failing with its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join([str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--fast", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr[-3000:]}"
    return result.stdout


def test_every_example_is_tested():
    tested = {"sngan_digits_torch.py", "critic_digits_keras_jax.py",
              "checkpoint_sigma_histogram.py", "certify_onnx_cli.py", "certified_robustness.py",
              "constraint_training_torch.py"}
    assert {path.name for path in EXAMPLES.glob("*.py")} == tested


def test_sngan_digits_torch(tmp_path):
    pytest.importorskip("sklearn")
    out = run_example("sngan_digits_torch.py", "--plot", "norms.png", cwd=tmp_path)
    rows = re.findall(r"^(\d+)\s+\[(\S+), (\S+)\]\s+\[(\S+), (\S+)\]$", out, re.MULTILINE)
    assert [row[0] for row in rows] == ["0", "2", "4"]
    for _, lipnorm_lower, lipnorm_upper, torch_lower, _ in rows:
        # Operator mode: each convolution's certified norm contains 1 (4 printed digits);
        # the stride-2 one's upper bound is certified, not exact, hence the slack above.
        assert float(lipnorm_lower) <= 1.0001 and 0.9999 <= float(lipnorm_upper) <= 1.05
        # torch's spectral norm leaves each convolution's norm above 1.
        assert float(torch_lower) > 1.1
    assert (tmp_path / "norms.png").stat().st_size > 1000


def test_critic_digits_keras_jax(tmp_path):
    pytest.importorskip("jax")
    pytest.importorskip("keras")
    out = run_example("critic_digits_keras_jax.py", cwd=tmp_path)
    assert out.startswith("backend jax:")
    upper = float(re.search(r"upper bound: (\S+)", out).group(1))
    product = float(re.search(r"^product\s+(\S+)", out, re.MULTILINE).group(1))
    assert 0.9 <= product <= 1.06  # every normalized layer is 1-Lipschitz
    assert upper <= product  # the ladder's tighter methods only improve on it


def test_checkpoint_sigma_histogram(tmp_path):
    pytest.importorskip("safetensors")
    out = run_example("checkpoint_sigma_histogram.py", "--plot", "hist.png", cwd=tmp_path)
    assert "9 tensors measured in model.safetensors" in out
    assert "embeddings.weight" in out and "position_ids" not in out
    assert (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "hist.png").stat().st_size > 1000


def test_certify_onnx_cli(tmp_path):
    pytest.importorskip("onnx")
    out = run_example("certify_onnx_cli.py", cwd=tmp_path)
    assert "$ lipnorm certify digits_cnn.onnx" in out
    printed = float(re.search(r"certified upper bound: (\S+)", out).group(1))
    stored = float(re.search(r"Lipschitz constant <= (\S+)", out).group(1))
    assert printed == pytest.approx(stored, rel=1e-5)
    assert (tmp_path / "certificate.png").stat().st_size > 1000


def test_certified_robustness(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("foolbox")
    out = run_example("certified_robustness.py", cwd=tmp_path)
    clean, certified, attacked = (float(v) for v in re.search(
        r"clean (\S+), certified at eps 0.5 (\S+), under attack (\S+)", out).groups())
    assert certified <= attacked <= clean  # certified <= empirical <= clean
    assert "pairwise L_yj by" in out
    assert (tmp_path / "robustness.png").stat().st_size > 1000


def test_constraint_training_torch(tmp_path):
    pytest.importorskip("sklearn")
    out = run_example("constraint_training_torch.py", cwd=tmp_path)
    pattern = r"^{}: test accuracy (\S+), Lipschitz constant <= (\S+) \(product of the layers' bounds (\S+)\)$"
    accuracy, upper, product = map(float, re.search(pattern.format("constrained"), out, re.MULTILINE).groups())
    sigmas = [float(value) for value in re.findall(r"\d\.weight (\d\.\d+)", out)]
    assert len(sigmas) == 3 and max(sigmas) <= 1.001  # every weight certified under the cap
    assert upper <= product <= 1.001**3 and accuracy >= 0.8
    _, free_upper, _ = map(float, re.search(pattern.format("unconstrained"), out, re.MULTILINE).groups())
    assert free_upper > 1.5  # without the constraint the network's bound is not held
