"""Run the Keras test modules (SN, constraint) under the Keras backends this process is not using.

Keras fixes its backend per process (KERAS_BACKEND), so the other backends run
in subprocesses; a failure names the backend and shows that run's report.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

keras = pytest.importorskip("keras")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("test_keras_sn.py", "test_keras_sn_upstream.py", "test_keras_constraint.py")
FRAMEWORK = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
OTHER_BACKENDS = [b for b in FRAMEWORK if b != keras.backend.backend()]


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_keras_sn_suite_on_backend(backend, module):
    if importlib.util.find_spec(FRAMEWORK[backend]) is None:
        pytest.skip(f"{FRAMEWORK[backend]} is not installed")
    env = dict(
        os.environ,
        KERAS_BACKEND=backend,
        PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
    )
    env.setdefault("OMP_NUM_THREADS", "1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", os.path.join(ROOT, "tests", module), "-q", "-p",
         "no:cacheprovider", "-x"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (
        f"tests/{module} failed with KERAS_BACKEND={backend}:\n"
        + result.stdout[-6000:]
        + result.stderr[-2000:]
    )
