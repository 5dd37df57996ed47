"""Test configuration: the ``xp`` backend fixture and Hypothesis profiles.

Backends: numpy, array_api_strict, array_api_strict-device1, torch, tensorflow,
jax, dask. ``array_api_strict-device1`` is array_api_strict with every array on its
second device, ``array_api_strict.Device("device1")``: arrays of two devices cannot
be combined there, so it catches what a GPU would (a start vector, a result or a
state on the default device) without one. A backend that is not installed is
skipped, unless it is named in the comma-separated environment variable
``LIPNORM_TEST_BACKENDS`` (CI names all of them): then its absence is an error. Hypothesis: ``HYPOTHESIS_PROFILE=ci`` (set by ``make test``
when ``CI=true``) runs the numeric properties with 500 examples each, the same ones
on every run.
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# CI draws the same examples on every run (derandomize): a failure there reproduces locally
# with HYPOTHESIS_PROFILE=ci, and a change cannot fail on examples it never met. The dev
# profile keeps drawing new ones, so local runs go on exploring.
settings.register_profile(
    "ci", deadline=None, print_blob=True, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

#: The backends' test ids, ``library`` or ``library-device``: every library on its default
#: device, array_api_strict also on a second one.
BACKEND_IDS = (
    "numpy", "array_api_strict", "array_api_strict-device1", "torch", "tensorflow", "jax", "dask"
)


def required_backends() -> set[str]:
    """Backends whose absence must fail the run (``LIPNORM_TEST_BACKENDS``)."""
    names = os.environ.get("LIPNORM_TEST_BACKENDS", "")
    return {name.strip() for name in names.split(",") if name.strip()}


def import_backend(name: str):
    """Import a backend's module, skipping (or failing, if required) when missing."""
    module_name = {"dask": "dask.array", "jax": "jax.numpy"}.get(name, name)
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        if name in required_backends():
            pytest.fail(f"backend {name!r} is required by LIPNORM_TEST_BACKENDS but: {error}")
        pytest.skip(f"{name} is not installed")


class Backend:
    """One array library under test, on one device: converts NumPy test data into its arrays.

    ``name`` is the library's (what ``lipnorm._xp.library_name`` reports); ``device`` is
    the device its arrays are made on (None: the library's default).
    """

    def __init__(self, test_id: str) -> None:
        self.test_id = test_id
        name, _, device = test_id.partition("-")
        self.name = name
        self.module = import_backend(name)
        self.device = self.module.Device(device) if device else None
        if name == "jax":
            import jax  # the module under test is jax.numpy

            jax.config.update("jax_enable_x64", True)

    def asarray(self, values: np.ndarray):
        """``values`` as an array of this library, with the same dtype."""
        values = np.asarray(values)
        if self.name == "torch":
            return self.module.asarray(values.copy())
        if self.name == "tensorflow":
            return self.module.constant(values)
        if self.name == "dask":
            chunks = tuple(max(1, (s + 1) // 2) for s in values.shape)
            return self.module.from_array(values, chunks=chunks)
        if self.device is not None:
            return self.module.asarray(values, device=self.device)
        return self.module.asarray(values)

    def __repr__(self) -> str:
        return self.test_id


@pytest.fixture(params=BACKEND_IDS)
def backend(request) -> Backend:
    """Each array library in turn (test ids: numpy, array_api_strict,
    array_api_strict-device1, torch, ...)."""
    return Backend(request.param)
