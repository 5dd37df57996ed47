"""The ladder of network certificates: slope ranges, soundness, tightness, the exact SDP check."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import lipnorm  # noqa: E402
from lipnorm.bounds import ACTIVATION_SLOPES, activation_lipschitz, activation_slope_range  # noqa: E402
from lipnorm.certify.methods.sdp import check_multipliers  # noqa: E402
from tests.jacobian_lower import largest_jacobian_norm  # noqa: E402

# torch functions of each activation with a slope range, and its parameters
_TORCH_ACTIVATIONS = {
    "relu": nn.ReLU(), "relu6": nn.ReLU6(), "hardtanh": nn.Hardtanh(), "tanh": nn.Tanh(),
    "sigmoid": nn.Sigmoid(), "hard_sigmoid": nn.Hardsigmoid(), "hard_swish": nn.Hardswish(),
    "softplus": nn.Softplus(), "softsign": nn.Softsign(), "log_sigmoid": nn.LogSigmoid(),
    "tanhshrink": nn.Tanhshrink(), "softshrink": nn.Softshrink(), "celu": nn.CELU(),
    "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU(),
    "mish": nn.Mish(), "selu": nn.SELU(), "abs": torch.abs,
}


def _derivative_on_grid(function):
    """f' on a fine grid of [-30, 30] and a geometric one out to ±1e4 (tails like softsign's)."""
    tail = torch.logspace(math.log10(30), 4, 2000, dtype=torch.float64)
    x = torch.cat([-tail.flip(0), torch.linspace(-30, 30, 600_001, dtype=torch.float64), tail])
    x.requires_grad_(True)
    function(x).sum().backward()
    return x.grad.numpy()


@pytest.mark.parametrize("name", sorted(_TORCH_ACTIVATIONS))
def test_slope_range_contains_the_derivative_and_is_tight(name):
    low, high = ACTIVATION_SLOPES[name]
    slope = _derivative_on_grid(_TORCH_ACTIVATIONS[name])
    # 1e-7: torch's float64 backward of hardsigmoid/hardswish multiplies by 1/6 rounded to
    # float32 (0.16666667); their forward, which the bound is about, divides by 6 exactly
    assert low - 1e-7 <= slope.min() and slope.max() <= high + 1e-7
    # tight: the interval's ends are within 1e-4 of the derivative's extremes
    assert slope.min() - low <= 1e-4 and high - slope.max() <= 1e-4
    assert activation_lipschitz(name) >= max(abs(low), abs(high)) - 1e-12


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "silu", "mish"])
def test_slope_range_at_the_analytic_extremes(name):
    """The derivative's minimum (x < 0) and maximum (x > 0), found by a local optimiser."""
    import scipy.optimize

    function = _TORCH_ACTIVATIONS[name]

    def derivative(t):
        point = torch.tensor(t, dtype=torch.float64, requires_grad=True)
        function(point).backward()
        return point.grad.item()

    low, high = ACTIVATION_SLOPES[name]
    lowest = scipy.optimize.minimize_scalar(derivative, bounds=(-5, 0), method="bounded",
                                            options={"xatol": 1e-10}).fun
    highest = -scipy.optimize.minimize_scalar(lambda t: -derivative(t), bounds=(0, 5), method="bounded",
                                              options={"xatol": 1e-10}).fun
    assert low <= lowest <= low + 1e-4
    assert high - 1e-4 <= highest <= high


@pytest.mark.parametrize("name, parameters, expected", [
    ("leaky_relu", {"negative_slope": 0.2}, (0.2, 1.0)),
    ("leaky_relu", {"negative_slope": 1.5}, (1.0, 1.5)),
    ("leaky_relu", {"negative_slope": -0.5}, (-0.5, 1.0)),
    ("prelu", {"slopes": np.array([0.1, -0.3, 0.25])}, (-0.3, 1.0)),
    ("elu", {"alpha": 0.5}, (0.0, 1.0)),
    ("elu", {"alpha": 2.0}, (0.0, 2.0)),
    ("elu", {"alpha": -1.0}, (-1.0, 1.0)),
    ("hard_sigmoid_affine", {"alpha": 0.2}, (0.0, 0.2)),
])
def test_parametrized_slope_ranges(name, parameters, expected):
    assert activation_slope_range(name, **parameters) == expected


