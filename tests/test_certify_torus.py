"""The torus view of convolutional networks and the chain method on it.

Three kinds of checks. The construction: restricted to its windows, the torus network is
the model (its Jacobian at a point, with each unit's derivative read from the model, is
the model's Jacobian). The fiber algebra: every chain norm computed fiber by fiber is the
norm of the same chain formed as a real matrix on the torus. The bound: exact on linear
circular networks, never below a Jacobian norm of the model.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import lipnorm  # noqa: E402
from lipnorm.certify.fibers import FiberAlgebra  # noqa: E402
from lipnorm.certify.graph import prepare_graph  # noqa: E402
from lipnorm.certify.loop import chain_bound, chain_norms, chain_plan, loop_bound  # noqa: E402
from lipnorm.certify.methods.product import bound_nodes  # noqa: E402
from lipnorm.certify.network import Block, DenseAlgebra, DenseNetwork, Unit  # noqa: E402
from lipnorm.certify.torus import NotOnTorus, TorusConv, TorusNetwork  # noqa: E402
from lipnorm.certify.torus_builder import torus_network  # noqa: E402
from tests.helpers import assert_relative_close  # noqa: E402
from tests.jacobian_lower import largest_jacobian_norm  # noqa: E402

#: Examples of the soundness property: at least 200 in CI (issue 19's target).
SOUNDNESS_EXAMPLES = 200 if os.environ.get("HYPOTHESIS_PROFILE") == "ci" else 25


def _graph(model, shape):
    from lipnorm.certify.torch_frontend import build_graph

    builder, _ = build_graph(model, shape)
    builder.graph.record_shape(builder.graph.input_name, (1, *shape))
    graph = prepare_graph(builder.graph)
    return graph, bound_nodes(graph)


def _torus(model, shape) -> TorusNetwork:
    return torus_network(*_graph(model, shape))


def _torus_bound(network: TorusNetwork, span=None) -> float:
    caps = [math.inf] * len(network.units)
    return chain_bound(network, FiberAlgebra, caps, plan=chain_plan(network, span), view="torus")[0]


# ---------------------------------------------------------------------------------------------
# The torus network as real matrices (brute force)
# ---------------------------------------------------------------------------------------------


def _conv_matrix(conv: TorusConv) -> np.ndarray:
    """The convolution on flattened torus tensors (channels first), summed tap by tap."""
    source, target = conv.source, conv.target
    cout, cin_g = conv.kernel.shape[:2]
    out_positions = np.indices(target.grid).reshape(len(target.grid), -1).T
    matrix = np.zeros((target.size, source.size))
    for tap in np.ndindex(*conv.kernel.shape[2:]):
        read = np.mod(out_positions * conv.stride + np.asarray(tap) * conv.dilation + conv.origin,
                      np.asarray(source.grid))
        columns = np.ravel_multi_index(tuple(read.T), source.grid)
        for o in range(cout):
            group = o // (cout // conv.groups)
            for c in range(cin_g):
                rows = o * math.prod(target.grid) + np.arange(out_positions.shape[0])
                cols = (group * cin_g + c) * math.prod(source.grid) + columns
                np.add.at(matrix, (rows, cols), conv.kernel[(o, c) + tap])
    return matrix


def _block_matrix(paths, size: int) -> np.ndarray:
    total = None
    for path in paths:
        value = np.eye(size) * path.scale
        for conv in path.convs:
            value = _conv_matrix(conv) @ value
        total = value if total is None else total + value
    return total


def _window_embedding(space) -> np.ndarray:
    """The map from the model's tensor (channels first, window) into the torus tensor."""
    positions = np.indices((space.channels, *space.window)).reshape(1 + len(space.window), -1).T
    rows = np.ravel_multi_index(tuple(positions.T), (space.channels, *space.grid))
    embedding = np.zeros((space.size, positions.shape[0]))
    embedding[rows, np.arange(positions.shape[0])] = 1.0
    return embedding


def _as_dense(network: TorusNetwork) -> DenseNetwork:
    """The same torus network with real matrices for blocks (for the dense algebra)."""
    units = []
    for unit in network.units:
        blocks = {s: Block(_block_matrix(p, network.source_space(s).size), network.source_space(s).size)
                  for s, p in unit.inputs.items()}
        units.append(Unit(unit.name, unit.name, unit.input_space.size, unit.output_space.size, unit.slope,
                          unit.bound, blocks))
    output = {s: Block(_block_matrix(p, network.source_space(s).size), network.source_space(s).size)
              for s, p in network.output.items()}
    return DenseNetwork(network.input_space.size, units, output, network.output_space.size)


