"""estimate_sigma and sigma_bounds on every backend: values, namespace, dtype, state."""

from __future__ import annotations

import numpy as np
import pytest

import lipnorm
from lipnorm._xp import library_name
from tests.helpers import (
    assert_contains,
    assert_relative_close,
    assert_scalar_of,
    dtype_name,
    true_sigma,
)

RNG = np.random.default_rng(20261125)
MATRIX = RNG.standard_normal((37, 23))
COMPLEX_MATRIX = MATRIX + 1j * RNG.standard_normal((37, 23))


def _real_name(dtype: np.dtype) -> str:
    return {"complex64": "float32", "complex128": "float64"}.get(dtype.name, dtype.name)


@pytest.mark.parametrize("method", ["lanczos", "power", "svd", "auto"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.complex64, np.complex128])
def test_estimate_in_own_namespace_and_dtype(backend, method, dtype):
    values = (COMPLEX_MATRIX if np.dtype(dtype).kind == "c" else MATRIX).astype(dtype)
    weight = backend.asarray(values)
    sigma = lipnorm.estimate_sigma(weight, method=method, seed=0)
    assert_scalar_of(sigma, backend, _real_name(np.dtype(dtype)))
    single_precision = dtype in (np.float32, np.complex64)
    precision = 2e-6 if single_precision else 1e-6
    assert_relative_close(float(sigma), true_sigma(values), precision, f"{backend}/{method}")


def test_bounds_contain_truth(backend):
    values = MATRIX.astype(np.float32)
    interval = lipnorm.sigma_bounds(backend.asarray(values))
    assert_contains(interval, true_sigma(values))
    assert interval.upper / interval.lower <= 1 + 1e-3


def test_state_stays_in_namespace_and_warm_starts(backend):
    weight = backend.asarray(MATRIX)
    sigma, state = lipnorm.estimate_sigma(weight, method="lanczos", return_state=True, seed=1)
    assert state.converged
    # Dask keeps the (large) matrix lazy and its (small) vectors in NumPy.
    vector_library = "numpy" if backend.name == "dask" else backend.name
    assert library_name(state.u) == vector_library
    assert library_name(state.v) == vector_library
    assert tuple(state.v.shape) == (MATRIX.shape[1],)
    nudged_values = MATRIX + 1e-4 * RNG.standard_normal(MATRIX.shape)
    nudged = backend.asarray(nudged_values)
    _, warm = lipnorm.estimate_sigma(nudged, method="power", state=state, return_state=True)
    _, cold = lipnorm.estimate_sigma(nudged, method="power", return_state=True, seed=2)
    assert warm.converged
    assert warm.iterations < cold.iterations, (warm.iterations, cold.iterations)
    assert_relative_close(warm.sigma, true_sigma(nudged_values), 1e-6, "warm start")


def test_low_precision_is_computed_in_float32_and_returned_in_own_dtype(backend):
    if backend.name in {"array_api_strict", "dask", "jax"}:
        pytest.skip(f"{backend.name} test arrays here carry no half-precision dtype")
    if backend.name == "torch":
        import torch

        weight = torch.asarray(MATRIX, dtype=torch.bfloat16)
        expected_dtype = "bfloat16"
    else:
        weight = backend.asarray(MATRIX.astype(np.float16))
        expected_dtype = "float16"
    sigma = lipnorm.estimate_sigma(weight)
    assert dtype_name(sigma.dtype) == expected_dtype
    assert_relative_close(float(sigma), true_sigma(weight), 1e-2, "half precision")


def test_integers_are_promoted(backend):
    values = np.arange(12, dtype=np.int64).reshape(3, 4)
    sigma = lipnorm.estimate_sigma(backend.asarray(values))
    assert_relative_close(float(sigma), true_sigma(values.astype(float)), 1e-6, "int64")


def test_zero_matrix_is_zero_not_nan(backend):
    weight = backend.asarray(np.zeros((40, 50)))
    for method in ("lanczos", "power", "svd"):
        assert float(lipnorm.estimate_sigma(weight, method=method)) == 0.0
    assert tuple(lipnorm.sigma_bounds(weight)) == (0.0, 0.0)


def test_vector_norm_and_dim_rule(backend):
    vector = RNG.standard_normal(17)
    sigma = lipnorm.estimate_sigma(backend.asarray(vector))
    assert_relative_close(float(sigma), float(np.linalg.norm(vector)), 1e-12, "1-D")
    kernel = RNG.standard_normal((4, 3, 2, 5))
    for dim in (0, 1, -1):
        moved = np.moveaxis(kernel, dim, 0).reshape(kernel.shape[dim], -1)
        sigma = lipnorm.estimate_sigma(backend.asarray(kernel), dim=dim)
        assert_relative_close(float(sigma), true_sigma(moved), 1e-6, f"dim={dim}")
