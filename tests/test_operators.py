"""Linear operators as input: SciPy sparse, SciPy LinearOperator, duck-typed objects."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg

import lipnorm
from lipnorm._xp import array_namespace
from lipnorm.operators import LinearOperator, as_operator
from tests.helpers import assert_contains, assert_relative_close, true_sigma

RNG = np.random.default_rng(7)
DENSE = RNG.standard_normal((60, 45)) * (RNG.random((60, 45)) < 0.2)


class DuckOperator:
    """An operator known only through its products, as a user might write one."""

    def __init__(self, matrix):
        self.matrix = matrix
        self.shape = matrix.shape
        self.dtype = matrix.dtype

    def matvec(self, x):
        return self.matrix @ x

    def rmatvec(self, y):
        return self.matrix.conj().T @ y


@pytest.mark.parametrize(
    "make",
    [
        scipy.sparse.csr_matrix,
        scipy.sparse.csc_array,
        scipy.sparse.linalg.aslinearoperator,
        DuckOperator,
    ],
    ids=["csr_matrix", "csc_array", "LinearOperator", "duck"],
)
@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
def test_operator_inputs(make, dtype):
    values = (DENSE + 1j * DENSE[::-1] if dtype == np.complex128 else DENSE).astype(dtype)
    operator = make(values)
    truth = true_sigma(values)
    for method in ("lanczos", "power"):
        sigma = lipnorm.estimate_sigma(operator, method=method, seed=3)
        assert_relative_close(float(sigma), truth, 1e-6, f"{method} on {type(operator).__name__}")
    assert_contains(lipnorm.sigma_bounds(operator), truth)


def test_operator_without_products_of_the_right_size_is_caught():
    class Broken(DuckOperator):
        def matvec(self, x):
            return np.full(self.shape[0], np.nan)

    with pytest.raises(ValueError, match="NaN or Inf in a matrix-vector product"):
        lipnorm.estimate_sigma(Broken(DENSE))


def test_sparse_with_nan_is_refused():
    bad = scipy.sparse.csr_matrix(np.array([[1.0, np.nan], [0.0, 2.0]]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        lipnorm.estimate_sigma(bad)


def test_empty_operator_is_refused():
    with pytest.raises(ValueError, match="empty"):
        lipnorm.estimate_sigma(scipy.sparse.csr_matrix((0, 4)))


def test_operator_with_its_own_certificate_is_asked_for_it():
    class Certified(LinearOperator):
        shape = (2, 2)
        dtype = np.float64

        def sigma_bounds(self):
            return lipnorm.SigmaInterval(1.0, 2.0, "own")

    assert lipnorm.sigma_bounds(Certified()).method == "own"
    for options in ({"method": "gram"}, {"method": "gram", "steps": 4}, {"dim": 0}):
        with pytest.raises(ValueError, match=r"certifies its own norm.*weight.sigma_bounds"):
            lipnorm.sigma_bounds(Certified(), **options)


def test_large_operator_without_dense_form_is_refused():
    class Huge(LinearOperator):
        shape = (10_000, 10_000)
        dtype = np.float64

    with pytest.raises(ValueError, match="too large to densify"):
        lipnorm.sigma_bounds(Huge())


class CountingOperator(DuckOperator):
    """A duck operator that counts its products."""

    def __init__(self, matrix):
        super().__init__(matrix)
        self.products = 0

    def matvec(self, x):
        self.products += 1
        return super().matvec(x)

    def rmatvec(self, y):
        self.products += 1
        return super().rmatvec(y)


@pytest.mark.parametrize("shape", [(45, 3), (3, 45)], ids=["tall", "wide"])
def test_operator_is_densified_through_its_smaller_side(shape):
    values = RNG.standard_normal(shape) + 1j * RNG.standard_normal(shape)
    operator = CountingOperator(values)
    assert_contains(lipnorm.sigma_bounds(operator), true_sigma(values))
    assert operator.products == 3
    assert_relative_close(float(lipnorm.estimate_sigma(CountingOperator(values), method="svd")),
                          true_sigma(values), 1e-12, "svd")


def test_lipnorm_operator_without_dense_form_is_densified():
    class Products(LinearOperator):
        shape = DENSE.shape
        dtype = np.dtype(np.float64)
        xp = array_namespace(DENSE)
        device = "cpu"

        def matvec(self, x):
            return DENSE @ x

        def rmatvec(self, y):
            return DENSE.T @ y

    assert_contains(lipnorm.sigma_bounds(Products()), true_sigma(DENSE))


def test_large_duck_operator_is_refused_before_any_product():
    huge = CountingOperator(np.zeros((1, 1)))
    huge.shape = (10_000, 5_000)
    with pytest.raises(ValueError, match="too large to densify"):
        lipnorm.sigma_bounds(huge)
    assert huge.products == 0


def test_a_numpy_matrix_iterates_on_the_side_read_in_memory_order():
    """Lanczos runs on A^H A of a C-ordered NumPy matrix (its fused products walk rows),
    on A A^H of a Fortran-ordered one, whatever the shape; other libraries: the smaller side."""
    wide = np.ones((3, 5), dtype=np.float32)
    assert not as_operator(wide).iterates_on_left()
    assert as_operator(np.asfortranarray(wide)).iterates_on_left()
    assert as_operator(wide.T).iterates_on_left()  # Fortran-ordered and tall: columns are contiguous
    assert as_operator(wide).adjoint().iterates_on_left()
    strict = pytest.importorskip("array_api_strict")
    assert as_operator(strict.asarray(wide)).iterates_on_left()


def test_wide_c_ordered_matrices_give_the_same_sigma_on_either_side():
    rng = np.random.default_rng(3)
    wide = rng.standard_normal((40, 90))
    sigma, state = lipnorm.estimate_sigma(wide, method="lanczos", rtol=1e-10, return_state=True)
    truth = np.linalg.norm(wide, 2)
    np.testing.assert_allclose(float(sigma), truth, rtol=1e-9)
    np.testing.assert_allclose(float(lipnorm.estimate_sigma(np.asfortranarray(wide), method="lanczos", rtol=1e-10)), truth, rtol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(wide @ state.v), truth, rtol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(wide.T @ state.u), truth, rtol=1e-9)
