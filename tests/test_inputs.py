"""Bad input gets a specific error; odd-but-valid input gets the right answer."""

from __future__ import annotations

import numpy as np
import pytest

import lipnorm


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_entries_are_refused(backend, bad):
    values = np.ones((4, 5))
    values[2, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        lipnorm.estimate_sigma(backend.asarray(values))
    with pytest.raises(ValueError, match="NaN or Inf"):
        lipnorm.sigma_bounds(backend.asarray(values))


@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0), (2, 0, 4)])
def test_empty_arrays_are_refused(backend, shape):
    with pytest.raises(ValueError, match="empty"):
        lipnorm.estimate_sigma(backend.asarray(np.zeros(shape)), dim=0 if len(shape) > 2 else None)


def test_zero_dimensional_input_is_refused(backend):
    with pytest.raises(ValueError, match="0-d"):
        lipnorm.estimate_sigma(backend.asarray(np.float64(3.0)))


def test_boolean_dtype_is_refused(backend):
    with pytest.raises(TypeError, match="numeric"):
        lipnorm.estimate_sigma(backend.asarray(np.ones((3, 3), dtype=bool)))


def test_string_and_object_arrays_are_refused():
    with pytest.raises(TypeError, match="numeric"):
        lipnorm.estimate_sigma(np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(TypeError, match="numeric"):
        lipnorm.estimate_sigma(np.array([[1, None]], dtype=object))


def test_non_arrays_are_refused():
    with pytest.raises(TypeError, match="numpy.asarray"):
        lipnorm.estimate_sigma([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(TypeError, match="got str"):
        lipnorm.sigma_bounds("weights.npy")


def test_nd_without_dim_names_the_options(backend):
    with pytest.raises(ValueError, match=r"dim=0 .*conv_operator"):
        lipnorm.estimate_sigma(backend.asarray(np.ones((2, 3, 4))))


def test_dim_out_of_range(backend):
    with pytest.raises(ValueError, match="dim=3 is out of range"):
        lipnorm.estimate_sigma(backend.asarray(np.ones((2, 3, 4))), dim=3)


def test_mixed_libraries_in_one_call():
    torch = pytest.importorskip("torch")
    _, state = lipnorm.estimate_sigma(torch.ones((4, 5), dtype=torch.float64), return_state=True, method="lanczos")
    with pytest.raises(TypeError, match="mixed array libraries"):
        lipnorm.estimate_sigma(np.ones((4, 5)), state=state, method="lanczos")


def test_state_of_another_shape_is_refused():
    _, state = lipnorm.estimate_sigma(np.ones((4, 5)), return_state=True, method="lanczos")
    with pytest.raises(ValueError, match="made for another weight"):
        lipnorm.estimate_sigma(np.ones((4, 6)), state=state, method="lanczos")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "qr"}, "unknown method 'qr'"),
        ({"rtol": 0}, "rtol must be a positive"),
        ({"rtol": float("nan")}, "rtol must be a positive"),
        ({"max_iter": 0}, "max_iter must be a positive integer"),
        ({"max_iter": 2.5}, "max_iter must be a positive integer"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        lipnorm.estimate_sigma(np.ones((3, 3)), **options)


def test_bad_bounds_method():
    with pytest.raises(ValueError, match="choose 'cholesky' or 'gram'"):
        lipnorm.sigma_bounds(np.ones((3, 3)), method="svd")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        lipnorm.sigma_bounds(np.ones((3, 3)), method="gram", steps=0)
    with pytest.raises(ValueError, match="steps=4 applies to method='gram' only"):
        lipnorm.sigma_bounds(np.ones((3, 3)), steps=4)


def test_non_convergence_is_said_not_silent():
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((200, 200))
    with pytest.warns(lipnorm.ConvergenceWarning, match="raise max_iter"):
        _, state = lipnorm.estimate_sigma(matrix, method="power", max_iter=3, return_state=True)
    assert not state.converged
    assert state.iterations == 3


def test_extreme_scales_keep_full_accuracy():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((30, 20))
    truth = np.linalg.norm(base, 2)
    for scale in (1e-300, 1e-20, 1e20, 1e300):
        for dtype in (np.float32, np.float64):
            if dtype == np.float32 and scale in (1e-300, 1e300):
                continue
            matrix = (base * scale).astype(dtype)
            sigma = float(lipnorm.estimate_sigma(matrix, method="lanczos"))
            assert abs(sigma / (truth * scale) - 1) < 1e-5, (scale, dtype, sigma)
            lower, upper = lipnorm.sigma_bounds(matrix)
            exact = np.linalg.norm(matrix.astype(np.float64), 2)
            assert lower <= exact <= upper, (scale, dtype, lower, exact, upper)


@pytest.mark.parametrize("make", ["csr_matrix", "aslinearoperator"])
def test_boolean_operators_are_refused(make):
    scipy_sparse = pytest.importorskip("scipy.sparse")
    import scipy.sparse.linalg

    maker = {"csr_matrix": scipy_sparse.csr_matrix, "aslinearoperator": scipy.sparse.linalg.aslinearoperator}
    operator = maker[make](np.ones((3, 3), dtype=bool))
    with pytest.raises(TypeError, match="numeric"):
        lipnorm.estimate_sigma(operator)
    with pytest.raises(TypeError, match="numeric"):
        lipnorm.sigma_bounds(operator)


@pytest.mark.skipif(np.finfo(np.longdouble).bits <= 64, reason="long double is double here")
def test_long_double_is_computed_in_double():
    top = 1 + 2.0**-30  # not a float32
    matrix = np.diag(np.array([top, 0.5], dtype=np.longdouble))
    lower, upper = lipnorm.sigma_bounds(matrix)
    assert lower <= top <= upper
    sigma = lipnorm.estimate_sigma(matrix, rtol=1e-14)
    assert sigma.dtype == np.longdouble
    assert abs(float(sigma) - top) <= 1e-14
    huge = np.array([[1e300]], dtype=np.longdouble)  # beyond float32
    assert float(lipnorm.estimate_sigma(huge)) == 1e300
    complex_sigma = lipnorm.estimate_sigma(matrix.astype(np.clongdouble))
    assert complex_sigma.dtype.kind == "f"
    assert abs(float(complex_sigma) - top) <= 1e-14


@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr"])
def test_sparse_torch_tensors_name_the_fix(layout):
    torch = pytest.importorskip("torch")
    weight = getattr(torch.eye(3), f"to_{layout.replace('_coo', '')}")()
    with pytest.raises(TypeError, match=r"layout torch\.%s.*to_dense\(\)" % layout):
        lipnorm.estimate_sigma(weight)
    with pytest.raises(TypeError, match="to_dense"):
        lipnorm.sigma_bounds(weight)


def test_state_of_the_svd_method_can_be_passed_back():
    matrix = np.random.default_rng(2).standard_normal((10, 8))
    sigma, state = lipnorm.estimate_sigma(matrix, return_state=True)  # small: "svd"
    assert state.method == "svd" and state.v is None
    again, warm = lipnorm.estimate_sigma(matrix, state=state, return_state=True)
    assert warm.converged
    np.testing.assert_allclose(float(again), float(sigma), rtol=1e-6)


def test_masked_arrays_are_refused():
    masked = np.ma.array(np.eye(3), mask=np.eye(3, dtype=bool))
    for function in (lipnorm.estimate_sigma, lipnorm.sigma_bounds):
        with pytest.raises(TypeError, match=r"masked arrays .*filled\(0\)"):
            function(masked)
