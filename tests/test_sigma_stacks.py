"""Stacks of matrices: ``estimate_sigma(W, batched=True)`` and ``sigma_bounds(W, batched=True)``.

Every slice of a stack is checked against SciPy's SVD of that slice, on every backend of
``tests/conftest.py`` (array_api_strict's second device included, which refuses to combine
arrays of two devices). Stacks mix spectra, scales and ranks from slice to slice, so each
slice is held to its own rtol, scaled by its own power of two and certified on its own.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lipnorm
from lipnorm._xp import device_of, library_name
from tests.conftest import BACKEND_IDS, Backend
from tests.helpers import (
    ISOLATED_GAP,
    NUMERIC_EXAMPLES,
    assert_contains,
    assert_converged_estimate,
    assert_relative_close,
    dtype_name,
    singular_values,
    true_sigma,
)
from tests.test_sigma_properties import DTYPES, SPECTRA, _orthonormal, _singular_values

#: Examples per stack property and backend (every example runs on all seven backends).
STACK_EXAMPLES = max(10, NUMERIC_EXAMPLES // 20)
#: Matrix sides drawn: a few, so that JAX's compiled operations (one per shape) are reused.
SIDES = (1, 2, 5, 13, 30)


def _slice(rng: np.random.Generator, m: int, n: int, kind: str, rank: int, complex_dtype: bool) -> np.ndarray:
    if rank == 0:
        return np.zeros((m, n))
    if kind == "gaussian":
        matrix = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))
        if complex_dtype:
            matrix = matrix + 1j * rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))
        return matrix
    left = _orthonormal(rng, m, rank, complex_dtype)
    right = _orthonormal(rng, n, rank, complex_dtype)
    return (left * _singular_values(rng, kind, rank)) @ np.conj(right.T)


@st.composite
def stacks(draw) -> np.ndarray:
    """A stack of shape (*batch, m, n): each slice its own spectrum, rank and scale."""
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    m = draw(st.sampled_from(SIDES))
    n = draw(st.sampled_from(SIDES))
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    count = int(np.prod(batch, dtype=np.int64))
    slices = []
    for _ in range(count):
        kind = draw(st.sampled_from(SPECTRA))
        rank = draw(st.integers(0, min(m, n)))
        scale = 10.0 ** draw(st.floats(-8, 8))
        slices.append(_slice(rng, m, n, kind, rank, dtype.kind == "c") * scale)
    return np.stack(slices).reshape(batch + (m, n)).astype(dtype)


def _truths(stack: np.ndarray) -> np.ndarray:
    flat = stack.reshape((-1,) + stack.shape[-2:])
    return np.array([true_sigma(matrix) for matrix in flat]).reshape(stack.shape[:-2])


def _rounding(stack: np.ndarray) -> float:
    """Relative rounding a single-precision product carries (about sqrt(n) eps32)."""
    single = stack.dtype in (np.float32, np.complex64)
    return 8 * np.sqrt(max(stack.shape[-2:])) * 2.0**-23 if single else 1e-12


def _host(array) -> np.ndarray:
    return np.asarray(lipnorm._xp.to_numpy(array), dtype=np.float64)


BACKENDS = pytest.mark.parametrize("backend_id", BACKEND_IDS)


@BACKENDS
@settings(max_examples=STACK_EXAMPLES)
@given(stack=stacks(), method=st.sampled_from(["lanczos", "auto"]))
def test_every_slice_is_estimated_within_rtol(backend_id, stack, method):
    backend = Backend(backend_id)
    rtol = 1e-6
    weight = backend.asarray(stack)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lipnorm.ConvergenceWarning)  # checked through state.converged
        sigma, state = lipnorm.estimate_sigma(weight, batched=True, method=method, rtol=rtol, return_state=True)
    assert library_name(sigma) == backend.name
    assert tuple(sigma.shape) == stack.shape[:-2]
    assert device_of(sigma) == device_of(weight)
    values = _host(sigma)
    truths = _truths(stack)
    rounding = _rounding(stack)
    flat = stack.reshape((-1,) + stack.shape[-2:])
    for index, (estimate, truth, matrix) in enumerate(zip(values.reshape(-1), truths.reshape(-1), flat)):
        converged = bool(np.asarray(state.converged).reshape(-1)[index])
        if truth == 0.0:
            assert estimate == 0.0, f"slice {index}: zero matrix gave {estimate}"
            continue
        assert estimate <= truth * (1 + rounding), f"slice {index} above sigma_max"
        if not converged:
            continue
        spectrum = singular_values(matrix)
        gap = (spectrum[0] - spectrum[1]) / spectrum[0] if len(spectrum) > 1 else 1.0
        residual = float(np.asarray(state.residual).reshape(-1)[index])
        if residual <= rtol * estimate:
            assert_converged_estimate(estimate, spectrum, rtol + rounding)
        if gap >= 100 * rtol:
            error = (truth - estimate) / truth
            assert error <= rtol + rounding, f"slice {index} (gap {gap:.1e}): error {error:.2e} > rtol"


@BACKENDS
@settings(max_examples=STACK_EXAMPLES)
@given(stack=stacks())
def test_every_slice_interval_contains_its_svd_value(backend_id, stack):
    backend = Backend(backend_id)
    interval = lipnorm.sigma_bounds(backend.asarray(stack), batched=True)
    lower, upper = interval
    assert isinstance(lower, np.ndarray) and lower.dtype == np.float64 and lower.shape == stack.shape[:-2]
    assert isinstance(upper, np.ndarray) and upper.dtype == np.float64 and upper.shape == stack.shape[:-2]
    for low, high, truth in zip(lower.reshape(-1), upper.reshape(-1), _truths(stack).reshape(-1)):
        assert_contains((low, high), truth)
        if truth > 0:
            assert high / low <= 1 + 1e-3


@BACKENDS
@settings(max_examples=STACK_EXAMPLES)
@given(stack=stacks(), seed=st.integers(0, 2**16))
def test_warm_starts_per_matrix_and_certificates_from_the_state(backend_id, stack, seed):
    """A state holds one warm start per matrix; passed back on a nearby stack, every matrix
    converges again; ``sigma_bounds(state=...)`` still contains every slice's value."""
    backend = Backend(backend_id)
    single = stack.dtype in (np.float32, np.complex64)
    rtol = 1e-4 if single else 1e-6
    _, state = lipnorm.estimate_sigma(backend.asarray(stack), batched=True, method="lanczos", rtol=rtol,
                                      seed=seed, return_state=True)
    batch, (m, n) = stack.shape[:-2], stack.shape[-2:]
    assert tuple(state.u.shape) == batch + (m,) and tuple(state.v.shape) == batch + (n,)
    assert state.sigma.shape == batch and state.converged.shape == batch
    rng = np.random.default_rng(seed)
    largest = np.max(np.abs(stack), axis=(-2, -1), keepdims=True)
    nearby = (stack + 1e-3 * largest * rng.standard_normal(stack.shape)).astype(stack.dtype)
    weight = backend.asarray(nearby)
    sigma, warm = lipnorm.estimate_sigma(weight, batched=True, method="lanczos", rtol=rtol, state=state,
                                         return_state=True)
    assert np.all(warm.converged)
    flat = nearby.reshape((-1,) + nearby.shape[-2:])
    before = stack.reshape(flat.shape)
    for estimate, matrix, old in zip(_host(sigma).reshape(-1), flat, before):
        top = true_sigma(matrix)
        if top > 0:
            # A warm start is the old top singular vector: where the change of the matrix is
            # not well below the new gap, it may lie along the new second one (Wedin), and the
            # residual rule then promises a singular value, not sigma_max.
            change = true_sigma(matrix.astype(np.complex128) - old)
            assert_converged_estimate(estimate, singular_values(matrix), rtol + 1e-5 * single,
                                      isolated_gap=max(ISOLATED_GAP, 4 * change / top))
    lower, upper = lipnorm.sigma_bounds(weight, batched=True, state=warm)
    for low, high, truth in zip(lower.reshape(-1), upper.reshape(-1), _truths(nearby).reshape(-1)):
        assert_contains((low, high), truth)


