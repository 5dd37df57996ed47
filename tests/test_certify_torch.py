"""certify() on PyTorch models: soundness on random networks, exactness on linear ones,
refusals and rules."""

import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from lipnorm.certify import NotCertifiableError, certify, lipschitz_lower_bound  # noqa: E402
from tests.helpers import FLOAT64_EVALUATION_SLACK  # noqa: E402

ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Softplus,
               lambda: nn.LeakyReLU(0.3), nn.Hardswish, nn.SELU, lambda: nn.PReLU(init=0.7)]


def max_secant(model, shape, pairs=64, seed=0):
    """max ‖f(x) − f(y)‖/‖x − y‖ over random close and far pairs, in float64."""
    g = torch.Generator().manual_seed(seed)
    model = model.double()
    x = torch.randn((pairs, *shape), generator=g, dtype=torch.float64)
    scale = torch.logspace(-3, 0, pairs, dtype=torch.float64).reshape(-1, *([1] * len(shape)))
    y = x + scale * torch.randn((pairs, *shape), generator=g, dtype=torch.float64)
    with torch.no_grad():
        fx, fy = model(x), model(y)
    return float(((fx - fy).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)).max())


class Residual(nn.Module):
    def __init__(self, body, shortcut=None):
        super().__init__()
        self.body, self.shortcut = body, shortcut

    def forward(self, x):
        return (x if self.shortcut is None else self.shortcut(x)) + self.body(x)


class Branches(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


@st.composite
def networks_with_shape(draw):
    """Small CNNs of every supported layer kind, with their input shape."""
    channels, size = draw(st.integers(1, 3)), draw(st.integers(5, 8))
    return draw(_network(channels, size)), (channels, size, size)


@st.composite
def _network(draw, channels, size):
    def randomize_bn(bn):
        bn.running_var.uniform_(0.3, 3.0)
        bn.running_mean.normal_()
        bn.weight.data.uniform_(-2, 2)
        return bn

    layers = []
    torch.manual_seed(draw(st.integers(0, 2**16)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "bn", "act", "pool", "residual", "concat", "pad"]))
        if kind == "conv":
            out = draw(st.integers(1, 4))
            groups = channels if (draw(st.booleans()) and out % channels == 0) else 1
            k = draw(st.sampled_from([1, 2, 3]))
            stride = draw(st.sampled_from([1, 2]))
            pad = draw(st.integers(0, 1))
            dil = draw(st.sampled_from([1, 2]))
            if size + 2 * pad < dil * (k - 1) + 1:
                continue
            layers.append(nn.Conv2d(channels, out, k, stride=stride, padding=pad, dilation=dil,
                                    groups=groups))
            channels, size = out, (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
        elif kind == "bn":
            layers.append(randomize_bn(nn.BatchNorm2d(channels)))
        elif kind == "act":
            layers.append(draw(st.sampled_from(ACTIVATIONS))())
        elif kind == "pool" and size >= 3:
            k, s = draw(st.sampled_from([(2, 2), (3, 2), (3, 1), (2, 1)]))
            pool = draw(st.sampled_from([nn.MaxPool2d, nn.AvgPool2d]))
            layers.append(pool(k, s))
            size = (size - k) // s + 1
        elif kind == "residual":
            body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                 randomize_bn(nn.BatchNorm2d(channels)))
            shortcut = nn.Conv2d(channels, channels, 1) if draw(st.booleans()) else None
            layers.append(Residual(body, shortcut))
        elif kind == "concat":
            layers.append(Branches(nn.Conv2d(channels, 2, 1),
                                   nn.Sequential(nn.Tanh(), nn.Conv2d(channels, 1, 3, padding=1))))
            channels = 3
        elif kind == "pad":
            layers.append(draw(st.sampled_from([nn.ZeroPad2d(1), nn.ReflectionPad2d(1),
                                                nn.ReplicationPad2d(1)])))
            size += 2
    layers += [nn.Flatten(), nn.Linear(channels * size * size, draw(st.integers(1, 4)))]
    return nn.Sequential(*layers).eval()


@given(networks_with_shape())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_networks_upper_bound_dominates_secants_and_lower_bound(case):
    model, shape = case
    certificate = certify(model, shape)
    assert np.isfinite(certificate.upper)
    secant = max_secant(model, shape)
    lower = lipschitz_lower_bound(model, input_shape=shape, starts=4, steps=10).value
    assert certificate.upper >= secant * (1 - FLOAT64_EVALUATION_SLACK), certificate.table()
    assert certificate.upper >= lower * (1 - FLOAT64_EVALUATION_SLACK), certificate.table()


@given(st.lists(st.integers(1, 6), min_size=2, max_size=5), st.integers(0, 2**16),
       st.sampled_from(["plain", "bn", "scaled", "dropout"]))
