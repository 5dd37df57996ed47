"""Lipschitz-bound algebra: composition, residual sums, concatenation, activation constants.

Every function here returns a float that is a true upper bound *after rounding*: each
floating-point result is compared exactly (with :class:`fractions.Fraction`) against the
exact value of the operation and stepped to the next float above when it fell short, so
the computed bound never falls below the exact value of the formula.

All bounds are Lipschitz constants for the Euclidean (L2) norm on inputs and outputs.

References
----------
.. [1] Gouk, Frank, Pfahringer, Cree, "Regularisation of neural networks by enforcing
   Lipschitz continuity", Machine Learning 110 (2021), section 3 (composition, residual
   sums, pooling).
.. [2] Gao, Pavel, "On the properties of the softmax function with application in game
   theory and reinforcement learning", arXiv:1704.00805 (2017), proposition 4 (softmax is
   1-Lipschitz).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from fractions import Fraction

__all__ = [
    "ACTIVATION_LIPSCHITZ",
    "ACTIVATION_SLOPES",
    "activation_lipschitz",
    "activation_slope_range",
    "compose",
    "concatenation",
    "max_pool_lipschitz",
    "residual_sum",
    "round_up",
    "windows_covering",
]


def round_up(value: float) -> float:
    """The next float above ``value`` (the smallest float strictly greater).

    Parameters
    ----------
    value : float
        A finite, non-negative number.

    Returns
    -------
    float
        ``math.nextafter(value, inf)``; used after every rounded operation.

    Raises
    ------
    ValueError
        If ``value`` is negative, NaN or infinite.

    Example
    -------
    >>> round_up(1.0) > 1.0
    True
    """
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"a Lipschitz bound must be finite and non-negative, got {value!r}")
    return math.nextafter(value, math.inf)


def compose(bounds: Iterable[float]) -> float:
    """Upper bound of Lip(f_k ∘ … ∘ f_1) given upper bounds L_i of each Lip(f_i).

    Lip(g ∘ f) ≤ Lip(g)·Lip(f); the product is formed exactly (fractions) and rounded up
    once, to ``inf`` when it passes the float range.

    Parameters
    ----------
    bounds : iterable of float
        Upper bounds of the Lipschitz constants of the composed maps (any order).

    Returns
    -------
    float
        An upper bound of the Lipschitz constant of the composition (1.0 for no maps).

    Example
    -------
    >>> compose([2.0, 0.5]) >= 1.0
    True
    """
    total = Fraction(1)
    for bound in bounds:
        total *= Fraction(_checked(bound))
    return _float_at_least(total)


def residual_sum(bounds: Iterable[float]) -> float:
    """Upper bound of Lip(f_1 + … + f_k) given upper bounds of each Lip(f_i).

    ‖Σ f_i(x) − Σ f_i(y)‖ ≤ Σ ‖f_i(x) − f_i(y)‖ ≤ (Σ L_i)‖x − y‖. A residual block
    x + F(x) is the sum of the identity (1) and F (L_F).

    Parameters
    ----------
    bounds : iterable of float
        Upper bounds of the Lipschitz constants of the summed branches.

    Returns
    -------
    float
        The exact sum rounded up (``inf`` past the float range).

    Example
    -------
    >>> residual_sum([1.0, 2.5]) >= 3.5
    True
    """
    total = Fraction(0)
    for bound in bounds:
        total += Fraction(_checked(bound))
    return _float_at_least(total)


def concatenation(bounds: Iterable[float]) -> float:
    """Upper bound of Lip(x ↦ (f_1(x), …, f_k(x))) given upper bounds of each Lip(f_i).

    ‖(f_i(x) − f_i(y))_i‖² = Σ ‖f_i(x) − f_i(y)‖² ≤ (Σ L_i²)‖x − y‖², so the bound
    is √(Σ L_i²) — tighter than the sum.

    Parameters
    ----------
    bounds : iterable of float
        Upper bounds of the Lipschitz constants of the concatenated branches.

    Returns
    -------
    float
        The rounded-up root of the sum of squares (``inf`` past the float range).

    Example
    -------
    >>> concatenation([3.0, 4.0]) >= 5.0
    True
    """
    total = Fraction(0)
    for bound in bounds:
        checked = Fraction(_checked(bound))
        total += checked * checked
    root = _sqrt_near(total)
    while math.isfinite(root) and Fraction(root) ** 2 < total:
        root = math.nextafter(root, math.inf)  # inf once past the largest float
    return root


def _sqrt_near(value: Fraction) -> float:
    """A float within a few ulps of ``sqrt(value)`` (``inf`` past the float range).

    ``value`` is scaled by an exact power of four into [1/4, 4] first, so squares that
    underflow or overflow as floats (bounds near 1e-200 or 1e200) cost no more than others.
    """
    if value == 0:
        return 0.0
    half_exponent = (value.numerator.bit_length() - value.denominator.bit_length()) // 2
    scaled = value / Fraction(4) ** half_exponent
    try:
        return math.ldexp(math.sqrt(float(scaled)), half_exponent)
    except OverflowError:
        return math.inf


def windows_covering(kernel: int, stride: int, dilation: int = 1) -> int:
    """Most pooling windows along one axis that contain one input position.

    A window starting at ``j·stride`` covers ``j·stride + t·dilation`` for
    ``t < kernel``. Position x is reached through tap t only if t·dilation ≡ x (mod
    stride), which holds for one residue of t modulo stride/gcd(stride, dilation): at most
    ``⌈kernel / (stride/gcd)⌉`` windows. The starts also lie in an interval of length
    ``(kernel − 1)·dilation``: at most ``⌊(kernel − 1)·dilation / stride⌋ + 1``.

    Parameters
    ----------
    kernel, stride, dilation : int
        Window size, step and dilation along the axis (all ≥ 1).

    Returns
    -------
    int
        The smaller of the two counts (``⌈kernel/stride⌉`` when ``dilation == 1``).

    Raises
    ------
    ValueError
        If any argument is below 1.

    Example
    -------
    >>> windows_covering(3, 2)
    2
    """
    if min(kernel, stride, dilation) < 1:
        raise ValueError(
            f"pooling kernel, stride and dilation must be >= 1, got {kernel}, {stride}, {dilation}"
        )
    period = stride // math.gcd(stride, dilation)
    return min(-(-kernel // period), (kernel - 1) * dilation // stride + 1)


def max_pool_lipschitz(
    kernel: Iterable[int], stride: Iterable[int], dilation: Iterable[int] | None = None
) -> float:
    """Upper bound of the Lipschitz constant of max pooling: √m.

    Each output is one of the inputs in its window, so
    ‖maxpool(x) − maxpool(y)‖² ≤ Σ_windows max_{i∈w} |x_i − y_i|² ≤ m‖x − y‖², where m
    is the most windows containing one input (a product over axes of
    :func:`windows_covering`). Padding with −∞ changes nothing.

    Parameters
    ----------
    kernel, stride : iterable of int
        Window size and step per spatial axis.
    dilation : iterable of int, optional
        Dilation per axis (default 1).

    Returns
    -------
    float
        √m, rounded up (1.0 when windows do not overlap).

    Example
    -------
    >>> round(max_pool_lipschitz((3, 3), (2, 2)), 12)
    2.0
    """
    kernel = tuple(kernel)
    stride = tuple(stride)
    dilation = tuple(dilation) if dilation is not None else (1,) * len(kernel)
    if not len(kernel) == len(stride) == len(dilation):
        raise ValueError(
            f"kernel {kernel}, stride {stride} and dilation {dilation} must have one entry per axis"
        )
    windows = 1
    for k, s, d in zip(kernel, stride, dilation):
        windows *= windows_covering(k, s, d)
    return 1.0 if windows == 1 else round_up(math.sqrt(windows))


# Upper bounds of sup |f'| for the elementwise activations without parameters. Values
# with decimals are the maxima of |f'| computed on a fine grid and rounded *up* in the
# fifth decimal (see tests/test_bounds.py, which checks each against the derivative).
ACTIVATION_LIPSCHITZ: dict[str, float] = {
    "identity": 1.0,
    "relu": 1.0,
    "relu6": 1.0,
    "hardtanh": 1.0,
    "tanh": 1.0,
    "sigmoid": 0.25,
    "hard_sigmoid": math.nextafter(1.0 / 6.0, math.inf),  # relu6(x + 3) / 6 (torch, keras 3)
    "hard_swish": 1.5,  # x·relu6(x + 3)/6: slope (2x + 3)/6 reaches 1.5 at x = 3
    "softplus": 1.0,
    "softsign": 1.0,
    "log_sigmoid": 1.0,
    "tanhshrink": 1.0,
    "softshrink": 1.0,
    "celu": 1.0,
    # max GELU' = 1.1289041…, and 1.1289931… for the tanh approximation: one constant
    # for both, since a serialized "gelu" does not always say which one it is
    "gelu": 1.12900,
    "gelu_tanh": 1.12900,
    "silu": 1.09984,  # max SiLU' = 1.0998393…
    "mish": 1.08850,  # max Mish' = 1.0884982… (min −0.1125)
    "selu": 1.75810,  # λ·α = 1.0507010 · 1.6732632 = 1.7580993…
    "softmax": 1.0,  # [2], proposition 4
    "abs": 1.0,
    "sparse_plus": 1.0,
    "squareplus": 1.0,  # (x + √(x² + b))/2: slope (1 + x/√(x² + b))/2 < 1
}

# Certified derivative intervals [a, b] (a <= f'(x) <= b for every x) of the elementwise
# activations without parameters. The tight network certificates use them: an activation
# is m·x plus a map whose slope stays within ±(b − a)/2 of m = (a + b)/2. Decimals are the
# extremes of f' computed on a fine grid and refined by a local optimiser, rounded
# *outward* in the fifth decimal (tests/test_bounds.py checks each against the derivative).
# Softmax is not elementwise and has no entry.
ACTIVATION_SLOPES: dict[str, tuple[float, float]] = {
    "identity": (1.0, 1.0),
    "relu": (0.0, 1.0),
    "relu6": (0.0, 1.0),
    "hardtanh": (0.0, 1.0),
    "tanh": (0.0, 1.0),
    "sigmoid": (0.0, 0.25),
    "hard_sigmoid": (0.0, ACTIVATION_LIPSCHITZ["hard_sigmoid"]),
    "hard_swish": (-0.5, 1.5),  # (2x + 3)/6 on [−3, 3], 0 below, 1 above
    "softplus": (0.0, 1.0),
    "softsign": (0.0, 1.0),  # 1/(1 + |x|)²
    "log_sigmoid": (0.0, 1.0),  # sigmoid(−x)
    "tanhshrink": (0.0, 1.0),  # tanh(x)²
    "softshrink": (0.0, 1.0),
    "celu": (0.0, 1.0),  # α > 0 (a negative α is refused): e^{x/α} below 0
    # GELU'(x) + GELU'(−x) = 1 (GELU(x) − GELU(−x) = x), so min = 1 − max; the tanh
    # approximation's extremes (−0.1289931, 1.1289931) contain the exact ones (±0.1289041)
    "gelu": (-0.12900, 1.12900),
    "gelu_tanh": (-0.12900, 1.12900),
    "silu": (-0.09984, 1.09984),  # SiLU' ∈ [−0.0998393…, 1.0998393…], symmetric as GELU's
    "mish": (-0.11253, 1.08850),  # Mish' ∈ [−0.1125261…, 1.0884982…]
    "selu": (0.0, ACTIVATION_LIPSCHITZ["selu"]),  # λα·e^x below 0, λ = 1.0507 above
    "abs": (-1.0, 1.0),
    "sparse_plus": (0.0, 1.0),
    "squareplus": (0.0, 1.0),
}

_ALIASES = {
    "linear": "identity",
    "swish": "silu",
    "hard_silu": "hard_swish",
    "hardswish": "hard_swish",
    "hardsigmoid": "hard_sigmoid",
    "logsigmoid": "log_sigmoid",
    "log_sigmoid": "log_sigmoid",
    "clip": "hardtanh",
    "hard_tanh": "hardtanh",
    "tanh_shrink": "tanhshrink",
    "soft_shrink": "softshrink",
}


def activation_lipschitz(name: str, **parameters: float) -> float:
    """Upper bound of the Lipschitz constant of an elementwise activation (or softmax).

    Parameters
    ----------
    name : str
        Activation name, lower case: one of :data:`ACTIVATION_LIPSCHITZ`, an alias
        (``"swish"``, ``"linear"``, ...), or a parametrized one:
        ``"leaky_relu"`` (``negative_slope``), ``"prelu"`` (``slopes``: the learned
        slopes, an array or a scalar), ``"elu"`` (``alpha``), ``"hard_sigmoid_affine"``
        (``alpha``: the slope, ONNX's HardSigmoid), and ``"selu"`` with ``alpha`` and
        ``gamma`` (ONNX's Selu, any constants; without them torch's and Keras's).
    **parameters : float
        The activation's parameters, as listed above.

    Returns
    -------
    float
        An upper bound of sup |f'| — the Lipschitz constant of f applied elementwise.

    Raises
    ------
    KeyError
        If the activation is unknown; the message lists the known names.
    ValueError
        If a parameter is missing or not finite.

    Example
    -------
    >>> activation_lipschitz("leaky_relu", negative_slope=0.2)
    1.0
    >>> activation_lipschitz("elu", alpha=2.0)
    2.0
    """
    key = _ALIASES.get(name, name)
    if key == "prelu" or (key == "selu" and parameters):
        low, high = activation_slope_range(key, **parameters)
        return max(abs(low), abs(high))
    if key in ACTIVATION_LIPSCHITZ:
        return ACTIVATION_LIPSCHITZ[key]
    if key == "leaky_relu":
        return max(1.0, abs(_parameter(parameters, "negative_slope")))
    if key == "elu":
        return max(1.0, abs(_parameter(parameters, "alpha")))
    if key == "hard_sigmoid_affine":
        return abs(_parameter(parameters, "alpha"))
    known = sorted({*ACTIVATION_LIPSCHITZ, *_ALIASES, "leaky_relu", "prelu", "elu"})
    raise KeyError(
        f"no Lipschitz constant is known for activation {name!r}; known: {', '.join(known)}"
    )


def activation_slope_range(name: str, **parameters: float) -> tuple[float, float] | None:
    """Certified interval ``[a, b]`` containing the derivative of an elementwise activation.

    ``max(|a|, |b|)`` is the activation's Lipschitz constant
    (:func:`activation_lipschitz`); the interval says more: the tight network
    certificates split f(x) = m·x + ψ(x) with m = (a + b)/2 and ψ being
    (b − a)/2-Lipschitz.

    Parameters
    ----------
    name : str
        As for :func:`activation_lipschitz` (``"leaky_relu"`` with ``negative_slope``,
        ``"prelu"`` with ``slopes`` — all learned slopes, an array —, ``"elu"`` with
        ``alpha``, ``"hard_sigmoid_affine"`` with ``alpha``, ``"selu"`` optionally with
        ``alpha`` and ``gamma``).
    **parameters : float or array_like

    Returns
    -------
    tuple of float, or None
        ``(a, b)`` with ``a <= f'(x) <= b`` for every x; None for softmax, which is not
        elementwise.

    Raises
    ------
    KeyError
        If the activation is unknown.
    ValueError
        If a parameter is missing or not finite.

    Example
    -------
    >>> activation_slope_range("leaky_relu", negative_slope=0.2)
    (0.2, 1.0)
    >>> activation_slope_range("gelu")
    (-0.129, 1.129)
    """
    key = _ALIASES.get(name, name)
    if key == "selu" and parameters:  # γ above 0, γα·e^x below: between 0 and γα
        gamma, scaled = _parameter(parameters, "gamma"), _parameter(parameters, "alpha")
        scaled *= gamma  # rounded to nearest: widen by one ulp each way
        return (min(0.0, gamma, math.nextafter(scaled, -math.inf)),
                max(0.0, gamma, math.nextafter(scaled, math.inf)))
    if key in ACTIVATION_SLOPES:
        return ACTIVATION_SLOPES[key]
    if key == "softmax":
        return None
    if key == "leaky_relu":
        s = _parameter(parameters, "negative_slope")
        return min(s, 1.0), max(s, 1.0)
    if key == "prelu":
        if "slopes" not in parameters:
            raise ValueError("activation parameter 'slopes' is required")
        slopes = [float(v) for v in _flat(parameters["slopes"])]
        if not slopes or not all(math.isfinite(v) for v in slopes):
            raise ValueError("PReLU slopes must be finite and non-empty")
        return min(min(slopes), 1.0), max(max(slopes), 1.0)
    if key == "elu":
        alpha = _parameter(parameters, "alpha")  # α·e^x below 0: between 0 and α
        return min(0.0, alpha), max(1.0, alpha)
    if key == "hard_sigmoid_affine":
        alpha = _parameter(parameters, "alpha")
        return min(0.0, alpha), max(0.0, alpha)
    activation_lipschitz(name, **parameters)  # raises the KeyError that lists the names
    raise AssertionError(f"activation {name!r} has a constant but no slope range")


def _flat(values) -> list:
    """The entries of a scalar, a sequence or an array, as a flat list."""
    if hasattr(values, "ravel"):
        return list(values.ravel())
    if isinstance(values, (list, tuple)):
        return [v for item in values for v in _flat(item)]
    return [values]


def _float_at_least(exact: Fraction) -> float:
    """The smallest float ``>= exact`` (``inf`` past the largest float)."""
    if exact > Fraction(sys.float_info.max):
        return math.inf
    value = float(exact)  # correctly rounded to nearest
    return value if Fraction(value) >= exact else math.nextafter(value, math.inf)


def _parameter(parameters: dict[str, float], name: str) -> float:
    if name not in parameters:
        raise ValueError(f"activation parameter {name!r} is required")
    value = float(parameters[name])
    if not math.isfinite(value):
        raise ValueError(f"activation parameter {name!r} must be finite, got {value!r}")
    return value


def _checked(bound: float) -> float:
    bound = float(bound)
    if not math.isfinite(bound) or bound < 0:
        raise ValueError(f"a Lipschitz bound must be finite and non-negative, got {bound!r}")
    return bound
