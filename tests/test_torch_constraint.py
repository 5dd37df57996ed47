"""lipnorm.backends.torch.SpectralConstraint: the cap after every step (checked by SciPy's SVD),
weights under it untouched, certify(), the state, hooks, bad input, compile, AMP, bf16, fp16."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import scipy.linalg

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import lipnorm  # noqa: E402
from lipnorm.backends.torch import SpectralConstraint  # noqa: E402
from tests.helpers import singular_values, true_sigma  # noqa: E402

RTOL = 1e-3


class Experts(nn.Module):
    """A mixture-of-experts-shaped bare parameter: a stack of (d, f) matrices."""

    def __init__(self, count=3, d=12, f=10):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(count, d, f) * 0.5)

    def forward(self, x):
        return torch.einsum("bd,edf->bf", x, self.weight)


class Net(nn.Module):
    """Every kind of target: convolutions (one transposed), Linear layers, a stack, plus an
    embedding, a norm and biases, which are left out."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 3, 2, stride=2)
        self.norm = nn.LayerNorm(12)
        self.fc = nn.Linear(3 * 8 * 8, 12)
        self.experts = Experts()
        self.head = nn.Linear(10, 5)
        self.embedding = nn.Embedding(7, 12)

    def forward(self, x):
        h = torch.relu(self.up(torch.relu(self.conv(x))))
        h = self.norm(self.fc(h.flatten(1)))
        return self.head(torch.tanh(self.experts(h)))


def _batch(generator, dtype=torch.float32):
    return torch.randn(8, 2, 4, 4, generator=generator).to(dtype), torch.randn(8, 5, generator=generator).to(dtype)


def _matrices(net):
    """Every constrained matrix of Net as torch reads it (conv kernels reshaped; the transposed
    one with its axis 1 as rows)."""
    yield "conv", net.conv.weight.detach().reshape(4, -1)
    yield "up", net.up.weight.detach().movedim(1, 0).reshape(3, -1)
    yield "fc", net.fc.weight.detach()
    for index, matrix in enumerate(net.experts.weight.detach()):
        yield f"experts[{index}]", matrix
    yield "head", net.head.weight.detach()


def _train(net, constraint, steps, dtype=torch.float32, lr=0.05, check=None):
    generator = torch.Generator().manual_seed(1)
    # AdamW's default eps (1e-8) is 0 in float16, where a zero gradient then makes 0/0 = NaN.
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, eps=1e-4 if dtype == torch.float16 else 1e-8)
    constraint.attach(optimizer)
    for _ in range(steps):
        x, y = _batch(generator, dtype)
        optimizer.zero_grad()
        (net(x) - y).square().mean().backward()
        optimizer.step()
        if check is not None:
            check(net)
    return optimizer


@pytest.mark.parametrize("projection", ["scale", "hammer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_cap_holds_after_every_step(projection, dtype):
    torch.manual_seed(0)
    net = Net().to(dtype)
    constraint = SpectralConstraint(net, max_sigma=1.0, rtol=RTOL, projection=projection)
    assert constraint.names == ["conv.weight", "up.weight", "fc.weight", "experts.weight", "head.weight"]
    worst = []

    def check(model):
        sigmas = {name: true_sigma(matrix) for name, matrix in _matrices(model)}
        worst.append(max(sigmas.values()))
        assert worst[-1] <= 1.0 + RTOL, sigmas

    _train(net, constraint, steps=12, dtype=dtype, check=check)
    # The learning rate pushes the weights to the cap: the constraint had work to do.
    assert min(worst) >= 0.98


def test_scale_is_w_times_r_over_sigma():
    torch.manual_seed(0)
    layer = nn.Linear(20, 30)
    with torch.no_grad():
        layer.weight.mul_(3.0)
    before = layer.weight.detach().double().clone()
    sigma = true_sigma(before)
    SpectralConstraint(layer, max_sigma=0.5).step()
    factor = layer.weight.detach().double() / before
    # One factor for the whole matrix, within rtol/4 (the certified bound it divides by) of R/sigma.
    np.testing.assert_allclose(factor, factor[0, 0], rtol=1e-6)
    assert 0.5 / sigma / (1 + RTOL / 4) <= factor[0, 0] <= 0.5 / sigma * (1 + 1e-6)


def test_hammer_sets_only_the_top_singular_value():
    generator = np.random.default_rng(0)
    left, _ = np.linalg.qr(generator.standard_normal((20, 3)))
    right, _ = np.linalg.qr(generator.standard_normal((15, 3)))
    matrix = (left * [3.0, 0.5, 0.2]) @ right.T
    layer = nn.Linear(15, 20)
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(matrix))
    SpectralConstraint(layer, max_sigma=1.0, projection="hammer").step()
    values = singular_values(layer.weight.detach())
    assert 1.0 - 1e-5 <= values[0] <= 1.0 + RTOL
    np.testing.assert_allclose(values[1:3], [0.5, 0.2], rtol=1e-5)


def test_hammer_falls_back_to_scale_when_two_values_are_above():
    generator = np.random.default_rng(1)
    left, _ = np.linalg.qr(generator.standard_normal((10, 2)))
    right, _ = np.linalg.qr(generator.standard_normal((10, 2)))
    layer = nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor((left * [3.0, 2.0]) @ right.T))
    SpectralConstraint(layer, max_sigma=1.0, projection="hammer").step()
    assert true_sigma(layer.weight) <= 1.0 + RTOL


