"""Assertions shared by the tests. Every helper raises on failure."""

from __future__ import annotations

import os

import numpy as np
import scipy.linalg

from lipnorm._xp import library_name, to_numpy

#: Examples per numeric Hypothesis property: 500 in CI, fewer while developing.
NUMERIC_EXAMPLES = 500 if os.environ.get("HYPOTHESIS_PROFILE") == "ci" else 60

#: Relative slack granted to scipy's float64 SVD reference itself (LAPACK's own rounding).
REFERENCE_SLACK = 1e-13


#: Relative rounding error granted to a secant ratio ||f(x) - f(y)|| / ||x - y|| of a network
#: evaluated in float64 / float32: certified bounds hold for the exact map of the weights, the
#: evaluation that measures a secant is not exact.
FLOAT64_EVALUATION_SLACK = 1e-9
FLOAT32_EVALUATION_SLACK = 1e-4


def true_sigma(matrix) -> float:
    """sigma_max of the matrix exactly as stored, by scipy's float64/complex128 SVD."""
    host = to_numpy(matrix)
    host = host.astype(np.complex128 if np.iscomplexobj(host) else np.float64)
    if host.ndim == 1:
        return float(np.linalg.norm(host))
    return float(scipy.linalg.svdvals(host)[0]) if host.size else 0.0


def singular_values(matrix) -> np.ndarray:
    """All singular values, descending, by scipy's float64/complex128 SVD of the matrix as stored."""
    host = to_numpy(matrix)
    return scipy.linalg.svdvals(host.astype(np.complex128 if np.iscomplexobj(host) else np.float64))


#: Relative gap (sigma_1 - sigma_2) / sigma_1 from which the top singular value counts as isolated.
ISOLATED_GAP = 1e-3


def assert_converged_estimate(estimate: float, values: np.ndarray, rtol: float,
                              isolated_gap: float = ISOLATED_GAP) -> None:
    """Raise unless a converged estimate keeps lipnorm's documented accuracy promise.

    ``values`` are the matrix's singular values, descending. The residual test certifies
    that the estimate is within ``rtol`` of *a* singular value and interlacing that it is not
    above sigma_max; when sigma_max is isolated (relative gap ``>= isolated_gap``), the
    estimate is within ``rtol`` of sigma_max itself.
    """
    top = float(values[0])
    nearest = float(np.min(np.abs(values - estimate)))
    assert nearest <= rtol * top, f"no singular value within {rtol:.1e}: nearest {nearest / top:.2e}"
    assert estimate <= top * (1 + rtol), f"estimate {estimate!r} above sigma_max {top!r}"
    gap = (top - float(values[1])) / top if len(values) > 1 else 1.0
    if gap >= isolated_gap:
        error = abs(estimate - top) / top
        assert error <= rtol, f"isolated sigma_max (gap {gap:.1e}) missed by {error:.2e} > {rtol:.1e}"


def assert_relative_close(actual: float, expected: float, rtol: float, what: str = "") -> None:
    """Raise unless ``|actual - expected| <= rtol * |expected|`` (exact when expected is 0)."""
    if expected == 0.0:
        assert actual == 0.0, f"{what}: expected exactly 0, got {actual}"
        return
    error = abs(actual - expected) / abs(expected)
    assert error <= rtol, f"{what}: relative error {error:.3e} > {rtol:.1e} ({actual} vs {expected})"


def assert_contains(interval, value: float) -> None:
    """Raise unless the certified interval contains ``value`` (up to the reference's slack)."""
    lower, upper = interval
    assert lower <= value * (1 + REFERENCE_SLACK), f"lower {lower!r} above the truth {value!r}"
    assert upper >= value * (1 - REFERENCE_SLACK), f"upper {upper!r} below the truth {value!r}"
    assert 0.0 <= lower <= upper, f"malformed interval {interval}"


def dtype_name(dtype) -> str:
    """``"float32"`` etc. for a dtype of any library."""
    name = getattr(dtype, "name", None)
    return name if isinstance(name, str) else str(dtype).split(".")[-1]


def assert_scalar_of(result, backend, expected_dtype: str) -> None:
    """Raise unless ``result`` is a 0-d array of ``backend``'s library with that dtype."""
    assert library_name(result) == backend.name, (
        f"result is a {type(result).__module__}.{type(result).__name__}, not a {backend.name} array"
    )
    assert tuple(result.shape) == (), f"result has shape {tuple(result.shape)}, expected ()"
    assert dtype_name(result.dtype) == expected_dtype, (
        f"result dtype {result.dtype} is not {expected_dtype}"
    )
