"""Hypothesis properties of estimate_sigma and sigma_bounds against scipy's SVD.

Matrices: shapes 1..300 x 1..300, ranks 0..full, scales 1e-20..1e20, four kinds
of spectra (Gaussian, clustered, repeated top value, geometrically decaying),
float32/float64/complex64/complex128. Run on NumPy, on array_api_strict (which
proves the core uses only the array API standard, hence runs on CuPy) and on
array_api_strict's second device, which refuses to combine arrays of two devices.

What ``rtol`` promises (see ``estimate_sigma``; the default residual rule): a converged
estimate is never above sigma_max and is within ``rtol`` of sigma_max itself where the top
singular value stands apart (here: a relative gap of at least ``100 rtol``), and within
``rtol`` of a singular value wherever the residual is.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lipnorm
from tests.helpers import (
    NUMERIC_EXAMPLES,
    assert_contains,
    assert_converged_estimate,
    singular_values,
    true_sigma,
)

DTYPES = (np.float32, np.float64, np.complex64, np.complex128)
SPECTRA = ("gaussian", "clustered", "repeated", "decaying")


def _orthonormal(rng: np.random.Generator, rows: int, cols: int, complex_dtype: bool) -> np.ndarray:
    gaussian = rng.standard_normal((rows, cols))
    if complex_dtype:
        gaussian = gaussian + 1j * rng.standard_normal((rows, cols))
    return np.linalg.qr(gaussian)[0]


def _singular_values(rng: np.random.Generator, kind: str, rank: int) -> np.ndarray:
    if kind == "clustered":
        return 1.0 + 1e-3 * rng.random(rank)
    if kind == "repeated":
        values = rng.random(rank)
        values[: max(1, rank // 3)] = 1.0
        return values
    return 0.7 ** np.arange(rank) * (1 + 0.1 * rng.random(rank))


@st.composite
def matrices(draw) -> np.ndarray:
    """A test matrix with a controlled spectrum (see the module docstring)."""
    m = draw(st.integers(1, 300))
    n = draw(st.integers(1, 300))
    rank = draw(st.integers(0, min(m, n)))
    kind = draw(st.sampled_from(SPECTRA))
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    scale = 10.0 ** draw(st.floats(-20, 20))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    complex_dtype = dtype.kind == "c"
    if rank == 0:
        matrix = np.zeros((m, n))
    elif kind == "gaussian":
        left = rng.standard_normal((m, rank))
        matrix = left @ rng.standard_normal((rank, n)) if rank < min(m, n) else rng.standard_normal((m, n))
        if complex_dtype:
            matrix = matrix + 1j * rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))
    else:
        left = _orthonormal(rng, m, rank, complex_dtype)
        right = _orthonormal(rng, n, rank, complex_dtype)
        matrix = (left * _singular_values(rng, kind, rank)) @ np.conj(right.T)
    return (matrix * scale).astype(dtype)


def _as_backend(name: str, values: np.ndarray):
    if name.startswith("array_api_strict"):
        import array_api_strict

        device = array_api_strict.Device("device1") if name.endswith("device1") else None
        return array_api_strict.asarray(values, device=device)
    return values


BACKENDS = pytest.mark.parametrize(
    "backend_name", ["numpy", "array_api_strict", "array_api_strict-device1"]
)
#: Relative gap sigma_1 - sigma_2 (in units of rtol) from which the estimate must be within
#: rtol of sigma_max itself.
SEPARATED_GAP = 100


@BACKENDS
@settings(max_examples=NUMERIC_EXAMPLES)
@given(matrix=matrices(), seed=st.integers(0, 2**16))
def test_estimate_within_rtol_or_says_so(backend_name, matrix, seed):
    rtol = 1e-6
    truth = true_sigma(matrix)
    single = matrix.dtype in (np.float32, np.complex64)
    # Single precision: the product A v itself carries ~sqrt(n) eps32 relative error.
    rounding = 8 * np.sqrt(matrix.shape[1]) * 2.0**-23 if single else 1e-12
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sigma, state = lipnorm.estimate_sigma(
            _as_backend(backend_name, matrix), method="lanczos", rtol=rtol, seed=seed, return_state=True
        )
    said_not_converged = any(issubclass(w.category, lipnorm.ConvergenceWarning) for w in caught)
    assert said_not_converged == (not state.converged)
    if truth == 0.0:
        assert float(sigma) == 0.0
        return
    if state.converged:
        values = singular_values(matrix)
        if state.residual <= rtol * state.sigma:
            # The residual rule's promise: within rtol of a singular value (of sigma_max if
            # it is isolated). The gap rule (a smaller residual is not needed) makes it only
            # where the top stands apart, checked next.
            assert_converged_estimate(float(sigma), values, rtol + rounding)
        gap = (values[0] - values[1]) / values[0] if len(values) > 1 else 1.0
        if gap >= SEPARATED_GAP * rtol:
            error = (truth - float(sigma)) / truth
            assert error <= rtol + rounding, f"gap {gap:.1e}: error {error:.2e} > rtol"
    assert float(sigma) <= truth * (1 + rounding), "a Ritz value cannot exceed sigma_max"


@BACKENDS
@settings(max_examples=NUMERIC_EXAMPLES)
@given(matrix=matrices())
def test_bounds_always_contain_the_svd_value(backend_name, matrix):
    truth = true_sigma(matrix)
    interval = lipnorm.sigma_bounds(_as_backend(backend_name, matrix))
    assert_contains(interval, truth)
    if truth > 0:
        assert interval.upper / interval.lower <= 1 + 1e-3


@settings(max_examples=NUMERIC_EXAMPLES // 2)
@given(matrix=matrices(), steps=st.integers(1, 10))
def test_gram_bounds_always_contain_the_svd_value(matrix, steps):
    interval = lipnorm.sigma_bounds(matrix, method="gram", steps=steps)
    assert_contains(interval, true_sigma(matrix))


@BACKENDS
@settings(max_examples=NUMERIC_EXAMPLES)
@given(matrix=matrices(), seed=st.integers(0, 2**16))
def test_warm_start_converges_on_a_nearby_matrix(backend_name, matrix, seed):
    rng = np.random.default_rng(seed)
    single = matrix.dtype in (np.float32, np.complex64)
    rtol = 1e-4 if single else 1e-6
    _, state = lipnorm.estimate_sigma(
        _as_backend(backend_name, matrix), rtol=rtol, method="lanczos", seed=seed, return_state=True
    )
    nearby = (matrix + 1e-3 * np.max(np.abs(matrix)) * rng.standard_normal(matrix.shape)).astype(
        matrix.dtype
    )
    truth = true_sigma(nearby)
    sigma, warm = lipnorm.estimate_sigma(
        _as_backend(backend_name, nearby), rtol=rtol, method="lanczos", state=state, return_state=True
    )
    assert warm.converged
    if truth > 0:
        assert_converged_estimate(float(sigma), singular_values(nearby), rtol + 1e-5 * single)