def _bits(tensor):
    return tensor.detach().clone().view(torch.int32 if tensor.element_size() == 4 else torch.int64)


@pytest.mark.parametrize("projection", ["scale", "hammer"])
def test_under_the_cap_is_left_bit_for_bit(projection):
    torch.manual_seed(0)
    wide = nn.Linear(64, 64, bias=False)  # sigma < 1 but ||W||_F > 1: needs the certificate
    small = nn.Linear(4, 4, bias=False)  # ||W||_F < 1: the Frobenius bound suffices
    big = nn.Linear(64, 64, bias=False)  # same shape as `wide`, above the cap
    with torch.no_grad():
        wide.weight.mul_(0.9 / true_sigma(wide.weight))
        small.weight.mul_(0.3 / float(torch.linalg.vector_norm(small.weight)))
        big.weight.mul_(2.0 / true_sigma(big.weight))
    model = nn.ModuleDict({"wide": wide, "small": small, "big": big})
    before = {name: _bits(p) for name, p in model.named_parameters()}
    SpectralConstraint(model, projection=projection).step()
    assert torch.equal(_bits(wide.weight), before["wide.weight"])
    assert torch.equal(_bits(small.weight), before["small.weight"])
    assert not torch.equal(_bits(big.weight), before["big.weight"])
    assert true_sigma(big.weight) <= 1.0 + RTOL


def test_certify_is_under_the_cap_and_names_what_is_not():
    torch.manual_seed(0)
    net = Net()
    constraint = SpectralConstraint(net, max_sigma=2.0)
    _train(net, constraint, steps=3)
    bounds = constraint.certify()
    assert list(bounds) == constraint.names
    assert bounds["experts.weight"].shape == (3,)
    for name, matrix in _matrices(net):
        key = name.split("[")[0] + ".weight"
        upper = bounds[key][int(name[-2])] if "[" in name else bounds[key]
        assert true_sigma(matrix) <= upper <= 2.0 * (1 + RTOL)
    with torch.no_grad():
        net.head.weight.mul_(10.0)
    with pytest.warns(UserWarning, match=r"above the cap 2\.002: head\.weight"):
        assert constraint.certify()["head.weight"] > 2.002


@pytest.mark.parametrize("projection", ["scale", "hammer"])
def test_state_dict_resumes_exactly(projection, tmp_path):
    def fresh():
        torch.manual_seed(0)
        net = Net()
        return net, SpectralConstraint(net, projection=projection)

    net, constraint = fresh()
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.05)
    constraint.attach(optimizer)

    def steps(count, net, optimizer):
        for _ in range(count):
            x, y = _batch(generator)
            optimizer.zero_grad()
            (net(x) - y).square().mean().backward()
            optimizer.step()

    steps(3, net, optimizer)
    saved = io.BytesIO()
    torch.save({"net": net.state_dict(), "optimizer": optimizer.state_dict(),
                "constraint": constraint.state_dict()}, saved)
    generator_state = generator.get_state()
    assert set(constraint.state_dict()["vectors"]) == set(constraint.names)
    steps(3, net, optimizer)

    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)
    resumed, resumed_constraint = fresh()
    resumed.load_state_dict(checkpoint["net"])
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=0.05)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed_constraint.load_state_dict(checkpoint["constraint"])
    resumed_constraint.attach(resumed_optimizer)
    generator.set_state(generator_state)
    steps(3, resumed, resumed_optimizer)
    for (name, expected), actual in zip(net.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)


