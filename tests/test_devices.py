"""Results and states stay on the input's device; nothing moves between devices unasked.

The ``backend`` fixture includes array_api_strict on its second device
(``array_api_strict.Device("device1")``), which refuses to combine arrays of two
devices: a start vector, a coefficient or a result made on the default device fails
here as it would on a GPU, without one. ``Device("no_float64")`` has no double
precision, as Apple's MPS: nothing may pass through float64 on it. Torch's meta
device holds shapes and no values: what shapes decide is checked as for any
tensor, what needs values is a clear error.
"""

from __future__ import annotations

import numpy as np
import pytest

import lipnorm
from lipnorm._xp import device_of
from lipnorm.krylov import random_vector
from lipnorm.operators import LinearOperator, as_operator
from tests.helpers import assert_contains, assert_relative_close, dtype_name, true_sigma

RNG = np.random.default_rng(14)
MATRIX = RNG.standard_normal((29, 17))
COMPLEX_MATRIX = MATRIX + 1j * RNG.standard_normal(MATRIX.shape)


def assert_on_device(x, device, what: str) -> None:
    """Raise unless the array ``x`` lives on ``device``."""
    assert device_of(x) == device, f"{what} is on {device_of(x)}, not on {device}"


@pytest.mark.parametrize("method", ["lanczos", "power", "svd"])
@pytest.mark.parametrize("complex_dtype", [False, True], ids=["real", "complex"])
def test_result_and_state_stay_on_the_weight_device(backend, method, complex_dtype):
    values = COMPLEX_MATRIX if complex_dtype else MATRIX
    weight = backend.asarray(values)
    sigma, state = lipnorm.estimate_sigma(weight, method=method, return_state=True, seed=0)
    device = device_of(weight)
    assert_on_device(sigma, device, "sigma")
    if method != "svd":  # the SVD computes no vectors
        assert_on_device(state.u, device, "state.u")
        assert_on_device(state.v, device, "state.v")
    assert_relative_close(float(sigma), true_sigma(values), 1e-6, f"{backend}/{method}")


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_warm_start_stays_on_the_weight_device(backend, method):
    weight = backend.asarray(MATRIX)
    _, state = lipnorm.estimate_sigma(weight, method=method, return_state=True, seed=0)
    nudged_values = MATRIX + 1e-4 * RNG.standard_normal(MATRIX.shape)
    nudged = backend.asarray(nudged_values)
    sigma, warm = lipnorm.estimate_sigma(nudged, method=method, state=state, return_state=True)
    device = device_of(nudged)
    for array, what in ((sigma, "sigma"), (warm.u, "state.u"), (warm.v, "state.v")):
        assert_on_device(array, device, what)
    assert warm.converged
    assert_relative_close(float(sigma), true_sigma(nudged_values), 1e-6, f"{backend}/{method}")


@pytest.mark.parametrize("complex_dtype", [False, True], ids=["real", "complex"])
def test_start_vector_is_made_on_the_operator_device_in_its_dtype(backend, complex_dtype):
    weight = backend.asarray((COMPLEX_MATRIX if complex_dtype else MATRIX).astype(
        np.complex64 if complex_dtype else np.float32
    ))
    operator = as_operator(weight)
    start = random_vector(operator, operator.shape[1], seed=0)
    assert_on_device(start, operator.device, "the start vector")
    assert dtype_name(start.dtype) == dtype_name(operator.dtype)
    assert tuple(start.shape) == (MATRIX.shape[1],)


def test_a_state_from_another_device_is_refused():
    xp = pytest.importorskip("array_api_strict")
    on_device1 = xp.asarray(MATRIX, device=xp.Device("device1"))
    _, state = lipnorm.estimate_sigma(on_device1, method="lanczos", return_state=True, seed=0)
    with pytest.raises(ValueError, match="state's vectors are on device .*device1.* move"):
        lipnorm.estimate_sigma(xp.asarray(MATRIX), state=state)


@pytest.mark.parametrize("method", ["lanczos", "power", "svd", "auto"])
def test_a_device_without_double_precision_never_sees_float64(method):
    xp = pytest.importorskip("array_api_strict")
    device = xp.Device("no_float64")
    values = MATRIX.astype(np.float32)
    weight = xp.asarray(values, device=device)
    sigma = lipnorm.estimate_sigma(weight, method=method, seed=0)
    assert_on_device(sigma, device, "sigma")
    assert sigma.dtype == xp.float32
    assert_relative_close(float(sigma), true_sigma(values), 2e-6, f"no_float64/{method}")
    assert_contains(lipnorm.sigma_bounds(weight), true_sigma(values))


class _MatrixOnDevice(LinearOperator):
    """A matrix behind matvec/rmatvec only (no dense form), on the matrix's device."""

    def __init__(self, matrix, xp):
        self.matrix, self.xp = matrix, xp
        self.shape = tuple(int(s) for s in matrix.shape)
        self.dtype = matrix.dtype
        self.device = device_of(matrix)

    def matvec(self, x):
        return self.xp.matmul(self.matrix, x)

    def rmatvec(self, y):
        return self.xp.matmul(y, self.matrix)


def test_an_operator_on_a_non_default_device_is_iterated_and_densified_there():
    xp = pytest.importorskip("array_api_strict")
    device = xp.Device("device1")
    operator = _MatrixOnDevice(xp.asarray(MATRIX, device=device), xp)
    sigma, state = lipnorm.estimate_sigma(operator, method="lanczos", return_state=True, seed=0)
    assert_on_device(sigma, device, "sigma")
    assert_on_device(state.v, device, "state.v")
    assert_relative_close(float(sigma), true_sigma(MATRIX), 1e-6, "operator on device1")
    # sigma_bounds densifies it from its products with the basis vectors, made on its device.
    assert_contains(lipnorm.sigma_bounds(operator), true_sigma(MATRIX))


def _meta(shape, dtype=None):
    torch = pytest.importorskip("torch")
    return torch.empty(shape, device="meta", dtype=dtype or torch.float32)


@pytest.mark.parametrize(
    ("shape", "options", "message"),
    [
        ((), {}, "0-d array"),
        ((4, 3, 2), {}, "say how to view it as a matrix"),
        ((4, 3), {"dim": 2}, "dim=2 is out of range"),
        ((0, 3), {}, "is empty"),
    ],
)
def test_meta_tensors_get_the_shape_errors_of_any_tensor(shape, options, message):
    with pytest.raises(ValueError, match=message):
        lipnorm.estimate_sigma(_meta(shape), **options)


def test_meta_tensors_get_the_dtype_errors_of_any_tensor():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="numeric"):
        lipnorm.estimate_sigma(_meta((4, 3), torch.bool))


@pytest.mark.parametrize("call", ["estimate_sigma", "sigma_bounds"])
@pytest.mark.parametrize("shape", [(5, 4), (6, 2, 3)])
def test_meta_tensors_that_need_values_are_a_clear_error(call, shape):
    options = {"dim": 0} if len(shape) > 2 else {}
    with pytest.raises(ValueError, match=r"meta device, which holds no values.*materialize"):
        getattr(lipnorm, call)(_meta(shape), **options)
