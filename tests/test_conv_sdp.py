"""The convolutional SDP (per-channel multipliers on the torus): sound, exact where it should be, re-checked."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

import lipnorm  # noqa: E402
from lipnorm.certify.frequency_sdp import FrequencySdp, NotHeld  # noqa: E402
from lipnorm.certify.graph import prepare_graph  # noqa: E402
from lipnorm.certify.methods import conv_sdp  # noqa: E402
from lipnorm.certify.methods.product import bound_nodes  # noqa: E402
from lipnorm.certify.methods.sdp import _Problem  # noqa: E402
from lipnorm.certify.network import dense_network  # noqa: E402
from lipnorm.certify.torch_frontend import build_graph  # noqa: E402
from lipnorm.certify.torus_builder import torus_network  # noqa: E402


def _graph(model, shape):
    builder, shape = build_graph(model, shape)
    graph = builder.graph
    graph.record_shape(graph.input_name, (1, *shape))
    return prepare_graph(graph)


def _sdp(model, shape) -> FrequencySdp:
    graph = _graph(model, shape)
    return FrequencySdp(torus_network(graph, bound_nodes(graph)))


def _cnn(seed=0, activation=nn.ReLU, size=6, channels=(2, 3, 4), kernel=3, stride=2, dilation=1, groups=1,
         padding=1, batchnorm=False, head=(5,), outputs=3):
    torch.manual_seed(seed)
    c0, c1, c2 = channels
    layers = [nn.Conv2d(c0, c1, kernel, padding=padding, dilation=dilation)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(c1))
    layers += [activation(), nn.Conv2d(c1, c2, kernel, stride=stride, padding=padding, groups=groups), activation()]
    probe = nn.Sequential(*layers)(torch.zeros(1, c0, size, size))
    layers.append(nn.Flatten())
    width = probe.numel()
    for hidden in head:
        layers += [nn.Linear(width, hidden), activation()]
        width = hidden
    layers.append(nn.Linear(width, outputs))
    model = nn.Sequential(*layers).double().eval()
    _randomize_batchnorm(model)
    return model, (c0, size, size)


def _randomize_batchnorm(model) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)


class _Block(nn.Module):
    """A basic residual block: identity or 1×1 projection shortcut, BN, ReLU."""

    def __init__(self, cin, cout, stride, activation=nn.ReLU):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.act1, self.act2 = activation(), activation()
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        return self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))) + self.shortcut(x))


def _resnet(seed=0, activation=nn.ReLU, size=6, widths=(3, 4)):
    """Stem, a block per width (the second with stride 2 and a projection), global pool, FC."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(2, widths[0], 3, padding=1), nn.BatchNorm2d(widths[0]), activation()]
    cin = widths[0]
    for i, width in enumerate(widths):
        layers.append(_Block(cin, width, 1 if i == 0 else 2, activation))
        cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 3)]
    model = nn.Sequential(*layers).double().eval()
    _randomize_batchnorm(model)
    return model, (2, size, size)