def test_load_state_dict_refuses_other_settings_and_shapes():
    torch.manual_seed(0)
    net = Net()
    constraint = SpectralConstraint(net)
    constraint.step()
    state = constraint.state_dict()
    with pytest.raises(ValueError, match="max_sigma=1.0, this constraint has max_sigma=2.0"):
        SpectralConstraint(net, max_sigma=2.0).load_state_dict(state)
    with pytest.raises(ValueError, match="projection='scale', this constraint has projection='hammer'"):
        SpectralConstraint(net, projection="hammer").load_state_dict(state)
    state["vectors"]["fc.weight"]["u"] = torch.zeros(3)
    with pytest.raises(ValueError, match="u of 'fc.weight' has shape"):
        constraint.load_state_dict(state)
    with pytest.raises(ValueError, match="does not constrain"):
        SpectralConstraint(net, exclude=["head.weight"]).load_state_dict(constraint.state_dict())


def test_what_a_module_constrains():
    torch.manual_seed(0)
    net = Net()
    assert "embedding.weight" not in SpectralConstraint(net).names
    names = SpectralConstraint(net, include=["embedding.weight"], exclude=["conv.weight"]).names
    assert "embedding.weight" in names and "conv.weight" not in names
    attention = nn.MultiheadAttention(8, 2)
    assert SpectralConstraint(attention).names == ["in_proj_weight", "out_proj.weight"]
    tied = nn.Sequential(nn.Linear(6, 6), nn.ReLU())
    tied.append(tied[0])
    assert SpectralConstraint(tied).names == ["0.weight"]
    compiled = torch.compile(nn.Linear(3, 3), backend="eager")
    assert SpectralConstraint(compiled).names == ["_orig_mod.weight"]
    explicit = SpectralConstraint([("w", net.fc.weight), net.experts.weight])
    assert explicit.names == ["w", "param1"]
    assert "stack of 3 matrices 12x10" in repr(explicit)


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf, True, "1"])
def test_bad_cap(value):
    with pytest.raises(ValueError, match="max_sigma must be a positive finite number"):
        SpectralConstraint(nn.Linear(2, 2), max_sigma=value)


def test_bad_options():
    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"rtol must be a number in \(0, 1\)"):
        SpectralConstraint(layer, rtol=0.0)
    with pytest.raises(ValueError, match="projection must be 'scale' or 'hammer'"):
        SpectralConstraint(layer, projection="clip")
    with pytest.raises(ValueError, match="mode must be 'matrix' or 'operator'"):
        SpectralConstraint(layer, mode="kernel")
    with pytest.raises(ValueError, match="'hammer' is a rank-one update of a matrix"):
        SpectralConstraint(nn.Conv2d(1, 1, 3), projection="hammer", mode="operator", input_shape=(1, 5, 5))
    with pytest.raises(ValueError, match="needs the input shape of convolution '0'"):
        SpectralConstraint(nn.Sequential(nn.Conv2d(1, 1, 3)), mode="operator")
    with pytest.raises(ValueError, match="input_shape is only used by mode='operator'"):
        SpectralConstraint(nn.Conv2d(1, 1, 3), input_shape=(1, 5, 5))
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        SpectralConstraint(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), mode="operator",
                           input_shape=(1, 5, 5))


def test_parameters_of_fewer_than_two_axes_named_explicitly():
    layer = nn.Linear(3, 4)
    with pytest.raises(ValueError, match=r"parameter 'bias' has shape \(4,\): a spectral constraint needs a matrix"):
        SpectralConstraint(layer, include=["bias"])
    with pytest.raises(ValueError, match=r"parameter 'param1' has shape \(4,\)"):
        SpectralConstraint(layer.parameters())
    with pytest.raises(ValueError, match="has no parameter 'weights'"):
        SpectralConstraint(layer, exclude=["weights"])
    with pytest.raises(ValueError, match="nothing to constrain"):
        SpectralConstraint(nn.LayerNorm(3))
    with pytest.raises(TypeError, match="a torch.nn.Module or an iterable of parameters"):
        SpectralConstraint(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="real floating-point"):
        SpectralConstraint([nn.Parameter(torch.zeros(2, 2, dtype=torch.complex64))])


@pytest.mark.parametrize("projection", ["scale", "hammer"])
def test_nan_weight_is_named_not_kept(projection):
    net = Net()
    constraint = SpectralConstraint(net, projection=projection)
    with torch.no_grad():
        net.experts.weight[1, 2, 3] = math.nan
        net.head.weight[0, 0] = math.inf
    before = _bits(net.fc.weight)
    with pytest.raises(ValueError, match=r"experts\.weight\[1\] holds NaN or Inf after the optimizer step"):
        constraint.step()
    assert torch.equal(_bits(net.fc.weight), before)


