"""Tests of the Lipschitz-bound algebra and the activation table (lipnorm.bounds)."""

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import erf, expit

from lipnorm.bounds import (
    ACTIVATION_LIPSCHITZ,
    activation_lipschitz,
    activation_slope_range,
    compose,
    concatenation,
    max_pool_lipschitz,
    residual_sum,
    round_up,
    windows_covering,
)

GRID = np.linspace(-12.0, 12.0, 480_001)
SELU_ALPHA, SELU_SCALE = 1.6732632423543772, 1.0507009873554805

ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0),
    "relu6": lambda x: np.clip(x, 0, 6),
    "hardtanh": lambda x: np.clip(x, -1, 1),
    "tanh": np.tanh,
    "sigmoid": expit,
    "hard_sigmoid": lambda x: np.clip(x + 3, 0, 6) / 6,
    "hard_swish": lambda x: x * np.clip(x + 3, 0, 6) / 6,
    "softplus": lambda x: np.logaddexp(0, x),
    "softsign": lambda x: x / (1 + np.abs(x)),
    "log_sigmoid": lambda x: -np.logaddexp(0, -x),
    "tanhshrink": lambda x: x - np.tanh(x),
    "softshrink": lambda x: np.sign(x) * np.maximum(np.abs(x) - 0.5, 0),
    "celu": lambda x: np.where(x > 0, x, np.expm1(x)),
    "gelu": lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "silu": lambda x: x * expit(x),
    "mish": lambda x: x * np.tanh(np.logaddexp(0, x)),
    "selu": lambda x: SELU_SCALE * np.where(x > 0, x, SELU_ALPHA * np.expm1(x)),
    "identity": lambda x: x,
    "abs": np.abs,
    "sparse_plus": lambda x: np.where(x <= -1, 0, np.where(x >= 1, x, (x + 1) ** 2 / 4)),
    "squareplus": lambda x: (x + np.sqrt(x * x + 4)) / 2,
}
# gelu: one constant covers exact GELU and its tanh approximation; squareplus: the
# supremum 1 is approached only as x -> inf (0.993 at the end of the grid)
LOOSE = {"gelu": 2e-4, "squareplus": 1e-2}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_constant_bounds_the_slope(name):
    f = ACTIVATIONS[name]
    slopes = np.abs(np.diff(f(GRID)) / np.diff(GRID))
    # float secants over steps of 5e-5 carry ~1e-11 relative rounding error
    assert ACTIVATION_LIPSCHITZ[name] * (1 + 1e-9) >= slopes.max()
    # and it is tight: within 1e-4 of the steepest secant on the grid
    assert ACTIVATION_LIPSCHITZ[name] <= slopes.max() + LOOSE.get(name, 1e-4)


def test_every_table_entry_is_checked_or_exact():
    assert set(ACTIVATION_LIPSCHITZ) - set(ACTIVATIONS) == {"softmax"}


def test_softmax_secants_below_one():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2, 2000, 5)) * 4

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    ratios = np.linalg.norm(softmax(x) - softmax(y), axis=1) / np.linalg.norm(x - y, axis=1)
    assert ratios.max() <= ACTIVATION_LIPSCHITZ["softmax"]


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("leaky_relu", {"negative_slope": 0.2}, 1.0),
        ("leaky_relu", {"negative_slope": -3.0}, 3.0),
        ("prelu", {"slopes": 1.5}, 1.5),
        ("elu", {"alpha": 0.5}, 1.0),
        ("elu", {"alpha": 2.5}, 2.5),
        ("hard_sigmoid_affine", {"alpha": 0.2}, 0.2),
        ("swish", {}, ACTIVATION_LIPSCHITZ["silu"]),
        ("selu", {"alpha": 0.5, "gamma": 2.0}, 2.0),
        ("selu", {}, ACTIVATION_LIPSCHITZ["selu"]),
    ],
)
def test_parametrized_activations(name, params, expected):
    assert activation_lipschitz(name, **params) == expected


@pytest.mark.parametrize(("alpha", "gamma"), [(1.67326319217681884765625, 1.05070102214813232421875),
                                              (3.0, 0.7), (-0.5, 1.2), (0.1, -2.0)])