class _PreActivation(nn.Module):
    """x + conv(tanh(x)) with x a convolution's output: the sum spills into the padding ring,
    so the torus view masks it before the next convolution reads it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.c0, self.c1, self.c2 = (nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1),
                                     nn.Conv2d(3, 3, 3, padding=1))
        self.fc = nn.Linear(3 * 36, 2)

    def forward(self, x):
        x = self.c0(x)
        x = self.c2(x + self.c1(torch.tanh(x)))
        return self.fc(torch.relu(x).flatten(1))


def _jacobian_lower(model, shape, points=64, seed=0) -> float:
    """max ‖J(x)‖₂ over random points (a lower bound of the Lipschitz constant)."""
    generator = torch.Generator().manual_seed(seed)
    best = 0.0
    for _ in range(points):
        x = torch.randn((1, *shape), generator=generator, dtype=torch.float64)
        jacobian = torch.autograd.functional.jacobian(lambda v: model(v.reshape(1, *shape))[0], x.reshape(-1))
        best = max(best, float(torch.linalg.matrix_norm(jacobian, ord=2)))
    return best


def _bound(model, shape, budget=20.0, **kwargs):
    sdp = _sdp(model, shape)
    return conv_sdp.conv_sdp_bound(sdp, time_budget=budget, **kwargs), sdp


# -- the torus SDP as one dense matrix, in space (an independent reference) --------------------


def _conv_matrix(conv) -> np.ndarray:
    """The strided circular convolution as a matrix, tap by tap and position by position."""
    source, target = conv.source.grid, conv.target.grid
    cout, cin_group = conv.kernel.shape[:2]
    per_group = cout // conv.groups
    matrix = np.zeros((cout * math.prod(target), conv.source.channels * math.prod(source)))
    for out in itertools.product(*(range(n) for n in target)):
        row = np.ravel_multi_index(out, target)
        for tap in itertools.product(*(range(k) for k in conv.kernel.shape[2:])):
            read = tuple((o * s + t * d + origin) % n for o, s, t, d, origin, n in
                         zip(out, conv.stride, tap, conv.dilation, conv.origin, source))
            column = np.ravel_multi_index(read, source)
            for c in range(cout):
                for i in range(cin_group):
                    channel = (c // per_group) * cin_group + i
                    matrix[c * math.prod(target) + row, channel * math.prod(source) + column] += conv.kernel[
                        (c, i) + tap]
    return matrix


def _dense_matrix(sdp: FrequencySdp, multipliers, rho: float):
    """M(ρ, λ) over the spatial entries of every variable (input first), and its row offsets."""
    network = sdp.network
    sizes = [v.space.size for v in sdp.variables]
    offsets = np.cumsum([0] + sizes)
    matrix = np.zeros((offsets[-1], offsets[-1]))
    for i, v in enumerate(sdp.variables):
        span = slice(offsets[i], offsets[i + 1])
        matrix[span, span] = np.diag(np.repeat(sdp.diagonal(i, multipliers, rho), math.prod(v.space.grid)))

    def couple(reader: int, source_index: int, paths) -> None:
        source = 0 if source_index == 0 else sdp.unit_variables[source_index - 1]
        block = 0.0
        for path in paths:
            product = np.eye(network.source_space(source_index).size)
            for conv in path.convs:
                product = _conv_matrix(conv) @ product
            block = block + path.scale * product
        coefficient = np.repeat(sdp.coefficient(reader, multipliers), math.prod(sdp.variables[reader].space.grid))
        rows, columns = slice(offsets[reader], offsets[reader + 1]), slice(offsets[source], offsets[source + 1])
        matrix[rows, columns] += coefficient[:, None] * block
        matrix[columns, rows] += (coefficient[:, None] * block).T

    for j, unit in enumerate(network.units):
        readers = [sdp.unit_variables[j]] if sum(sdp.slopes[j]) != 0 else []
        if j in sdp.aux_constants:
            readers.append(sdp.unit_variables[j] + 1)
        for reader in readers:
            for source_index, paths in unit.inputs.items():
                couple(reader, source_index, paths)
    for source_index, paths in network.output.items():
        couple(len(sdp.variables) - 1, source_index, paths)
    return matrix, offsets


def _dense_rho(sdp, multipliers) -> float:
    matrix, offsets = _dense_matrix(sdp, multipliers, 0.0)
    hidden, coupling = matrix[offsets[1]:, offsets[1]:], matrix[offsets[1]:, :offsets[1]]
    schur = coupling.T @ np.linalg.solve(hidden, coupling)
    return float(np.linalg.eigvalsh((schur + schur.T) / 2)[-1])


_REFERENCE_NETS = {
    "chain": lambda: _cnn(seed=7),
    "resnet": lambda: _resnet(seed=1),
    "resnet-gelu": lambda: _resnet(seed=2, activation=nn.GELU),
    "masks": lambda: (_PreActivation().double().eval(), (2, 6, 6)),
    "bn-silu-avgpool": lambda: (nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.SiLU(), nn.AvgPool2d(2), nn.Conv2d(3, 4, 3, padding=1),
        nn.GELU(), nn.Flatten(), nn.Linear(36, 5), nn.GELU(), nn.Linear(5, 2)).double().eval(), (2, 6, 6)),
    "no-dense-head": lambda: (nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
                                            nn.Conv2d(3, 2, 3, stride=2, padding=1)).double().eval(), (2, 6, 6)),
    "strided-first-leaky": lambda: (nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.LeakyReLU(0.1), nn.Conv2d(3, 2, 3, padding=1), nn.Tanh(),
        nn.Flatten(), nn.Linear(18, 2)).double().eval(), (2, 6, 6)),
    "circular-groups": lambda: (nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular"), nn.LeakyReLU(0.1),
        nn.Conv2d(4, 4, 3, padding=1, groups=2, padding_mode="circular"), nn.ReLU(), nn.Flatten(),
        nn.Linear(64, 2), nn.LeakyReLU(0.2), nn.Linear(2, 2)).double().eval(), (2, 4, 4)),
    "conv1d-dilation": lambda: (nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=2, dilation=2), nn.ReLU(), nn.Conv1d(3, 3, 4, stride=2, padding=1), nn.ELU(),
        nn.Flatten(), nn.Linear(12, 2)).double().eval(), (2, 8)),
    "two-convs": lambda: (nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(),
                                        nn.Flatten(), nn.Linear(32, 2)).double().eval(), (2, 4, 4)),
}


@pytest.fixture(scope="module", params=sorted(_REFERENCE_NETS))
def reference(request):
    torch.manual_seed(0)
    model, shape = _REFERENCE_NETS[request.param]()
    sdp = _sdp(model, shape)
    rng = np.random.default_rng(0)
    multipliers = [m * np.exp(rng.uniform(-0.3, 0.3, m.shape)) for m in conv_sdp.start_multipliers(sdp)]
    return request.param, sdp, multipliers, _dense_rho(sdp, multipliers)


def test_rho_is_the_spatial_torus_sdps(reference):
    """ρ(λ) from the tree of frequencies equals the dense torus SDP's, built in space."""
    _, sdp, multipliers, dense = reference
    assert conv_sdp._Rho(sdp).rho(multipliers)[0] == pytest.approx(dense, rel=1e-9)