RNG = np.random.default_rng(2026)
STACK = RNG.standard_normal((2, 3, 24, 17))


def test_a_stack_is_estimated_in_its_own_namespace_dtype_and_device(backend):
    weight = backend.asarray(STACK.astype(np.float32))
    sigma = lipnorm.estimate_sigma(weight, batched=True, method="lanczos")
    assert library_name(sigma) == backend.name
    assert dtype_name(sigma.dtype) == "float32"
    assert tuple(sigma.shape) == (2, 3)
    assert device_of(sigma) == device_of(weight)
    np.testing.assert_allclose(_host(sigma), _truths(STACK), rtol=2e-6)


def test_torch_bfloat16_stacks_are_computed_in_float32_and_returned_in_bfloat16():
    torch = pytest.importorskip("torch")
    weight = torch.asarray(STACK, dtype=torch.bfloat16)
    sigma = lipnorm.estimate_sigma(weight, batched=True)
    assert sigma.dtype == torch.bfloat16 and tuple(sigma.shape) == (2, 3)
    truths = _truths(weight.float().numpy())
    np.testing.assert_allclose(sigma.float().numpy(), truths, rtol=1e-2)


def test_a_stack_without_batched_or_dim_is_an_error_naming_both():
    with pytest.raises(ValueError, match=r"batched=True reads it as a stack .* dim=0"):
        lipnorm.estimate_sigma(STACK[0])
    with pytest.raises(ValueError, match="batched=True"):
        lipnorm.sigma_bounds(STACK[0])