def test_softmax_has_no_slope_range_and_unknown_names_are_refused():
    assert activation_slope_range("softmax") is None
    with pytest.raises(KeyError, match="no Lipschitz constant is known"):
        activation_slope_range("nonsense")


# ---------------------------------------------------------------------------------------------
# Random networks: every method's bound is above the largest Jacobian norm found
# ---------------------------------------------------------------------------------------------

_ACTIVATION_CHOICES = ["relu", "tanh", "sigmoid", "gelu", "silu", "leaky_relu", "elu", "softplus", "mish"]


def _activation(name):
    if name == "leaky_relu":
        return nn.LeakyReLU(0.3)
    if name == "elu":
        return nn.ELU(0.7)
    return _TORCH_ACTIVATIONS[name]


class _Residual(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class _Concat(nn.Module):
    def __init__(self, left, right, dim):
        super().__init__()
        self.left, self.right, self.dim = left, right, dim

    def forward(self, x):
        return torch.cat([self.left(x), self.right(x)], dim=self.dim)


def _batch_norm(channels, generator, dims):
    layer = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(channels)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(channels, generator=generator) * 1.5 + 0.25)
        layer.bias.copy_(torch.randn(channels, generator=generator))
        layer.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
        layer.running_mean.copy_(torch.randn(channels, generator=generator))
    return layer


@st.composite
def random_networks(draw):
    """A small torch network (float64, eval) and its input shape."""
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    convolutional = draw(st.booleans())
    layers = []
    if convolutional:
        channels = draw(st.integers(1, 3))
        size = 5
        shape = (channels, size, size)
        for _ in range(draw(st.integers(1, 2))):
            kind = draw(st.sampled_from(["conv", "residual", "concat", "bn"]))
            width = draw(st.integers(1, 4))
            act = _activation(draw(st.sampled_from(_ACTIVATION_CHOICES)))
            if kind == "conv":
                layers += [nn.Conv2d(channels, width, 3, padding=1), act]
                channels = width
            elif kind == "bn":
                layers += [nn.Conv2d(channels, width, 3, padding=1), _batch_norm(width, generator, 2), act]
                channels = width
            elif kind == "residual":
                layers += [_Residual(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), act,
                                                   nn.Conv2d(channels, channels, 3, padding=1))), act]
            else:
                layers += [_Concat(nn.Conv2d(channels, width, 3, padding=1), nn.Identity(), 1), act]
                channels += width
        if draw(st.booleans()):
            layers.append(draw(st.sampled_from([nn.MaxPool2d(2), nn.AvgPool2d(2)])))
            size = 2
        layers += [nn.Flatten(), nn.Linear(channels * size * size, draw(st.integers(1, 4)))]
    else:
        width = draw(st.integers(2, 6))
        shape = (width,)
        for _ in range(draw(st.integers(1, 3))):
            kind = draw(st.sampled_from(["linear", "residual", "bn"]))
            out = draw(st.integers(2, 8))
            act = _activation(draw(st.sampled_from(_ACTIVATION_CHOICES)))
            if kind == "linear":
                layers += [nn.Linear(width, out), act]
                width = out
            elif kind == "bn":
                layers += [nn.Linear(width, out), _batch_norm(out, generator, 1), act]
                width = out
            else:
                layers += [_Residual(nn.Sequential(nn.Linear(width, out), act, nn.Linear(out, width)))]
        layers.append(nn.Linear(width, draw(st.integers(1, 4))))
    scale = draw(st.sampled_from([0.5, 1.0, 2.0]))
    model = nn.Sequential(*layers).double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(scale)
    return model, shape


def _largest_jacobian_norm(model, shape, seed=0, starts=12, steps=30):
    """An ascent on ‖J(x)‖₂ (:func:`tests.jacobian_lower.largest_jacobian_norm`): a lower bound."""
    return largest_jacobian_norm(model, shape, starts=starts, steps=steps, lr=0.05, seed=seed)