def test_check_brackets_the_spatial_optimum(reference):
    """At these multipliers M(ρ) ⪰ 0 exactly for ρ ≥ ρ(λ): proven just above, refused just below."""
    _, sdp, multipliers, dense = reference
    assert conv_sdp.check_frequency_multipliers(sdp, multipliers, dense * (1 + 1e-6))
    assert not conv_sdp.check_frequency_multipliers(sdp, multipliers, dense * (1 - 1e-6))


def test_factorization_matches_the_spatial_matrix(reference):
    """The factorization of D M D − c I succeeds exactly when c is below its smallest eigenvalue,
    and its ‖|R|‖₂² bound is, in exact arithmetic, the sum over levels of one frequency's
    diagonal trace: every variable's channels once."""
    _, sdp, multipliers, dense = reference
    rho = dense * 1.01
    matrix, offsets = _dense_matrix(sdp, multipliers, rho)
    scales = sdp.scales(multipliers, rho)
    diagonal = np.concatenate([np.repeat(scales[i], math.prod(v.space.grid)) for i, v in enumerate(sdp.variables)])
    smallest = np.linalg.eigvalsh(diagonal[:, None] * matrix * diagonal[None, :])[0]
    assert smallest > 0
    assert sdp.factor(multipliers, rho, smallest * 0.99) is not None
    assert sdp.factor(multipliers, rho, smallest * 1.01) is None
    trace = sum(float(np.sum(sdp.diagonal(i, multipliers, rho) * scales[i] ** 2)) for i in range(len(sdp.variables)))
    assert sdp.factor(multipliers, rho).square == pytest.approx(trace, rel=1e-9)


def test_gradient_is_the_derivative_of_rho():
    """∂ log ρ / ∂ log λ from the top eigenvector matches finite differences of the spatial ρ."""
    model, shape = _resnet(seed=3, activation=nn.GELU)
    sdp = _sdp(model, shape)
    multipliers = conv_sdp.start_multipliers(sdp)
    values = conv_sdp._Rho(sdp)
    values._top = lambda factor, warm: _exact_top(factor)  # one eigenvector: ρ is differentiable
    rho, gradient = values.rho(multipliers)
    step = 1e-5

    def moved(unit, channel, sign):
        values = [m.copy() for m in multipliers]
        values[unit][channel] *= math.exp(sign * step)
        return math.log(_dense_rho(sdp, values))

    for unit in range(len(multipliers)):
        for channel in range(min(2, multipliers[unit].size)):
            difference = (moved(unit, channel, 1) - moved(unit, channel, -1)) / (2 * step)  # central
            assert gradient[unit][channel] == pytest.approx(difference, rel=1e-3, abs=1e-7)