@settings(max_examples=30, deadline=None)
def test_linear_networks_equal_the_norm_of_the_composed_map(widths, seed, extra):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if extra == "bn":
            bn = nn.BatchNorm1d(widths[i + 1])
            bn.running_var.uniform_(0.1, 4.0)
            bn.weight.data.uniform_(-3, 3)
            layers.append(bn)
        elif extra == "dropout":
            layers.append(nn.Dropout(0.5))
    model = nn.Sequential(*layers).eval()
    if extra == "scaled":
        model = Scaled(model).eval()
    certificate = certify(model, (widths[0],))
    jacobian = torch.autograd.functional.jacobian(model.double(), torch.zeros(1, widths[0], dtype=torch.float64))
    exact = np.linalg.svd(jacobian.reshape(widths[-1], widths[0]).numpy(), compute_uv=False)[0]
    np.testing.assert_allclose(certificate.upper, exact, rtol=1e-6)
    assert certificate.upper >= exact * (1 - 1e-12)
    merged = [row for row in certificate.layers if row.cumulative is not None]
    assert len(merged) == 1, certificate.table()


class Scaled(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return 0.5 * self.body(-x) / 4


@given(st.integers(1, 3), st.integers(1, 3), st.sampled_from([1, 2, 3]), st.sampled_from([1, 2]),
       st.integers(0, 2), st.sampled_from([1, 2]), st.booleans(), st.integers(0, 2**16))
@settings(max_examples=30, deadline=None)
def test_linear_conv_networks_bound_the_exact_norm(cin, cout, k, stride, pad, dil, bn, seed):
    size = 6
    torch.manual_seed(seed)
    layers = [nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil)]
    if bn:
        norm = nn.BatchNorm2d(cout)
        norm.running_var.uniform_(0.1, 4.0)
        norm.weight.data.uniform_(-3, 3)
        layers.append(norm)
    model = nn.Sequential(*layers).eval()
    certificate = certify(model, (cin, size, size))
    jacobian = torch.autograd.functional.jacobian(model.double(), torch.zeros(1, cin, size, size, dtype=torch.float64))
    matrix = jacobian.reshape(-1, cin * size * size).numpy()
    exact = np.linalg.svd(matrix, compute_uv=False)[0]
    assert certificate.upper >= exact, certificate.table()


def test_batchnorm_is_folded_into_the_convolution():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU()).eval()
    certificate = certify(model, (2, 6, 6))
    assert certificate.layers[0].layer_type == "Conv2d+BatchNorm2d"
    assert certificate.layers[0].merged == ("0",)


def test_residual_and_concat_rows_show_their_composition():
    model = nn.Sequential(Residual(nn.Linear(3, 3)), Branches(nn.Linear(3, 2), nn.Linear(3, 2))).eval()
    certificate = certify(model, (3,))
    rows = {row.layer_type: row for row in certificate.layers}
    assert rows["add"].composition.count("+") == 1
    assert rows["cat"].composition.startswith("√(")
    assert "sum of branch bounds" in certificate.table()


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x)[0]


class ControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.gate(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def test_attention_is_refused_naming_the_layer():
    with pytest.raises(NotCertifiableError, match=r"'attn' \(MultiheadAttention\).*not globally Lipschitz.*rules="):
        certify(Attention().eval(), (5, 4))


def test_layer_norm_needs_the_epsilon_opt_in():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).eval()
    with pytest.raises(NotCertifiableError, match=r"'1' \(LayerNorm\).*'epsilon'"):
        certify(model, (4,))
    certificate = certify(model, (4,), rules={"LayerNorm": "epsilon"})
    assert certificate.layers[-1].bound >= 1 / np.sqrt(1e-5)


def test_rms_norm_without_eps_uses_the_machine_epsilon_of_its_dtype():
    """torch's RMSNorm(eps=None) divides by sqrt(mean(x²) + finfo(dtype).eps): near 0 its
    slope is 1/sqrt(eps), which the epsilon bound must cover."""
    model = nn.Sequential(nn.RMSNorm(4)).eval()
    bound = certify(model, (4,), rules={"RMSNorm": "epsilon"}).upper
    x = torch.full((1, 4), 1e-6)
    slope = torch.linalg.matrix_norm(torch.autograd.functional.jacobian(model, x)[0, :, 0, :], 2)
    assert 2000 < float(slope) <= bound


def test_data_dependent_control_flow_names_the_module_and_rules_lift_it():
    with pytest.raises(NotCertifiableError, match=r"'gate' \(Gate\).*control flow.*rules="):
        certify(ControlFlow().eval(), (4,))
    certificate = certify(ControlFlow().eval(), (4,), rules={"gate": 1.0})
    assert certificate.layers[0].method == "user rule"