def test_attach_runs_after_each_step_and_detaches():
    layer = nn.Linear(8, 8)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
    handle = SpectralConstraint(layer).attach(optimizer)
    with torch.no_grad():
        layer.weight.mul_(5.0 / true_sigma(layer.weight))
    layer(torch.ones(1, 8)).sum().backward()
    optimizer.step()
    assert true_sigma(layer.weight) <= 1.0 + RTOL
    handle.remove()
    with torch.no_grad():
        layer.weight.mul_(3.0)
    optimizer.step()
    assert true_sigma(layer.weight) > 2.0


def _operator_sigma(conv, input_shape):
    """sigma of the convolution as a dense matrix on inputs of ``input_shape`` (SciPy's SVD)."""
    size = math.prod(input_shape)
    basis = torch.eye(size, dtype=torch.float64).reshape(size, *input_shape)
    weight = conv.weight.detach().double()
    with torch.no_grad():
        if isinstance(conv, nn.ConvTranspose2d):
            columns = nn.functional.conv_transpose2d(basis, weight, stride=conv.stride, padding=conv.padding)
        else:
            columns = nn.functional.conv2d(basis, weight, stride=conv.stride, padding=conv.padding)
    return float(scipy.linalg.svdvals(columns.reshape(size, -1).numpy())[0])


def test_operator_mode_caps_the_convolution_itself():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                        nn.ReLU(), nn.ConvTranspose2d(4, 2, 2, stride=2))
    shapes = {"0": (2, 6, 6), "2": (4, 6, 6), "4": (4, 3, 3)}
    constraint = SpectralConstraint(net, mode="operator", input_shape=shapes)
    assert constraint.names == ["0.weight", "2.weight", "4.weight"]
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1)
    constraint.attach(optimizer)
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        optimizer.zero_grad()
        net(torch.randn(4, 2, 6, 6, generator=generator)).square().mean().mul(-1).backward()
        optimizer.step()
        sigmas = [_operator_sigma(net[index], shapes[str(index)]) for index in (0, 2, 4)]
        assert max(sigmas) <= 1.0 + RTOL, sigmas
    assert max(sigmas) >= 0.99
    assert set(constraint.certify()) == set(constraint.names)
    assert set(constraint.state_dict()["vectors"]) == set(constraint.names)


def test_compiled_model_sees_the_constrained_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    compiled = torch.compile(net, backend="aot_eager")
    constraint = SpectralConstraint(compiled)
    optimizer = torch.optim.AdamW(compiled.parameters(), lr=0.2)
    constraint.attach(optimizer)
    x = torch.randn(5, 6)
    for _ in range(3):
        optimizer.zero_grad()
        compiled(x).square().mean().mul(-1).backward()
        optimizer.step()
        assert max(true_sigma(net[0].weight), true_sigma(net[2].weight)) <= 1.0 + RTOL
        torch.testing.assert_close(compiled(x), net(x), rtol=0, atol=0)


def test_autocast_with_float32_master_weights():
    torch.manual_seed(0)
    net = Net()
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.05)
    SpectralConstraint(net).attach(optimizer)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = _batch(generator)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (net(x).float() - y).square().mean()
        loss.backward()
        optimizer.step()
        assert all(p.dtype == torch.float32 for p in net.parameters())
        assert max(true_sigma(matrix) for _, matrix in _matrices(net)) <= 1.0 + RTOL


def test_stacked_estimate_state_is_one_vector_per_matrix():
    torch.manual_seed(0)
    net = Net()
    constraint = SpectralConstraint(net, projection="hammer")
    with torch.no_grad():
        net.experts.weight.mul_(10.0)
    before = net.experts.weight.detach().clone()
    constraint.step()
    vectors = constraint.state_dict()["vectors"]["experts.weight"]
    assert vectors["u"].shape == (3, 12) and vectors["v"].shape == (3, 10)
    # The vectors are the top singular vectors of each matrix the step started from.
    for matrix, v in zip(before, vectors["v"]):
        top = np.linalg.svd(matrix.double().numpy())[2][0]
        assert abs(float(np.dot(top, v.double().numpy()))) > 0.99


def test_sigma_bounds_agrees_with_certify_on_a_stack():
    torch.manual_seed(0)
    experts = Experts()
    constraint = SpectralConstraint(experts)
    constraint.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bounds = constraint.certify()["weight"]
    lower, upper = lipnorm.sigma_bounds(experts.weight.detach(), batched=True)
    np.testing.assert_array_equal(bounds, upper)
    assert np.all(lower <= 1.0 + RTOL)