def _jacobian_through_torus(network: TorusNetwork, diagonals: dict[str, np.ndarray]) -> np.ndarray:
    """R J E with every unit replaced by the diagonal given for it (torus-flattened)."""
    values = {0: _window_embedding(network.input_space)}
    for k, unit in enumerate(network.units):
        z = sum(_block_matrix(p, network.source_space(s).size) @ values[s] for s, p in unit.inputs.items())
        values[k + 1] = diagonals[unit.name][:, None] * z
    f = sum(_block_matrix(p, network.source_space(s).size) @ values[s] for s, p in network.output.items())
    return _window_embedding(network.output_space).T @ f


def _relu_diagonals(model, network: TorusNetwork, x) -> dict[str, np.ndarray]:
    """Each unit's derivative at ``x``, read from the model (ReLUs) or the window (masks)."""
    inputs = {}
    hooks = [module.register_forward_hook(lambda m, a, out, name=name: inputs.__setitem__(name, a[0].detach()))
             for name, module in model.named_modules() if isinstance(module, nn.ReLU)]
    with torch.no_grad():
        model(x[None])
    for hook in hooks:
        hook.remove()
    diagonals = {}
    for unit in network.units:
        space = unit.input_space
        window = np.zeros((space.channels, *space.grid))
        index = (slice(None),) + tuple(slice(0, n) for n in space.window)
        if unit.kind == "mask":
            window[index] = 1.0
        else:
            window[index] = (inputs[unit.name][0].numpy() > 0).reshape((space.channels, *space.window))
        diagonals[unit.name] = window.ravel()
    return diagonals


def _model_jacobian(model, x) -> np.ndarray:
    jacobian = torch.autograd.functional.jacobian(lambda t: model(t[None])[0], x)
    return jacobian.reshape(-1, x.numel()).numpy()


class _Residual(nn.Module):
    def __init__(self, body, shortcut=None):
        super().__init__()
        self.body, self.shortcut = body, shortcut or nn.Identity()

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


class _Undo(nn.Module):
    """x ↦ S⁻¹(S x) − x, S a shift by one: 0 on a torus, −x₀ e₀ (norm 1) with zero padding."""

    def __init__(self):
        super().__init__()
        self.shift = nn.Conv1d(1, 1, 3, padding=1, bias=False)  # y[i] = x[i + 1]
        self.back = nn.Sequential(nn.ZeroPad1d((1, 0)), nn.Conv1d(1, 1, 2, bias=False))  # y[i] = x[i − 1]
        with torch.no_grad():
            self.shift.weight.copy_(torch.tensor([[[0.0, 0.0, 1.0]]]))
            self.back[1].weight.copy_(torch.tensor([[[1.0, 0.0]]]))

    def forward(self, x):
        return self.back(self.shift(x)) - x


def _bn(channels):
    layer = nn.BatchNorm2d(channels)
    with torch.no_grad():
        layer.running_var.uniform_(0.5, 2.0)
        layer.weight.uniform_(0.5, 1.5)
    return layer


def _construction_models():
    torch.manual_seed(0)
    return {
        "zero padding, stride, dilation, groups": (nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 4, stride=2, padding=1, groups=2),
            nn.ReLU(), nn.Conv2d(4, 3, 3, padding=2, dilation=2), nn.Flatten(), nn.Linear(3 * 3 * 3, 5)), (2, 6, 6)),
        "conv into conv (a mask), BN, average pooling": (nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), _bn(3), nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)),
            (2, 6, 6)),
        "residual with a projection, zero padding layer": (nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(),
            _Residual(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), _bn(4), nn.ReLU(),
                                    nn.Conv2d(4, 4, 3, padding=1)), nn.Conv2d(3, 4, 1, stride=2)),
            nn.ReLU(), nn.ZeroPad2d((1, 0, 0, 1)), nn.Conv2d(4, 2, 2), nn.ReLU(), nn.Flatten(),
            nn.Linear(2 * 3 * 3, 2)), (1, 5, 5)),
        "circular padding": (nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), nn.ReLU(),
            nn.Conv2d(3, 3, 3, stride=2, padding=1, padding_mode="circular"), nn.ReLU(),
            nn.Flatten(), nn.Linear(3 * 3 * 3, 4)), (2, 6, 6)),
        "shift and its inverse": (_Undo(), (1, 6)),
    }