def test_unknown_operation_is_refused():
    class Square(nn.Module):
        def forward(self, x):
            return x * x

    with pytest.raises(NotCertifiableError, match="not globally Lipschitz"):
        certify(nn.Sequential(nn.Linear(2, 2), Square()).eval(), (2,))
    with pytest.raises(NotCertifiableError, match=r"\(exp\).*no known Lipschitz rule"):
        certify(Exp().eval(), (2,))


class Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x)


def test_training_mode_is_refused():
    with pytest.raises(ValueError, match=r"training mode.*model.eval\(\)"):
        certify(nn.Sequential(nn.Linear(2, 2)), (2,))


def test_sequential_falls_back_to_module_order():
    model = nn.Sequential(nn.Linear(4, 4), Gate(), nn.Linear(4, 2)).eval()
    certificate = certify(model, (4,), rules={"Gate": 1.0})
    assert [row.name for row in certificate.layers] == ["0", "1", "2"]


def test_lower_bound_is_tight_on_a_linear_model():
    torch.manual_seed(0)
    model = nn.Linear(6, 4).eval()
    exact = float(torch.linalg.matrix_norm(model.weight.detach().double(), ord=2))
    result = lipschitz_lower_bound(model, input_shape=(6,), steps=30)
    assert result.value <= exact * (1 + 1e-9)
    assert result.value >= exact * 0.999
    assert result.x.shape == (6,) and result.y.shape == (6,)


def test_lower_bound_is_the_float64_secant_of_its_witness_pair():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(4 * 25, 3)).eval()
    result = lipschitz_lower_bound(model, torch.rand(40, 2, 5, 5), starts=8, steps=10)
    with torch.no_grad():
        fx, fy = (model.double()(torch.from_numpy(p[None])) for p in (result.x, result.y))
    secant = float((fx - fy).norm() / torch.from_numpy(result.x - result.y).norm())
    np.testing.assert_allclose(result.value, secant, rtol=1e-12)


def test_lower_bound_screens_every_input_and_starts_from_the_steepest():
    """With more inputs than starts, the steepest input is found wherever it lies."""
    model = nn.Sequential(nn.Linear(1, 1), nn.Tanh()).eval()  # slope w·tanh'(wx + b): largest at wx + b = 0
    with torch.no_grad():
        model[0].weight.fill_(3.0)
        model[0].bias.fill_(0.0)
    inputs = torch.cat([torch.linspace(2.0, 4.0, 99), torch.zeros(1)])[:, None]  # the steep point last
    result = lipschitz_lower_bound(model, inputs, starts=4, steps=0)
    assert result.value >= 3.0 * (1 - 1e-3), result.value


def test_lower_bound_climbs_from_the_data_to_the_steepest_point_between_them():
    """The ascent, not the screening: the slope of 3·tanh'(3x) is largest at x = 0, which
    no input is near; from inputs where it is below 1e-4 the search climbs to 3."""
    model = nn.Sequential(nn.Linear(1, 1), nn.Tanh()).eval()
    with torch.no_grad():
        model[0].weight.fill_(3.0)
        model[0].bias.fill_(0.0)
    inputs = torch.cat([torch.linspace(2.0, 4.0, 8), -torch.linspace(2.0, 4.0, 8)])[:, None]
    result = lipschitz_lower_bound(model, inputs, starts=4, steps=60)
    assert 3.0 * (1 - 1e-3) <= result.value <= 3.0, result.value


def test_lower_bound_from_data_is_at_least_the_data_s_best_jacobian_norm():
    """Item 4 of the CNN-scale issue, in small: the search from the data is never below the
    exact ‖J(x)‖₂ (full Jacobian + SVD) of its best data point, and never above the certificate."""
    from torch.func import jacrev, vmap

    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 4, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 10)).eval()
    data = torch.rand(200, 3, 8, 8)
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        jacobians = vmap(jacrev(lambda p: model64(p[None])[0]))(data.double()).reshape(200, 10, -1)
    best = float(torch.linalg.matrix_norm(jacobians, ord=2).max())
    result = lipschitz_lower_bound(model, data, starts=16, steps=20)
    assert best * (1 - 1e-6) <= result.value <= certify(model, (3, 8, 8)).upper