@settings(max_examples=25, deadline=None)
@given(random_networks())
def test_every_method_is_sound_and_the_ladder_is_monotone(case):
    model, shape = case
    truth_below = _largest_jacobian_norm(model, shape)
    certificates = {m: lipnorm.certify(model, shape, method=m, time_budget=20) for m in ("product", "chain", "sdp")}
    for method, certificate in certificates.items():
        for run in certificate.ladder:
            if run.upper is not None:
                assert run.upper >= truth_below * (1 - 1e-9), (method, run)
        assert certificate.verify() <= certificate.upper
    assert certificates["sdp"].upper <= certificates["chain"].upper <= certificates["product"].upper


def test_a_linear_network_gets_its_exact_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.LeakyReLU(1.0), nn.Linear(9, 5), nn.Identity(),
                          nn.Linear(5, 3)).double().eval()
    exact = float(np.linalg.norm(
        (model[4].weight @ model[2].weight @ model[0].weight).detach().numpy(), 2))
    for method in ("chain", "sdp"):
        certificate = lipnorm.certify(model, (6,), method=method)
        assert exact <= certificate.upper <= exact * (1 + 1e-7), method


def test_gelu_ranges_make_the_bound_exact_where_zero_one_slopes_are_unsound():
    # f(x) = GELU(x) + GELU(-x) has slope 1.2578 at ±√2; a [0, 1]-slope analysis says 1
    layer = nn.Linear(1, 2, bias=False)
    out = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        out.weight.copy_(torch.tensor([[1.0, 1.0]]))
    model = nn.Sequential(layer, nn.GELU(), out).double().eval()
    truth = _largest_jacobian_norm(model, (1,))
    assert truth > 1.2577
    certificate = lipnorm.certify(model, (1,), method="chain")
    assert truth <= certificate.upper <= 1.2581  # 2 · (1.129 + 0.129)/2, the range rounded outward
    assert certificate.method == "chain"


def test_a_conv_residual_network_is_tighter_than_the_product():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        _Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))),
        nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3),
    ).double().eval()
    certificate = lipnorm.certify(model, (1, 6, 6), method="auto", time_budget=30)
    runs = {run.method: run for run in certificate.ladder}
    assert runs["chain"].upper < runs["product"].upper
    assert certificate.upper <= runs["chain"].upper
    assert certificate.upper >= _largest_jacobian_norm(model, (1, 6, 6), starts=4)


def test_the_sdp_check_rejects_multipliers_made_infeasible():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 12), nn.GELU(), nn.Linear(12, 3)).double().eval()
    certificate = lipnorm.certify(model, (5,), method="sdp")
    proof = certificate.proof.proofs["sdp"]
    assert check_multipliers(proof.network, proof.multipliers, proof.rho)
    assert not check_multipliers(proof.network, proof.multipliers, proof.rho * 0.98)
    assert not check_multipliers(proof.network, [m * 1e-6 for m in proof.multipliers], proof.rho)
    assert not check_multipliers(proof.network, [-m for m in proof.multipliers], proof.rho)
    proof.rho *= 0.98
    with pytest.raises(ValueError, match="do not certify"):
        certificate.verify()


def test_sdp_too_large_for_the_budget_is_an_error_naming_size_and_budget():
    model = nn.Sequential(nn.Linear(64, 3000), nn.ReLU(), nn.Linear(3000, 10)).double().eval()
    with pytest.raises(ValueError, match=r"3064 variables.*share of the time budget \(1 s\)"):
        lipnorm.certify(model, (64,), method="sdp", time_budget=1)
    certificate = lipnorm.certify(model, (64,), method="auto", time_budget=1)
    runs = {run.method: run for run in certificate.ladder}
    assert runs["sdp"].upper is None and "time budget" in runs["sdp"].note
    assert certificate.upper <= runs["product"].upper