@pytest.mark.parametrize("name", list(_construction_models()))
def test_the_torus_network_restricted_to_its_windows_is_the_model(name):
    model, shape = _construction_models()[name]
    model = model.double().eval()
    network = _torus(model, shape)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(shape, dtype=torch.float64, generator=generator)
        expected = _model_jacobian(model, x)
        through_torus = _jacobian_through_torus(network, _relu_diagonals(model, network, x))
        np.testing.assert_allclose(through_torus, expected, rtol=1e-12, atol=1e-12)


def test_a_zero_padded_boundary_between_linear_layers_keeps_its_mask():
    model, shape = _construction_models()["shift and its inverse"]
    model = model.double().eval()
    network = _torus(model, shape)
    assert [unit.kind for unit in network.units] == ["mask"]
    assert network.units[0].name == "back.0.mask"
    x = torch.randn(shape, dtype=torch.float64)
    assert np.linalg.norm(_model_jacobian(model, x), 2) == pytest.approx(1.0, rel=1e-12)
    # the bound holds for the model (norm 1); without the mask the torus map would be 0
    assert _torus_bound(network) >= 1.0
    assert lipnorm.certify(model, shape, method="auto").upper >= 1.0


@pytest.mark.parametrize("name", list(_construction_models()))
def test_every_chain_norm_is_that_of_the_chain_as_a_matrix_on_the_torus(name):
    model, shape = _construction_models()[name]
    network = _torus(model.double().eval(), shape)
    plan = chain_plan(network)
    fibers = chain_norms(network, FiberAlgebra(network), plan)
    dense = _as_dense(network)
    matrices = chain_norms(dense, DenseAlgebra(dense), plan)
    keys = [(kind, t, s) for kind in ("direct", "chain") for t in range(len(network.units) + 1)
            for s in range(t + 1)]
    for key in keys:
        expected = matrices.norm(key)
        if expected == 0.0:
            assert fibers.norm(key) <= 1e-12, key
            continue
        # both are certified upper bounds of the same norm: each within 1e-9 of the other
        assert_relative_close(fibers.norm(key), expected, 1e-9, str(key))


def test_linear_circular_networks_get_their_exact_norm():
    torch.manual_seed(2)
    models = [
        (nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"),
                       nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="circular"),
                       nn.Conv2d(4, 2, 3, dilation=2, padding=2, padding_mode="circular", groups=2)), (2, 8, 8)),
        (nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular"), _bn(4), nn.AvgPool2d(2),
                       nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular", groups=4), nn.Flatten(),
                       nn.Linear(4 * 4 * 4, 5)), (2, 8, 8)),
        (nn.Sequential(nn.Conv1d(3, 3, 5, padding=2, padding_mode="circular"),
                       nn.Conv1d(3, 2, 3, stride=3, padding=1, padding_mode="circular"),
                       nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(2, 3)), (3, 12)),
    ]
    for model, shape in models:
        model = model.double().eval()
        exact = float(np.linalg.norm(_model_jacobian(model, torch.zeros(shape, dtype=torch.float64)), 2))
        bound = _torus_bound(_torus(model, shape))
        assert exact <= bound <= exact * (1 + 1e-9)


def test_a_circular_network_gets_the_same_bound_from_both_views():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular"), nn.GELU(),
                          nn.Conv2d(4, 4, 3, stride=2, padding=1, padding_mode="circular"), nn.Tanh(),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).double().eval()
    network = _torus(model, (2, 6, 6))
    assert all(unit.input_space.full for unit in network.units)  # nothing masked
    dense = _as_dense(network)
    caps = [math.inf] * len(network.units)
    expected = chain_bound(dense, DenseAlgebra, caps)[0]
    assert_relative_close(_torus_bound(network), expected, 1e-9, "torus vs dense")


@pytest.mark.parametrize("layer, match", [
    (nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), r"layer '0\.pad' .* reflect padding"),
    (nn.Conv2d(2, 2, 3, padding=1, padding_mode="replicate"), r"layer '0\.pad' .* replicate padding"),
    (nn.ConvTranspose2d(2, 2, 2, stride=2), r"layer '0' \(ConvTranspose2d\) is a transposed convolution"),
    (nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False), r"layer '0' \(AvgPool2d\) averages windows"),
])
def test_layers_the_torus_cannot_hold_are_refused_by_name(layer, match):
    model = nn.Sequential(layer, nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1)).double().eval()
    with pytest.raises(NotOnTorus, match=match):
        _torus(model, (2, 6, 6))


# ---------------------------------------------------------------------------------------------
# Soundness on random architectures
# ---------------------------------------------------------------------------------------------

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "leaky_relu": lambda: nn.LeakyReLU(0.2),
                "tanh": nn.Tanh}