def _exact_top(factor):
    size = factor.input_size
    matrix = factor.schur(np.eye(size, dtype=np.complex128))
    values, vectors = np.linalg.eigh((matrix + np.conj(matrix.T)) / 2)
    return values[::-1][:1], vectors[:, ::-1][:, :1]


@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh, nn.Sigmoid, lambda: nn.LeakyReLU(0.1), nn.GELU, nn.SiLU],
                         ids=["relu", "tanh", "sigmoid", "leaky", "gelu", "silu"])
def test_bound_is_above_the_jacobian_lower_bound_and_below_the_product(activation):
    _assert_between_lower_and_product(*_cnn(activation=activation, batchnorm=True))


def _assert_between_lower_and_product(model, shape) -> None:
    (bound, proof), _ = _bound(model, shape)
    lower = max(_jacobian_lower(model, shape),
                lipnorm.lipschitz_lower_bound(model, input_shape=shape, starts=16, steps=40).value)
    product = lipnorm.certify(model, shape, method="product").upper
    assert lower <= bound <= product * (1 + 1e-9), (lower, bound, product)
    assert proof.verify() == bound


@pytest.mark.parametrize("options", [dict(dilation=2, padding=2), dict(groups=2, channels=(2, 4, 4)),
                                     dict(stride=1), dict(kernel=4, padding=1), dict(head=()),
                                     dict(head=(6, 4))],
                         ids=["dilation", "groups", "stride1", "even-kernel", "no-hidden-head", "two-head-layers"])
def test_geometries_are_sound(options):
    model, shape = _cnn(seed=1, **options)
    (bound, proof), _ = _bound(model, shape)
    assert _jacobian_lower(model, shape) <= bound
    assert proof.verify() == bound


@pytest.mark.parametrize("net", ["resnet", "resnet-gelu", "masks", "bn-silu-avgpool", "two-convs"])
def test_residual_pooled_and_masked_nets_are_sound(net):
    torch.manual_seed(0)
    _assert_between_lower_and_product(*_REFERENCE_NETS[net]())


def _pointwise_model(seed=0):
    """1×1 convolutions without padding: the torus is the window, so the torus SDP is the model's."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(), nn.Conv2d(3, 4, 1, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16, 5), nn.ReLU(), nn.Linear(5, 2)).double().eval(), (2, 4, 4)


def test_matches_the_dense_sdp_where_the_torus_is_the_window():
    """ρ(λ) of the frequency SDP equals the dense SDP's at the same (per-channel) multipliers."""
    model, shape = _pointwise_model()
    graph = _graph(model, shape)
    sdp = FrequencySdp(torus_network(graph, bound_nodes(graph)))
    assert sdp.network.input_space.grid == (4, 4)
    rng = np.random.default_rng(0)
    multipliers = [m * np.exp(rng.uniform(-0.3, 0.3, m.shape)) for m in conv_sdp.start_multipliers(sdp)]
    network = dense_network(graph, bound_nodes(graph))
    per_neuron = [np.repeat(multipliers[0], 16), np.repeat(multipliers[1], 4), multipliers[2]]
    dense_rho = _Problem(network, None).rho(per_neuron)[0]
    rho = conv_sdp._Rho(sdp).rho(multipliers)[0]
    assert rho == pytest.approx(dense_rho, rel=1e-9)