def test_a_layer_without_a_dense_view_falls_back_under_auto_and_is_an_error_when_named():
    class Gather(nn.Module):  # a permutation of the flat vector: norm 1, no dense view kept
        def forward(self, x):
            return x.flip(-1)

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), Gather(), nn.Linear(6, 2)).double().eval()
    certificate = lipnorm.certify(model, (4,), method="auto")
    assert certificate.method in ("chain", "sdp", "product")
    assert certificate.upper <= certificate.ladder[0].upper


def test_rows_bound_each_logit_difference():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)).double().eval()
    rows = np.array([[1.0, -1.0, 0, 0], [0, 1.0, 0, -1.0], [0.0, 0, 1.0, -1.0]])
    for method in ("product", "chain", "sdp"):
        certificate = lipnorm.certify(model, (6,), method=method, rows=rows)
        bounds = np.array(certificate.row_upper)
        assert bounds.shape == (3,)
        for row, bound in zip(rows, bounds):
            functional = nn.Sequential(model, nn.Linear(4, 1, bias=False)).double().eval()
            with torch.no_grad():
                functional[1].weight.copy_(torch.tensor(row)[None])
            assert bound >= _largest_jacobian_norm(functional, (6,), starts=4, steps=10) * (1 - 1e-9)
        assert np.all(bounds <= np.array(lipnorm.certify(model, (6,), method="product", rows=rows).row_upper))
        assert certificate.verify() == pytest.approx(float(np.max(bounds)), rel=1e-9)


def test_bad_method_and_budget_are_errors():
    model = nn.Sequential(nn.Linear(3, 2)).eval()
    with pytest.raises(ValueError, match="unknown method 'lipsdp'"):
        lipnorm.certify(model, (3,), method="lipsdp")
    with pytest.raises(ValueError, match="time_budget must be a positive"):
        lipnorm.certify(model, (3,), time_budget=0)
    with pytest.raises(ValueError, match="rows have 5 columns but the model has 2 outputs"):
        lipnorm.certify(model, (3,), rows=np.ones((1, 5)))


def test_keras_and_onnx_models_climb_the_ladder():
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(12, activation="gelu"),
                              keras.layers.Dense(12, activation="tanh"), keras.layers.Dense(3)])
    certificate = lipnorm.certify(model, method="auto", time_budget=20)
    runs = {run.method: run.upper for run in certificate.ladder}
    assert runs["sdp"] is not None and runs["chain"] <= runs["product"]
    assert certificate.upper == min(v for v in runs.values() if v is not None)


class _Difference(nn.Module):
    """x ↦ A x − B x with B = −A: 2A x. Read as a sum, the tight methods would see A x + B x = 0."""

    def __init__(self, constant_first=False):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2, bias=False), nn.Linear(3, 2, bias=False)
        self.constant_first = constant_first
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]]))
            self.b.weight.copy_(-self.a.weight)

    def forward(self, x):
        if self.constant_first:  # (1 − A x) + B x = 1 − 2 A x; read as a sum, A x + B x = 0
            return (1.0 - self.a(x)) + self.b(x)
        return self.a(x) - self.b(x)


def _difference_truth():
    weight = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]])
    return 2 * float(np.linalg.norm(weight, 2))


@pytest.mark.parametrize("constant_first", [False, True])
def test_a_difference_is_not_read_as_a_sum_by_torch(constant_first):
    model = _Difference(constant_first).double().eval()
    truth = _largest_jacobian_norm(model, (3,), starts=2, steps=2)
    assert truth == pytest.approx(_difference_truth(), rel=1e-9)
    for method in ("chain", "sdp"):
        certificate = lipnorm.certify(model, (3,), method=method)
        assert certificate.upper >= truth * (1 - 1e-9), method