def test_certificate_reports(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    certificate = certify(model, (3,), lower=True)
    assert 0 < certificate.lower <= certificate.upper
    data = certificate.to_json(tmp_path / "c.json")
    assert '"upper"' in data and (tmp_path / "c.json").read_text().strip() == data
    certificate.plot(tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert "lower bound" in certificate.table()


class Lambda(nn.Module):
    """forward(x) = function(self, x), with an optional constant buffer ``c``."""

    def __init__(self, function, constant=None, **modules):
        super().__init__()
        self.function = function
        if constant is not None:
            self.register_buffer("c", constant)
        for name, module in modules.items():
            self.add_module(name, module)

    def forward(self, x):
        return self.function(self, x)


def jacobian_norm(model, shape, seed=0):
    """‖J(x)‖₂ of the model at one Gaussian input, in float64."""
    model = model.double()
    x = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda z: model(z).reshape(-1), x)
    return float(torch.linalg.matrix_norm(jacobian.reshape(-1, x.numel()), 2))


@pytest.mark.parametrize("function, constant, shape, truth", [
    (lambda m, x: x + x.mean(-1, keepdim=True), None, (5,), 2.0),
    (lambda m, x: x + x.sum(-1, keepdim=True), None, (5,), 6.0),
    (lambda m, x: x * m.c, torch.ones(4, 5), (1, 5), 2.0),
    (lambda m, x: x + m.c, torch.zeros(4, 5), (1, 5), 2.0),
    (lambda m, x: x[:, [0, 0, 0, 1]], None, (3,), 3**0.5),
    (lambda m, x: x.sum(dim=[]), None, (2, 3), 6**0.5),
], ids=["add-mean", "add-sum", "mul-constant", "add-constant", "repeated-index", "sum-empty-dims"])
def test_copies_of_an_input_count_in_the_bound(function, constant, shape, truth):
    model = Lambda(function, constant).eval()
    np.testing.assert_allclose(jacobian_norm(model, shape), truth, rtol=1e-12)
    assert certify(model.float(), shape).upper >= truth


def test_a_permuting_index_keeps_the_bound_at_one():
    assert certify(Lambda(lambda m, x: x[:, [2, 0, 1]]).eval(), (3,)).upper == 1.0


class Pair(nn.Module):
    def forward(self, a, b):
        return a + b


def dropout_left_in_training():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)).eval()
    model[1].train()
    return model


@pytest.mark.parametrize("model, shape, match", [
    (Lambda(lambda m, x: torch.add(torch.ones(3), x, alpha=5)).eval(), (3,), "alpha"),
    (Lambda(lambda m, x: torch.div(x, 0.01, rounding_mode="floor")).eval(), (3,), "discontinuous"),
    (Lambda(lambda m, x: x.to(torch.int32)).eval(), (3,), "non-floating"),
    (nn.CELU(alpha=-1.0).eval(), (3,), "alpha > 0"),
    (Lambda(lambda m, x: nn.functional.celu(x, alpha=-1.0)).eval(), (3,), "alpha > 0"),
    (Lambda(lambda m, x: nn.functional.dropout(x, 0.5)).eval(), (3,), "dropout"),
    (dropout_left_in_training(), (3,), "dropout"),
    (Lambda(lambda m, x: m.bilinear(x, x), bilinear=nn.Bilinear(3, 3, 2)).eval(), (3,), "several input-dependent"),
], ids=["add-alpha", "rounding-division", "integer-cast", "celu", "functional-celu",
        "functional-dropout", "dropout-in-training", "two-inputs"])
def test_maps_without_a_lipschitz_constant_are_refused(model, shape, match):
    with pytest.raises(NotCertifiableError, match=match):
        certify(model, shape)


def test_local_response_norm_has_no_epsilon_bound():
    model = nn.LocalResponseNorm(2, k=1e-8)
    x = torch.full((1, 4, 3), 1e-6, dtype=torch.float64)
    slope = torch.autograd.functional.jacobian(model, x).reshape(12, 12)
    assert float(torch.linalg.matrix_norm(slope, 2)) > 1e5  # far above max|γ|/√ε ≈ 316
    with pytest.raises(NotCertifiableError, match="LocalResponseNorm"):
        certify(model.eval(), (4, 3), rules={"LocalResponseNorm": "epsilon"})


def test_a_rule_bounds_a_layer_of_several_inputs_jointly():
    model = Lambda(lambda m, x: m.pair(x, 100 * x), pair=Pair()).eval()
    certificate = certify(model, (3,), rules={"pair": 2**0.5})  # a + b is √2-Lipschitz in (a, b)
    assert certificate.upper >= jacobian_norm(model, (3,)) * (1 - FLOAT64_EVALUATION_SLACK)


def test_functional_batch_norm_reads_its_arguments_by_name():
    bn = nn.BatchNorm1d(3).eval()
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([0.01, 1.0, 4.0]))
        bn.running_mean.copy_(torch.tensor([5.0, -3.0, 2.0]))
        bn.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
    model = Lambda(lambda m, x: nn.functional.batch_norm(
        x, m.bn.running_mean, m.bn.running_var, m.bn.weight, m.bn.bias, False, 0.1, m.bn.eps), bn=bn)
    upper = certify(model.eval(), (3,)).upper
    assert upper == certify(nn.Sequential(bn).eval(), (3,)).upper
    np.testing.assert_allclose(upper, jacobian_norm(model, (3,)), rtol=1e-6)