@pytest.mark.parametrize("call", ["estimate_sigma", "sigma_bounds"])
def test_batched_with_dim_or_an_operator_or_a_vector_is_an_error(call):
    function = getattr(lipnorm, call)
    with pytest.raises(ValueError, match="dim=0 flattens .* pass one of them"):
        function(STACK, batched=True, dim=0)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., m, n\)"):
        function(np.ones(5), batched=True)
    with pytest.raises(ValueError, match="is empty"):
        function(np.ones((0, 3, 4)), batched=True)
    import scipy.sparse.linalg

    with pytest.raises(TypeError, match="linear operator"):
        function(scipy.sparse.linalg.aslinearoperator(np.eye(3)), batched=True)


@pytest.mark.parametrize("call", ["estimate_sigma", "sigma_bounds"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_one_slice_names_that_slice(backend, call, bad):
    values = STACK.copy()
    values[1, 2, 5, 3] = bad
    values[1, 0, 0, 0] = bad if call == "sigma_bounds" else 0.0
    first = "1, 0" if call == "sigma_bounds" else "1, 2"
    with pytest.raises(ValueError, match=rf"matrix \[{first}\] of the stack of shape \(2, 3, 24, 17\) has NaN or Inf"):
        getattr(lipnorm, call)(backend.asarray(values), batched=True)


def test_a_matrix_is_a_stack_of_batch_shape_empty():
    matrix = STACK[0, 0]
    sigma, state = lipnorm.estimate_sigma(matrix, batched=True, method="lanczos", return_state=True)
    assert sigma.shape == () and state.sigma.shape == ()
    assert_relative_close(float(sigma), true_sigma(matrix), 1e-6, "2-D with batched=True")
    lower, upper = lipnorm.sigma_bounds(matrix, batched=True)
    assert lower.shape == () and upper.shape == ()
    assert_contains((float(lower), float(upper)), true_sigma(matrix))


def test_default_seed_makes_sigma_bit_for_bit_repeatable_and_seed_chooses_another_start():
    matrix = np.random.default_rng(3).standard_normal((300, 200)).astype(np.float32)
    runs = [lipnorm.estimate_sigma(matrix, method="lanczos", return_state=True) for _ in range(3)]
    assert len({float(sigma) for sigma, _ in runs}) == 1
    assert len({state.matvecs for _, state in runs}) == 1
    stacks = [lipnorm.estimate_sigma(STACK, batched=True, method="lanczos") for _ in range(2)]
    np.testing.assert_array_equal(stacks[0], stacks[1])
    _, other = lipnorm.estimate_sigma(matrix, method="lanczos", seed=7, return_state=True)
    _, again = lipnorm.estimate_sigma(matrix, method="lanczos", seed=7, return_state=True)
    assert other.matvecs == again.matvecs
    starts = {lipnorm.estimate_sigma(matrix, method="lanczos", seed=seed, return_state=True)[1].matvecs
              for seed in range(6)}
    assert len(starts) > 1, "seed= did not change the start vector"


def test_converged_matrices_leave_the_batch_each_on_its_own_rtol():
    """A matrix whose top stands apart converges in a few steps and leaves; a clustered one
    goes on. A loose rtol for one matrix stops it earlier than the same matrix at a tight
    one: every matrix is held to its own rtol."""
    rng = np.random.default_rng(11)
    left = np.linalg.qr(rng.standard_normal((60, 60)))[0]
    right = np.linalg.qr(rng.standard_normal((50, 50)))[0]
    apart = (left[:, :50] * np.r_[10.0, np.linspace(1.0, 0.5, 49)]) @ right.T
    clustered = (left[:, :50] * (1.0 - 1e-3 * np.arange(50) / 50)) @ right.T
    stack = np.stack([apart, clustered, clustered])
    rtol = np.array([1e-8, 1e-8, 1e-3])
    sigma, state = lipnorm.estimate_sigma(stack, batched=True, method="lanczos", rtol=rtol, return_state=True)
    iterations = state.iterations
    assert iterations[0] < iterations[1], iterations
    assert iterations[2] < iterations[1], iterations
    assert state.passes == 2 * int(iterations.max())  # NumPy stacks: matvec and rmatvec, batched
    for value, matrix, tolerance in zip(sigma, stack, rtol):
        assert_converged_estimate(float(value), singular_values(matrix), tolerance)


def test_rtol_must_match_the_batch_shape():
    with pytest.raises(ValueError, match=r"rtol of shape \(4,\) does not match the batch shape \(2, 3\)"):
        lipnorm.estimate_sigma(STACK, batched=True, rtol=np.full(4, 1e-6))
    with pytest.raises(ValueError, match="positive finite"):
        lipnorm.estimate_sigma(STACK, batched=True, rtol=np.array([[1e-6, 0.0, 1e-6]] * 2))
    with pytest.raises(ValueError, match="positive finite"):
        lipnorm.estimate_sigma(STACK[0, 0], rtol=np.array(1e-6))


def test_states_of_the_wrong_shape_are_refused():
    _, stack_state = lipnorm.estimate_sigma(STACK, batched=True, method="lanczos", return_state=True)
    _, single_state = lipnorm.estimate_sigma(STACK[0, 0], method="lanczos", return_state=True)
    with pytest.raises(ValueError, match=r"state's u has shape \(2, 3, 24\) .* needs \(24,\)"):
        lipnorm.estimate_sigma(STACK[0, 0], state=stack_state)
    with pytest.raises(ValueError, match=r"state's u has shape \(24,\) .* needs \(2, 3, 24\)"):
        lipnorm.estimate_sigma(STACK, batched=True, state=single_state)
    with pytest.raises(ValueError, match=r"needs \(3, 24\)"):
        lipnorm.sigma_bounds(STACK[0], batched=True, state=stack_state)


def test_a_warm_stack_that_maps_one_state_vector_to_zero_restarts_that_matrix():
    values = np.stack([np.diag([3.0, 1.0, 0.5]), np.diag([2.0, 1.5, 0.1])])
    _, state = lipnorm.estimate_sigma(values, batched=True, method="lanczos", return_state=True)
    pruned = values.copy()
    pruned[0, :, np.argmax(np.abs(state.v[0]))] = 0.0  # matrix 0 pruned along its top vector
    sigma, warm = lipnorm.estimate_sigma(pruned, batched=True, method="lanczos", state=state, return_state=True)
    np.testing.assert_allclose(sigma, [1.0, 2.0], rtol=1e-6)
    assert np.all(warm.converged)


def test_the_warning_names_the_matrices_that_did_not_converge():
    clustered = np.stack([np.diag(1.0 - 1e-4 * np.arange(40)), np.diag(np.r_[5.0, np.zeros(39)])])
    with pytest.warns(lipnorm.ConvergenceWarning, match=r"on 1 of 2 matrices \(the first: \[0\]\)"):
        _, state = lipnorm.estimate_sigma(clustered, batched=True, method="power", max_iter=3,
                                          rtol=1e-8, return_state=True)
    assert state.converged.tolist() == [False, True]


def test_stack_bounds_zero_and_integer_slices():
    values = np.zeros((3, 4, 5), dtype=np.int64)
    values[1] = np.arange(20).reshape(4, 5)
    values[2, 0, 0] = 2**24 + 1  # float32 cannot hold it: the integers are certified as given
    lower, upper = lipnorm.sigma_bounds(values, batched=True)
    assert lower[0] == upper[0] == 0.0
    for index in (1, 2):
        assert_contains((lower[index], upper[index]), true_sigma(values[index].astype(np.float64)))


def test_bounds_from_a_state_skip_nothing_that_matters():
    """From a state, each certificate is tried just above the state's estimate: the interval
    still contains the truth, within a few rtol above it; a stale state (from another stack)
    costs the eigenvalue problem, never a wrong bound."""
    sigma, state = lipnorm.estimate_sigma(STACK, batched=True, method="lanczos", rtol=1e-8, return_state=True)
    lower, upper = lipnorm.sigma_bounds(STACK, batched=True, state=state)
    truths = _truths(STACK)
    for low, high, truth in zip(lower.reshape(-1), upper.reshape(-1), truths.reshape(-1)):
        assert_contains((low, high), truth)
        assert high <= truth * (1 + 1e-6)
    stale = lipnorm.sigma_bounds(3.0 * STACK, batched=True, state=state)
    for low, high, truth in zip(stale.lower.reshape(-1), stale.upper.reshape(-1), 3.0 * truths.reshape(-1)):
        assert_contains((low, high), truth)
    single = lipnorm.estimate_sigma(STACK[0, 0], return_state=True, rtol=1e-8)[1]
    assert_contains(lipnorm.sigma_bounds(STACK[0, 0], state=single), true_sigma(STACK[0, 0]))
    with pytest.raises(ValueError, match="method='cholesky' only"):
        lipnorm.sigma_bounds(STACK, batched=True, method="gram", state=state)


@pytest.mark.parametrize("dtype", [np.float32, np.complex64, np.float64, np.complex128])
def test_each_matrix_far_from_one_is_scaled_by_its_own_power_of_two(backend, dtype):
    """Matrices whose entries are out of the range where W^H W stays finite and normal are
    scaled by a power of two each (exactly) and keep their accuracy; the others are not."""
    single = np.dtype(dtype) in (np.float32, np.complex64)
    scales = [1e30, 1.0, 1e-30] if single else [1e250, 1.0, 1e-250]
    values = np.stack([STACK[0, 0] * scale for scale in scales])
    if np.dtype(dtype).kind == "c":
        values = values + 1j * np.stack([STACK[1, 1] * scale for scale in scales])
    values = values.astype(dtype)
    sigma = lipnorm.estimate_sigma(backend.asarray(values), batched=True, method="lanczos")
    np.testing.assert_allclose(_host(sigma), _truths(values), rtol=2e-6)


def test_every_matrix_of_a_gaussian_stack_is_within_rtol_and_the_gap_rule_can_miss_one():
    """The benchmark's stack of 1024 Gaussian 64 x 64 matrices: with the default residual
    rule every sigma is within rtol of its SVD value. Matrix 450's top two singular values
    lie 1.5e-3 apart and its start vector is nearly orthogonal to the top singular vector:
    the gap rule stops on the second value."""
    stack = np.random.default_rng(1).standard_normal((1024, 64, 64), dtype=np.float32)
    exact = np.linalg.norm(stack.astype(np.float64), 2, axis=(1, 2))
    sigma = lipnorm.estimate_sigma(stack, batched=True)
    errors = np.abs(sigma.astype(np.float64) - exact) / exact
    assert np.max(errors) <= 1e-6 + 8 * 8 * 2.0**-23, np.max(errors)
    gap_rule = lipnorm.estimate_sigma(stack, batched=True, stop="gap").astype(np.float64)
    assert abs(gap_rule[450] - exact[450]) / exact[450] > 1e-3
    with pytest.raises(ValueError, match="unknown stop"):
        lipnorm.estimate_sigma(stack[0], stop="fast")