@st.composite
def random_cnns(draw):
    """A small random CNN (float64, eval) and its input shape."""
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    padding_mode = draw(st.sampled_from(["zeros", "circular"]))
    channels, size = draw(st.integers(1, 3)), 8
    shape = (channels, size, size)
    layers = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["conv", "stride", "dilation", "groups", "bn", "pool", "residual"]))
        act = _ACTIVATIONS[draw(st.sampled_from(sorted(_ACTIVATIONS)))]()
        width = draw(st.integers(1, 4))
        if kind == "pool" and size % 2 == 0 and size > 2:
            layers.append(nn.AvgPool2d(2))
            size //= 2
            continue
        if kind == "stride" and size % 2 == 0 and size > 2:
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1, padding_mode=padding_mode), act]
            channels, size = width, size // 2
        elif kind == "dilation":
            layers += [nn.Conv2d(channels, width, 3, padding=2, dilation=2, padding_mode=padding_mode), act]
            channels = width
        elif kind == "groups":
            width = 2 * draw(st.integers(1, 2))
            stem = nn.Conv2d(channels, width, 1)
            layers += [stem, nn.Conv2d(width, width, 3, padding=1, groups=2, padding_mode=padding_mode), act]
            channels = width
        elif kind == "bn":
            layers += [nn.Conv2d(channels, width, 3, padding=1, padding_mode=padding_mode), _bn(width), act]
            channels = width
        elif kind == "residual":
            layers += [_Residual(nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=1, padding_mode=padding_mode), act,
                nn.Conv2d(channels, channels, 3, padding=1, padding_mode=padding_mode))), act]
        else:
            layers += [nn.Conv2d(channels, width, 3, padding=1, padding_mode=padding_mode), act]
            channels = width
    if draw(st.booleans()):
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, draw(st.integers(1, 3)))]
    else:
        layers += [nn.Flatten(), nn.Linear(channels * size * size, draw(st.integers(1, 3)))]
    model = nn.Sequential(*layers).double().eval()
    scale = draw(st.sampled_from([0.5, 1.0, 2.0]))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(scale)
    return model, shape


def _largest_jacobian_norm(model, shape, starts=3, steps=8, seed=0) -> float:
    """A short ascent on ‖J(x)‖₂ (:func:`tests.jacobian_lower.largest_jacobian_norm`): a lower bound."""
    return largest_jacobian_norm(model, shape, starts=starts, steps=steps, lr=0.1, seed=seed)


@settings(max_examples=SOUNDNESS_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_cnns(), st.sampled_from([None, 1, 2]))
def test_the_torus_chain_bound_is_never_below_a_jacobian_norm(case, span):
    model, shape = case
    network = _torus(model, shape)
    bound = _torus_bound(network, span)
    assert bound >= _largest_jacobian_norm(model, shape) * (1 - 1e-9)


# ---------------------------------------------------------------------------------------------
# Per-channel scalings (lipnorm.certify.scaling)
# ---------------------------------------------------------------------------------------------


def _scaled_bound(network, scalings, plan=None) -> float:
    import functools

    plan = plan or chain_plan(network)
    factory = functools.partial(FiberAlgebra, scalings=scalings)
    return chain_bound(network, factory, [math.inf] * len(network.units), plan=plan, view="torus")[0]


def test_scalings_undo_a_channel_rescaling_of_a_relu_network():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 2)).double().eval()
    factors = torch.tensor([4.0, 0.25, 3.0], dtype=torch.float64)
    rescaled = nn.Sequential(*[layer for layer in __import__("copy").deepcopy(model)]).double().eval()
    with torch.no_grad():  # ReLU(a z) = a ReLU(z) for a > 0: the same function
        rescaled[0].weight.mul_(factors[:, None, None, None])
        rescaled[0].bias.mul_(factors)
        rescaled[2].weight.div_(factors[None, :, None, None])
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    np.testing.assert_allclose(rescaled(x).detach().numpy(), model(x).detach().numpy(), rtol=1e-12)
    original, changed = _torus(model, (2, 6, 6)), _torus(rescaled, (2, 6, 6))
    plain = _torus_bound(original)
    assert _torus_bound(changed) > plain * 1.05  # the plain bound sees the rescaling
    undo = [1.0 / factors.numpy(), np.ones(3)]  # unit 0's input carries the factors
    assert_relative_close(_scaled_bound(changed, undo), plain, 1e-9, "scaled bound of the rescaled network")