def test_selu_with_any_constants_has_a_slope_range_that_holds_its_derivative(alpha, gamma):
    """ONNX's Selu carries its own α and γ: f = γx above 0, γα(eˣ − 1) below."""
    low, high = activation_slope_range("selu", alpha=alpha, gamma=gamma)
    slopes = np.diff(gamma * np.where(GRID > 0, GRID, alpha * np.expm1(GRID))) / np.diff(GRID)
    margin = 1e-9 * np.abs(slopes).max()  # the secants' rounding
    assert low <= slopes.min() + margin and slopes.max() - margin <= high
    assert high - low <= slopes.max() - slopes.min() + 1e-4
    assert activation_lipschitz("selu", alpha=alpha, gamma=gamma) == max(-low, high)


def test_unknown_activation_lists_the_known_ones():
    with pytest.raises(KeyError, match="no Lipschitz constant is known for activation 'exp'.*relu"):
        activation_lipschitz("exp")
    with pytest.raises(ValueError, match="'alpha' is required"):
        activation_lipschitz("elu")


@given(st.lists(st.floats(0, 1e150, allow_nan=False), max_size=6))
@settings(max_examples=60, deadline=None)
def test_algebra_never_rounds_below_the_exact_value(values):
    exact = [Fraction(v) for v in values]
    product = Fraction(1)
    for v in exact:
        product *= v
    assert _at_least(compose(values), product)
    assert _at_least(residual_sum(values), sum(exact, Fraction(0)))
    squares = sum((v * v for v in exact), Fraction(0))
    root = concatenation(values)
    assert math.isinf(root) or Fraction(root) ** 2 >= squares


def _at_least(bound: float, exact: Fraction) -> bool:
    """``bound >= exact``, where a bound that overflowed to inf is (uselessly) valid."""
    return math.isinf(bound) or Fraction(bound) >= exact


@pytest.mark.parametrize("values", [[1e-200], [1e-200, 3e-201], [5e-324, 5e-324], [1e200, 1e200],
                                    [2.5e-160, 1e-170]])
def test_concatenation_is_the_smallest_float_above_the_root_at_any_scale(values):
    """Squares that underflow or overflow as floats (regression: this once looped for ages)."""
    exact = sum((Fraction(v) ** 2 for v in values), Fraction(0))
    root = concatenation(values)
    assert Fraction(root) ** 2 >= exact > Fraction(math.nextafter(root, 0.0)) ** 2


@pytest.mark.parametrize("values", [[1.7e308, 1.7e308], [1.7976931348623157e308, 1e160],
                                    [1.7976931348623157e308, 5e-324]])
def test_concatenation_past_the_float_range_is_infinite(values):
    assert concatenation(values) == math.inf


def test_algebra_rejects_bad_bounds():
    with pytest.raises(ValueError, match="finite and non-negative"):
        compose([1.0, math.nan])
    with pytest.raises(ValueError, match="finite and non-negative"):
        residual_sum([-1.0])
    with pytest.raises(ValueError, match="finite and non-negative"):
        round_up(math.inf)


@given(st.integers(1, 7), st.integers(1, 4), st.integers(1, 3), st.integers(8, 30))
@settings(max_examples=60, deadline=None)
def test_windows_covering_matches_brute_force(kernel, stride, dilation, length):
    counts = np.zeros(length + (kernel - 1) * dilation + stride * 2, dtype=int)
    for start in range(0, length, stride):
        counts[start + dilation * np.arange(kernel)] += 1
    interior = counts[(kernel - 1) * dilation: length]
    worst = counts.max()
    assert windows_covering(kernel, stride, dilation) >= worst
    if interior.size and dilation == 1:
        assert windows_covering(kernel, stride, dilation) == interior.max()


def test_max_pool_constant():
    assert max_pool_lipschitz((2, 2), (2, 2)) == 1.0
    assert max_pool_lipschitz((3, 3), (2, 2)) >= 2.0
    assert max_pool_lipschitz((3, 3), (2, 2)) <= 2.0 + 1e-12
    assert max_pool_lipschitz((3,), (1,)) >= math.sqrt(3)


def test_importing_certify_loads_no_framework():
    import subprocess
    import sys

    code = ("import sys, lipnorm.bounds, lipnorm.certify, lipnorm.certify.cli; "
            "print(sorted(m for m in ('torch', 'keras', 'tensorflow', 'onnx', 'jax') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