def test_torus_bound_dominates_the_windowed_dense_sdp_at_the_same_multipliers():
    """The model's SDP at the window's neurons is a principal submatrix of the torus one."""
    model, shape = _cnn(seed=2)
    graph = _graph(model, shape)
    sdp = FrequencySdp(torus_network(graph, bound_nodes(graph)))
    multipliers = conv_sdp.start_multipliers(sdp)
    network = dense_network(graph, bound_nodes(graph))
    assert len(network.units) == len(sdp.network.units)
    per_neuron = [np.repeat(m, unit.size_out // m.size) for m, unit in zip(multipliers, network.units)]
    dense_rho = _Problem(network, None).rho(per_neuron)[0]
    assert conv_sdp._Rho(sdp).rho(multipliers)[0] >= dense_rho * (1 - 1e-9)


def test_agrees_with_the_dense_sdp_on_a_small_cnn():
    model, shape = _cnn(seed=3)
    certificates = {m: lipnorm.certify(model, shape, method=m, time_budget=30) for m in ("conv_sdp", "sdp")}
    conv = certificates["conv_sdp"].proof.proofs["conv_sdp"].verify()
    dense = certificates["sdp"].proof.proofs["sdp"].verify()
    # a weaker relaxation: never below the dense SDP's optimum (its reported value is within its
    # optimisation gap of it), and close to it
    assert dense * 0.98 <= conv <= dense * 1.5


def test_start_reaches_the_product_on_a_chain():
    """The product's recursion as multipliers: ρ(start) is at most the product of the torus
    norms, so the optimisation starts below the product bound."""
    model, shape = _cnn(seed=5, head=())
    sdp = _sdp(model, shape)
    rho = conv_sdp._Rho(sdp).rho(conv_sdp.start_multipliers(sdp))[0]
    product = lipnorm.certify(model, shape, method="product").upper
    assert math.sqrt(rho) <= product * 1.05


def test_check_rejects_what_it_cannot_prove():
    model, shape = _cnn(seed=4)
    (bound, proof), sdp = _bound(model, shape)
    check = conv_sdp.check_frequency_multipliers
    assert check(sdp, proof.multipliers, proof.rho)
    assert not check(sdp, proof.multipliers, proof.rho * 0.9)  # below the optimum for these multipliers
    perturbed = [m.copy() for m in proof.multipliers]
    perturbed[0][0] = -perturbed[0][0]
    assert not check(sdp, perturbed, proof.rho)
    perturbed[0][0] = np.nan
    assert not check(sdp, perturbed, proof.rho)
    assert not check(sdp, proof.multipliers[:-1], proof.rho)
    assert not check(sdp, proof.multipliers, math.inf)
    tiny = [m * 1e-6 for m in proof.multipliers]  # the hidden part is no longer positive definite
    assert not check(sdp, tiny, proof.rho)
    proof.rho *= 0.9
    with pytest.raises(ValueError, match="do not certify"):
        proof.verify()


def test_ladder_reaches_it_and_rows_are_capped():
    model, shape = _cnn(seed=6)
    certificate = lipnorm.certify(model, shape, method="conv_sdp", time_budget=20)
    runs = {run.method: run for run in certificate.ladder}
    assert runs["conv_sdp"].upper is not None and runs["conv_sdp"].upper <= runs["product"].upper
    assert certificate.proof.verify() == certificate.upper
    rows = np.eye(3)[:2]
    with_rows = lipnorm.certify(model, shape, method="conv_sdp", time_budget=20, rows=rows)
    proof = with_rows.proof.proofs["conv_sdp"]
    assert np.all(np.asarray(proof.verify()) >= 0)


@pytest.mark.parametrize("model, shape, needle", [
    (nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), (4,), "no torus view"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 2)),
     (1, 4, 4), "known by its Lipschitz bound only"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.Flatten(),
                   nn.Linear(32, 2)), (1, 4, 4), "reflect"),
], ids=["mlp", "maxpool", "reflect"])
def test_refusals_name_the_layer(model, shape, needle):
    model = model.double().eval()
    certificate = lipnorm.certify(model, shape, method="auto", time_budget=5)
    note = {run.method: run.note for run in certificate.ladder}["conv_sdp"]
    assert note.startswith("not applicable") and needle in note


def test_maxpool_refusal_names_the_unit():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(8, 2)).double().eval()
    with pytest.raises(NotHeld, match="'2' is known by its Lipschitz bound only"):
        _sdp(model, (1, 4, 4))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), kernel=st.integers(1, 4), stride=st.integers(1, 2), size=st.integers(4, 7),
       activation=st.sampled_from(["relu", "tanh", "leaky", "gelu"]), residual=st.booleans())
def test_property_never_below_the_jacobian(seed, kernel, stride, size, activation, residual):
    make = {"relu": nn.ReLU, "tanh": nn.Tanh, "leaky": lambda: nn.LeakyReLU(0.2), "gelu": nn.GELU}[activation]
    if residual:
        model, shape = _resnet(seed=seed, activation=make, size=size + size % 2)
    else:
        model, shape = _cnn(seed=seed, activation=make, size=size, kernel=kernel, stride=stride, padding=kernel // 2)
    (bound, proof), _ = _bound(model, shape, budget=10.0, max_steps=40)
    assert _jacobian_lower(model, shape, points=8, seed=seed) <= bound
    assert math.isfinite(bound) and proof.verify() == bound