def test_optimised_scalings_give_a_certified_bound_that_verifies():
    from lipnorm.certify.scaling import certified_norms, held_chains, optimise_scalings


    model, shape = _construction_models()["residual with a projection, zero padding layer"]
    model = model.double().eval()
    network = _torus(model, shape)
    plan = chain_plan(network)
    held = held_chains(network, plan)
    scalings, estimate, _ = optimise_scalings(network, plan, held, steps=15)
    assert all(np.all(s > 0) and np.all(np.isfinite(s)) for s in scalings)
    caps = [math.inf] * len(network.units)
    bound = loop_bound(network, plan, certified_norms(network, held, scalings), caps)
    assert_relative_close(_scaled_bound(network, scalings, plan), bound, 1e-9, "recomputed from scratch")
    assert bound >= _largest_jacobian_norm(model, shape) * (1 - 1e-9)
    assert estimate <= bound * (1 + 1e-6) or estimate > 0  # a proposal, certified afterwards


@settings(max_examples=max(SOUNDNESS_EXAMPLES // 4, 10), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_cnns())
def test_the_scaled_chain_bound_is_never_below_a_jacobian_norm(case):
    from lipnorm.certify.scaling import held_chains, optimise_scalings

    model, shape = case
    network = _torus(model, shape)
    plan = chain_plan(network)
    scalings, _, _ = optimise_scalings(network, plan, held_chains(network, plan), steps=8)
    assert _scaled_bound(network, scalings, plan) >= _largest_jacobian_norm(model, shape) * (1 - 1e-9)


# ---------------------------------------------------------------------------------------------
# Through the ladder
# ---------------------------------------------------------------------------------------------


def test_the_ladder_takes_the_smaller_view_and_says_which():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double().eval()
    certificate = lipnorm.certify(model, (1, 8, 8), method="chain", time_budget=60)
    chain = {run.method: run for run in certificate.ladder}["chain"]
    assert "torus view" in chain.note and "dense view" in chain.note and "(the bound)" in chain.note
    assert certificate.upper == chain.upper <= certificate.ladder[0].upper
    assert certificate.verify() == pytest.approx(certificate.upper, rel=1e-9)
    assert certificate.upper >= _largest_jacobian_norm(model, (1, 8, 8))


def test_padding_the_torus_cannot_hold_falls_back_to_the_dense_view_with_a_note():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                          nn.Flatten(), nn.Linear(3 * 6 * 6, 2)).double().eval()
    certificate = lipnorm.certify(model, (1, 6, 6), method="auto", time_budget=30)
    chain = {run.method: run for run in certificate.ladder}["chain"]
    assert chain.upper is not None and "dense view" in chain.note
    assert "no torus view: layer '0.pad' (Conv2d.padding_mode=reflect) uses reflect padding" in chain.note
    assert certificate.upper >= _largest_jacobian_norm(model, (1, 6, 6))


def test_the_torus_view_bounds_each_logit_difference():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 4)).double().eval()
    rows = np.array([[1.0, -1.0, 0, 0], [0, 1.0, 0, -1.0], [0.0, 0, 1.0, -1.0]])
    network = _torus(model, (1, 8, 8))
    bounds, _ = chain_bound(network, FiberAlgebra, [math.inf] * len(network.units), rows, view="torus")
    whole = _torus_bound(network)
    for row, bound in zip(rows, bounds):
        functional = nn.Sequential(model, nn.Linear(4, 1, bias=False)).double().eval()
        with torch.no_grad():
            functional[1].weight.copy_(torch.tensor(row)[None])
        assert bound >= _largest_jacobian_norm(functional, (1, 8, 8)) * (1 - 1e-9)
        assert bound <= whole * float(np.linalg.norm(row)) * (1 + 1e-9)


def test_a_linear_zero_padded_cnn_gets_its_exact_norm_through_the_ladder():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), _bn(3), nn.Conv2d(3, 4, 4, stride=2, padding=1),
                          nn.AvgPool2d(2), nn.Conv2d(4, 2, 3, padding=2, dilation=2, groups=2), nn.Flatten(),
                          nn.Linear(2 * 2 * 2, 3)).double().eval()
    exact = float(np.linalg.norm(_model_jacobian(model, torch.zeros((2, 8, 8), dtype=torch.float64)), 2))
    certificate = lipnorm.certify(model, (2, 8, 8), method="chain", time_budget=30)
    assert exact <= certificate.upper <= exact * (1 + 1e-7)
    chain = {run.method: run for run in certificate.ladder}["chain"]
    assert "dense view" in chain.note and "(the bound)" in chain.note and "torus view" in chain.note
