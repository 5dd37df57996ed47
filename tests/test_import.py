"""``import lipnorm`` loads no deep-learning framework (checked in a fresh process)."""

from __future__ import annotations

import subprocess
import sys

FRAMEWORKS = ("torch", "tensorflow", "jax", "keras", "cupy", "dask", "onnx", "onnxruntime")


def test_import_loads_no_framework():
    code = (
        "import sys, lipnorm, lipnorm.operators, lipnorm.sigma, lipnorm.krylov, lipnorm.certificates\n"
        f"print(','.join(m for m in {FRAMEWORKS!r} if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "", f"import lipnorm loaded: {loaded}"


def test_numpy_use_loads_no_framework():
    code = (
        "import sys, numpy as np, lipnorm\n"
        "lipnorm.estimate_sigma(np.eye(3)); lipnorm.sigma_bounds(np.eye(3))\n"
        f"print(','.join(m for m in {FRAMEWORKS!r} if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "", f"estimate_sigma on NumPy loaded: {loaded}"
