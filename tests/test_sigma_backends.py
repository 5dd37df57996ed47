"""estimate_sigma and sigma_bounds on every backend: values, namespace, dtype, state."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import lipnorm
from lipnorm._xp import array_namespace, device_of, library_name
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


def test_integer_bounds_hold_for_the_integers_as_given(backend):
    """Integers are certified as stored, not as the compute dtype rounds them (float32
    holds integers exactly only up to 2**24)."""
    top = 2**24 + 1
    lower, upper = lipnorm.sigma_bounds(backend.asarray(np.array([[top, 0], [0, 1]], dtype=np.int64)))
    assert lower <= top <= upper, (lower, upper)


def test_sigma_beyond_the_output_dtype_is_an_error_not_inf(backend):
    if backend.name == "array_api_strict":
        pytest.skip("array_api_strict has no float16")
    weight = backend.asarray(np.full((100, 100), 1000.0, dtype=np.float16))  # sigma = 1e5
    for method in ("svd", "lanczos"):
        with pytest.raises(ValueError, match="does not fit in .*float16"):
            lipnorm.estimate_sigma(weight, method=method)


@pytest.mark.parametrize(("dtype", "entry"), [(np.float32, 1e38), (np.float64, 1e308)])
def test_sigma_beyond_single_and_double_range_is_an_error(dtype, entry):
    with pytest.raises(ValueError, match="does not fit in float"):
        lipnorm.estimate_sigma(np.full((4, 4), entry, dtype=dtype), method="svd")


#: Largest entries near the ends of each dtype's range, subnormal numbers included, where
#: every sigma still fits in the dtype.
EXTREME_SCALES = [
    (np.float32, 1e-44), (np.float32, 1e-39), (np.float32, 1e-25), (np.float32, 1e25),
    (np.float32, 1e36), (np.float64, 1e-320), (np.float64, 1e-300), (np.float64, 1e300),
]


@pytest.mark.parametrize("method", ["lanczos", "power"])
@pytest.mark.parametrize(("dtype", "largest"), EXTREME_SCALES)
def test_matrices_at_the_ends_of_the_float_range(backend, method, dtype, largest):
    """Products of such matrices underflow to subnormals or overflow; the iteration runs on
    the matrix scaled by a power of two instead, and keeps its accuracy."""
    values = (MATRIX / np.abs(MATRIX).max() * largest).astype(dtype)
    weight = backend.asarray(values)
    xp = array_namespace(weight)
    if float(xp.max(xp.abs(weight))) == 0.0:
        pytest.skip(f"{backend.name}'s arithmetic flushes subnormal {np.dtype(dtype).name} to zero")
    _, state = lipnorm.estimate_sigma(weight, method=method, return_state=True, seed=0)
    assert state.converged
    precision = 2e-6 if dtype == np.float32 else 1e-6
    assert_relative_close(state.sigma, true_sigma(values), precision, f"{backend}/{method}")


def test_operators_out_of_their_dtype_range_are_an_error():
    """An operator cannot be scaled from outside: its subnormal products are refused."""
    import scipy.sparse.linalg

    values = (MATRIX / np.abs(MATRIX).max() * 1e-40).astype(np.float32)
    operator = scipy.sparse.linalg.aslinearoperator(values)
    with pytest.raises(ValueError, match="scale it by a power of two"):
        lipnorm.estimate_sigma(operator, method="lanczos", seed=0)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_warm_start_in_the_null_space_of_a_pruned_weight(backend, method):
    """A state whose vector the new weight maps to zero (the weight was pruned along it)
    restarts from a random vector instead of reporting sigma = 0."""
    values = np.diag([3.0, 1.0, 0.5])
    _, state = lipnorm.estimate_sigma(backend.asarray(values), method=method, return_state=True, seed=0)
    # The state's right vector, e_1 up to rounding, set to e_1 exactly; the pruning removes column 1.
    xp = array_namespace(state.v)  # NumPy for Dask, whose vectors are NumPy arrays
    exact = xp.asarray([1.0, 0.0, 0.0], dtype=state.v.dtype, device=device_of(state.v))
    state = dataclasses.replace(state, v=exact)
    pruned = values.copy()
    pruned[:, 0] = 0.0
    sigma, warm = lipnorm.estimate_sigma(
        backend.asarray(pruned), method=method, state=state, return_state=True, seed=1
    )
    assert_relative_close(float(sigma), 1.0, 1e-6, f"{backend}/{method}")
    assert warm.converged


def test_lanczos_stops_on_the_gap_from_a_random_start_and_on_the_residual_when_warm():
    """With sigma_max apart from the rest, the gap rule's error estimate (about
    residual**2 / (4 gap)) reaches rtol long before the residual does; the default residual
    rule runs on, and a warm start stops on the residual alone even with stop="gap"."""
    rng = np.random.default_rng(7)
    left = np.linalg.qr(rng.standard_normal((400, 300)))[0]
    right = np.linalg.qr(rng.standard_normal((300, 300)))[0]
    matrix = (left * 0.98 ** np.arange(300)) @ right.T  # sigma_max = 1, relative gap 0.02
    rtol = 1e-8
    sigma, cold = lipnorm.estimate_sigma(matrix, method="lanczos", rtol=rtol, seed=0, return_state=True,
                                         stop="gap")
    assert cold.converged
    assert cold.error <= rtol * cold.sigma < cold.residual, (cold.error, cold.residual)
    assert_relative_close(float(sigma), 1.0, rtol, "gap rule")
    _, residual = lipnorm.estimate_sigma(matrix, method="lanczos", rtol=rtol, seed=0, return_state=True)
    assert residual.error == residual.residual <= rtol * residual.sigma
    assert residual.matvecs > cold.matvecs
    _, warm = lipnorm.estimate_sigma(matrix, method="lanczos", rtol=rtol, state=cold, return_state=True,
                                     stop="gap")
    assert warm.converged
    assert warm.error == warm.residual <= rtol * warm.sigma, (warm.error, warm.residual)


@pytest.mark.parametrize("count", [1, 3, 50])
@pytest.mark.parametrize("k", [1, 2, 3, 40, 200])
def test_top_ritz_pairs_of_tridiagonals_match_a_dense_eigendecomposition(k, count):
    """Lanczos's top two eigenpairs of its tridiagonals (LAPACK's MRRR one by one for a few,
    one batched dense eigh for many) agree with NumPy's eigh, vectors up to sign; scaled
    near the double-precision range."""
    from lipnorm.krylov import _top_eigenpairs

    rng = np.random.default_rng(k)
    for scale in (1.0, 1e250, 1e-250):
        diagonal = scale * (0.5 + rng.random((count, k)))
        beside = scale * rng.random((count, k - 1))
        values, vectors = _top_eigenpairs(diagonal, beside)
        for i in range(count):
            dense = np.diag(diagonal[i] / scale) + np.diag(beside[i] / scale, 1) + np.diag(beside[i] / scale, -1)
            reference_values, reference_vectors = np.linalg.eigh(dense)
            for j in range(min(2, k)):
                assert_relative_close(values[i, j] / scale, reference_values[-1 - j], 1e-13, f"k={k} value {j}")
                np.testing.assert_allclose(np.abs(vectors[i, :, j]), np.abs(reference_vectors[:, -1 - j]),
                                           atol=1e-8)
            if k == 1:
                assert values[i, 1] == -np.inf