def test_a_difference_is_not_read_as_a_sum_by_keras_and_onnx():
    keras = pytest.importorskip("keras")
    onnx_export = pytest.importorskip("tests.test_certify_onnx")
    weight = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]])
    inputs = keras.Input((3,))
    a = keras.layers.Dense(2, use_bias=False)
    b = keras.layers.Dense(2, use_bias=False)
    difference = keras.layers.Subtract()([a(inputs), b(inputs)])
    shifted = keras.ops.subtract(1.0, a(inputs))  # 1 − A x
    model = keras.Model(inputs, keras.layers.Subtract()([difference, shifted]))  # A x − B x − 1 + A x
    a.set_weights([weight.T])
    b.set_weights([-weight.T])
    truth = 3 * float(np.linalg.norm(weight, 2))
    for method in ("chain", "sdp"):
        assert lipnorm.certify(model, method=method).upper >= truth * (1 - 1e-6), method
    proto = onnx_export.export(_Difference().eval(), (3,))
    for method in ("chain", "sdp"):
        assert lipnorm.certify(proto, method=method).upper >= _difference_truth() * (1 - 1e-6), method


def _context(model, shape, budget):
    import time

    from lipnorm.certify.graph import prepare_graph
    from lipnorm.certify.methods import MethodContext
    from lipnorm.certify.methods.product import bound_nodes, product_bound
    from lipnorm.certify.torch_frontend import build_graph

    builder, shape = build_graph(model, shape)
    graph = builder.graph
    graph.record_shape(graph.input_name, (1, *shape))
    prepare_graph(graph)
    node_bounds = bound_nodes(graph)
    return MethodContext(graph, product_bound(graph, node_bounds), node_bounds, None, time.perf_counter() + budget)


def test_budget_shares_go_to_the_methods_that_can_run():
    from lipnorm.certify.ladder import SHARED_FRACTION, budget_shares

    names = ("chain", "conv_sdp", "sdp")
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).double().eval()
    shares = budget_shares(_context(mlp, (4,), 10), names, 10)  # no torus view: conv_sdp does not run
    shared = SHARED_FRACTION * 10
    assert shares == pytest.approx({"chain": shared / 5, "conv_sdp": shared, "sdp": shared * 4 / 5})
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 2)).double().eval()
    shares = budget_shares(_context(cnn, (1, 4, 4), 10), names, 10)
    assert shares == pytest.approx({"chain": shared / 9, "conv_sdp": shared * 4 / 9, "sdp": shared * 4 / 9})
    wide = nn.Sequential(nn.Linear(64, 3000), nn.ReLU(), nn.Linear(3000, 10)).double().eval()
    shares = budget_shares(_context(wide, (64,), 1), names, 1)  # the SDP would not fit: chain takes it all
    assert shares["chain"] == pytest.approx(SHARED_FRACTION) and shares["sdp"] < 76
    # the shares are the graph's and the budget's, not the clock's
    context = _context(cnn, (1, 4, 4), 10)
    assert budget_shares(context, names, 10) == budget_shares(context, names, 10)


def test_auto_gives_the_same_bound_twice():
    """The SDP methods' steps are fixed from the cost model and the share, not from the clock."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)).double().eval()
    first, second = (lipnorm.certify(model, (1, 4, 4), method="auto", time_budget=60) for _ in range(2))
    assert [run.upper for run in first.ladder] == [run.upper for run in second.ladder]
    assert first.upper <= first.ladder[0].upper


def test_sdp_pulls_multipliers_back_where_the_check_fails_at_the_edge(monkeypatch):
    """Max pooling of the input alone: Adam drives its multiplier to the edge of feasibility,
    where the exact check fails; pulled back toward the feasible start, it passes."""
    from lipnorm.certify.methods import sdp

    torch.manual_seed(0)
    model = nn.Sequential(nn.MaxPool1d(2), nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    monkeypatch.setattr(sdp, "PULL_BACK", (0.0,))
    runs = {run.method: run for run in lipnorm.certify(model, (2, 8), method="sdp", time_budget=10).ladder}
    assert runs["sdp"].upper is None and "could not be certified" in runs["sdp"].note
    monkeypatch.undo()
    certificate = lipnorm.certify(model, (2, 8), method="sdp", time_budget=10)
    runs = {run.method: run for run in certificate.ladder}
    assert runs["sdp"].upper is not None and runs["sdp"].upper < runs["product"].upper
    assert certificate.verify() == certificate.upper
    lower = lipnorm.lipschitz_lower_bound(model, input_shape=(2, 8), starts=16, steps=40).value
    assert lower <= certificate.upper
