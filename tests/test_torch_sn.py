"""Tests of lipnorm.backends.torch.spectral_norm against torch's own spectral normalization."""

import copy
import io
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import torch.nn.utils.parametrizations as torch_parametrizations  # noqa: E402

from lipnorm.backends._torch_layer_maps import ConvMap, LinearMap  # noqa: E402
from lipnorm.backends._torch_scaled_map import OutputScaledMap, WeightScaledMap  # noqa: E402
from lipnorm.backends._torch_sigma import MatrixView, OperatorView  # noqa: E402
from lipnorm.backends.torch import remove_spectral_norm, sigma_of, sigmas, spectral_norm, warm_up  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- helpers

LAYERS = {
    "linear": (lambda: nn.Linear(12, 9), (5, 12)),
    "linear_3d_input": (lambda: nn.Linear(12, 9), (2, 3, 12)),
    "linear_no_bias": (lambda: nn.Linear(12, 9, bias=False), (5, 12)),
    "conv1d": (lambda: nn.Conv1d(3, 5, 3, padding=1), (2, 3, 11)),
    "conv2d_strided_grouped_dilated": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
                                       (2, 4, 9, 9)),
    "conv2d_reflect": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (2, 3, 7, 7)),
    "conv2d_same_even_kernel": (lambda: nn.Conv2d(3, 4, 4, padding="same"), (2, 3, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 3, padding=1), (1, 2, 5, 5, 5)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1), (2, 4, 5, 5)),
    "conv_transpose1d_grouped": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2), (2, 4, 7)),
    "bilinear": (lambda: nn.Bilinear(4, 5, 3), None),
    "embedding": (lambda: nn.Embedding(10, 6), None),
}


def _inputs(kind, shape, dtype):
    if kind == "embedding":
        return (torch.randint(0, 10, (4, 3)),)
    if kind == "bilinear":
        return (torch.randn(6, 4, dtype=dtype, requires_grad=True), torch.randn(6, 5, dtype=dtype, requires_grad=True))
    return (torch.randn(shape, dtype=dtype, requires_grad=True),)


def _torch_and_lipnorm(make, dtype, **kwargs):
    """A layer under torch's parametrization SN and a copy under lipnorm's, with equal u, v."""
    reference = make().to(dtype)
    ours = copy.deepcopy(reference)
    torch_parametrizations.spectral_norm(reference, **kwargs)
    spectral_norm(ours, **kwargs)
    with torch.no_grad():
        ours.weight_u.copy_(reference.parametrizations.weight[0]._u)
        ours.weight_v.copy_(reference.parametrizations.weight[0]._v)
    return reference, ours


def _grads(outputs, tensors, grad_out):
    return torch.autograd.grad(outputs, tensors, grad_out)


def _dense_operator(conv, input_shape):
    """The matrix of the bias-free layer on inputs of ``input_shape`` (one column per basis vector)."""
    n = int(np.prod(input_shape))
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *input_shape)
    with torch.no_grad():
        columns = conv(basis) - conv(torch.zeros(1, *input_shape, dtype=torch.float64))
    return columns.reshape(n, -1).T


def _operator_norm(conv, input_shape):
    return float(torch.linalg.matrix_norm(_dense_operator(conv, input_shape), 2))


# --------------------------------------------------------------------------- parity with torch


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_matches_torch_spectral_norm_in_training_and_eval(kind, dtype):
    make, shape = LAYERS[kind]
    reference, ours = _torch_and_lipnorm(make, dtype)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    ref_weight = reference.parametrizations.weight.original
    for training in (True, True, False):
        reference.train(training)
        ours.train(training)
        inputs = _inputs(kind, shape, dtype)
        y_ref, y_ours = reference(*inputs), ours(*inputs)
        np.testing.assert_allclose(y_ours.detach(), y_ref.detach(), rtol=rtol, atol=rtol * y_ref.abs().max().item())
        np.testing.assert_allclose(ours.weight_u, reference.parametrizations.weight[0]._u, rtol=rtol, atol=rtol)
        np.testing.assert_allclose(ours.weight_v, reference.parametrizations.weight[0]._v, rtol=rtol, atol=rtol)
        with torch.no_grad():
            sigma_ref = torch.vdot(reference.parametrizations.weight[0]._u, torch.mv(
                reference.parametrizations.weight[0]._reshape_weight_to_matrix(ref_weight),
                reference.parametrizations.weight[0]._v))
        np.testing.assert_allclose(sigma_of(ours), sigma_ref, rtol=rtol)
        grad_out = torch.randn_like(y_ref)
        differentiable = [t for t in inputs if t.is_floating_point()]
        ref_params = [ref_weight] + [p for n, p in reference.named_parameters() if "parametrizations" not in n]
        our_params = [ours.weight_orig] + [p for n, p in ours.named_parameters() if n != "weight_orig"]
        for g_ref, g_ours in zip(_grads(y_ref, ref_params + differentiable, grad_out),
                                 _grads(y_ours, our_params + differentiable, grad_out)):
            np.testing.assert_allclose(g_ours, g_ref, rtol=rtol, atol=rtol * g_ref.abs().max().item())
        with torch.no_grad():  # an SGD-like step so that the next step sees a new weight
            for p_ref, p_ours in zip(ref_params, our_params):
                step = 0.1 * torch.randn_like(p_ref)
                p_ref.add_(step)
                p_ours.add_(step)


@pytest.mark.parametrize("kind", ["linear", "conv_transpose2d", "embedding"])
def test_weight_attribute_reads_normalized_weight_like_torch(kind):
    make, _ = LAYERS[kind]
    reference, ours = _torch_and_lipnorm(make, torch.float64)
    reference.eval()
    np.testing.assert_allclose(ours.weight.detach(), reference.weight.detach(), rtol=1e-12)
    assert ours.weight.requires_grad


def test_linear_dim_1_matches_torch():
    reference, ours = _torch_and_lipnorm(lambda: nn.Linear(6, 4), torch.float64, dim=1)
    x = torch.randn(3, 6, dtype=torch.float64)
    y_ref, y_ours = reference(x), ours(x)
    np.testing.assert_allclose(y_ours.detach(), y_ref.detach(), rtol=1e-12)
    g = torch.randn_like(y_ref)
    np.testing.assert_allclose(_grads(y_ours, [ours.weight_orig], g)[0],
                               _grads(y_ref, [reference.parametrizations.weight.original], g)[0], rtol=1e-10)


# --------------------------------------------------------------------------- the autograd Function


FUNCTIONS = {"output_scaled": OutputScaledMap, "weight_scaled": WeightScaledMap}


def _gradcheck_scaled_map(function, layer_map, view, x, weight, bias, u, v, check_x=True):
    def normalized(x_, weight_, bias_):
        sigma = torch.vdot(u.reshape(-1), view.matvec(view.operand(weight_), v).reshape(-1)).detach()
        return function.apply(x_, weight_, bias_, sigma, u, v, layer_map, view)

    x.requires_grad_(check_x)
    assert torch.autograd.gradcheck(normalized, (x, weight, bias), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(normalized, (x, weight, bias), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("function", list(FUNCTIONS))
def test_gradcheck_linear(function):
    weight = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    u, v = torch.randn(5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    for check_x in (True, False):  # folded GEMM, and the path where the input needs no gradient
        _gradcheck_scaled_map(FUNCTIONS[function], LinearMap(), MatrixView(0), torch.randn(3, 4, dtype=torch.float64),
                              weight, torch.randn(5, dtype=torch.float64, requires_grad=True), u / u.norm(),
                              v / v.norm(), check_x)


@pytest.mark.parametrize("function", list(FUNCTIONS))
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "conv_transpose"])
@pytest.mark.parametrize("mode", ["matrix", "operator"])
def test_gradcheck_conv(mode, transposed, function):
    layer_map = ConvMap((2, 1), (1, 0), (1, 2), transposed, (1, 0) if transposed else (0, 0), 2)
    shape = (4, 3, 3, 2) if transposed else (4, 2, 3, 2)  # (in, out/groups, ...) | (out, in/groups, ...)
    weight = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    if mode == "matrix":
        view = MatrixView(1 if transposed else 0)
        u = torch.randn(weight.shape[view.dim], dtype=torch.float64)
        v = torch.randn(weight.numel() // len(u), dtype=torch.float64)
    else:
        view = OperatorView(layer_map)
        v = torch.randn(1, 4, 5, 6, dtype=torch.float64)
        u = torch.randn_like(layer_map.apply(v, weight.detach()))
    bias = torch.randn(layer_map.apply(x, weight.detach()).shape[1], dtype=torch.float64, requires_grad=True)
    for check_x in (True, False):
        _gradcheck_scaled_map(FUNCTIONS[function], layer_map, view, x, weight, bias, u, v, check_x)


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Linear(12, 9), (2, 12)),
    (lambda: nn.Linear(4, 3), (8, 4)),
    (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 6, 6)),
    (lambda: nn.Conv2d(3, 4, 3), (1, 3, 3, 3)),
    (lambda: nn.ConvTranspose2d(3, 2, 3, stride=2), (2, 3, 4, 4)),
], ids=["linear_output_scaled", "linear_weight_scaled", "conv2d_weight_scaled", "conv2d_output_scaled",
        "conv_transpose2d"])
def test_gradient_penalty_double_backward_matches_torch(make, shape):
    """A gradient penalty (create_graph=True) differentiates the input gradient once more."""
    reference, ours = _torch_and_lipnorm(make, torch.float64)
    x = torch.randn(shape, dtype=torch.float64)
    penalty_grads = []
    for layer, weight in ((reference, reference.parametrizations.weight.original), (ours, ours.weight_orig)):
        x_layer = x.clone().requires_grad_(True)
        y = layer(x_layer)
        grad_x, = torch.autograd.grad(y.square().sum(), x_layer, create_graph=True)
        penalty_grads.append(torch.autograd.grad(grad_x.square().sum(), (weight, layer.bias, x_layer)))
    for g_ours, g_ref in zip(penalty_grads[1], penalty_grads[0]):
        np.testing.assert_allclose(g_ours, g_ref, rtol=1e-10, atol=1e-10 * g_ref.abs().max().item())


# --------------------------------------------------------------------------- the pain points


def test_u_v_are_buffers_in_state_dict_with_torch_legacy_keys():
    layer = spectral_norm(nn.Linear(5, 3))
    assert set(layer.state_dict()) == {"weight_orig", "bias", "weight_u", "weight_v"}
    assert layer.weight_u.shape == (3,) and layer.weight_v.shape == (5,)


def test_two_forwards_in_one_step_backprop_like_torch():
    """D(real) - D(fake): u, v change in place between the forwards; backward must still work."""
    reference, ours = _torch_and_lipnorm(lambda: nn.Conv2d(3, 4, 3), torch.float64)
    real, fake = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(2, 3, 6, 6, dtype=torch.float64)
    loss_ref = reference(real).mean() - reference(fake).mean()
    loss_ours = ours(real).mean() - ours(fake).mean()
    loss_ours.backward()
    loss_ref.backward()
    np.testing.assert_allclose(ours.weight_orig.grad, reference.parametrizations.weight.original.grad, rtol=1e-10)


def test_warm_up_at_registration_makes_eval_first_output_normalized():
    weight = torch.randn(256, 256)
    layer = nn.Linear(256, 256, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    spectral_norm(layer).eval()
    true_sigma = torch.linalg.matrix_norm(weight, 2)
    assert float(sigma_of(layer)) >= 0.9 * float(true_sigma)
    assert float(torch.linalg.matrix_norm(layer.weight.detach(), 2)) <= 1.0 / 0.9


def test_warm_up_converges_every_normalized_tensor_after_the_weights_moved():
    torch.manual_seed(0)
    model = nn.Sequential(spectral_norm(nn.Linear(40, 30)), nn.ReLU(),
                          spectral_norm(nn.Conv2d(2, 3, 3, padding=1), mode="operator", input_shape=(2, 6, 6)),
                          spectral_norm(nn.Conv2d(2, 3, 3), mode="operator")).eval()
    u_buffer = model[0].weight_u
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight_orig.copy_(torch.randn_like(layer.weight_orig))
    warm_up(model, 200)
    assert model[0].weight_u is u_buffer  # in place
    np.testing.assert_allclose(float(sigma_of(model[0])), float(torch.linalg.matrix_norm(model[0].weight_orig, 2)),
                               rtol=1e-4)
    dense = torch.func.jacrev(lambda x: nn.functional.conv2d(x, model[2].weight_orig.detach(), padding=1))(
        torch.zeros(2, 6, 6)).reshape(3 * 36, 2 * 36)
    # float32 Lanczos on the clustered top of a convolution's spectrum: 1e-3, not 1e-7
    np.testing.assert_allclose(float(sigma_of(model[2])), float(torch.linalg.matrix_norm(dense, 2)), rtol=1e-3)
    assert model[3].weight_u.numel() == 0  # operator mode before its first input: skipped
    with pytest.raises(ValueError, match="iterations"):
        warm_up(model, 0)


def test_operator_mode_steps_never_lower_sigma():
    """Golub-Kahan-Lanczos keeps its start when rounding makes the Ritz value come out lower."""
    torch.manual_seed(0)
    conv = spectral_norm(nn.Conv2d(1, 16, 3, padding=1), mode="operator", input_shape=(1, 8, 8))
    with torch.no_grad():
        conv.weight_orig.mul_(1.7).add_(0.3 * torch.randn_like(conv.weight_orig))
    previous = float(sigma_of(conv))
    for _ in range(20):
        warm_up(conv, iterations=25)
        current = float(sigma_of(conv))
        assert current >= previous * (1 - 1e-6), (previous, current)
        previous = current


def test_eval_does_not_update_u_v():
    layer = spectral_norm(nn.Conv2d(3, 4, 3)).eval()
    u, v = layer.weight_u.clone(), layer.weight_v.clone()
    layer(torch.randn(2, 3, 5, 5))
    torch.testing.assert_close(layer.weight_u, u, rtol=0, atol=0)
    torch.testing.assert_close(layer.weight_v, v, rtol=0, atol=0)
    layer.train()(torch.randn(2, 3, 5, 5))
    assert not torch.equal(layer.weight_u, u)


@pytest.mark.parametrize("make", [lambda: nn.Linear(4, 3), lambda: nn.Conv2d(2, 3, 3), lambda: nn.Embedding(5, 4)],
                         ids=["linear", "conv2d", "embedding"])
def test_zero_weight_gives_zero_output_and_finite_gradients(make):
    layer = make()
    with torch.no_grad():
        layer.weight.zero_()
    spectral_norm(layer)
    x = torch.randint(0, 5, (3,)) if isinstance(layer, nn.Embedding) else torch.randn(2, *(
        (4,) if isinstance(layer, nn.Linear) else (2, 5, 5)))
    y = layer(x)
    bias = getattr(layer, "bias", None)
    expected = torch.zeros_like(y) if bias is None else torch.broadcast_to(
        bias.view(-1, *([1] * (y.ndim - 2))), y.shape)
    torch.testing.assert_close(y, expected.detach(), rtol=0, atol=0)
    y.square().sum().backward()
    assert torch.isfinite(layer.weight_orig.grad).all()
    assert torch.isfinite(layer.weight_u).all() and torch.isfinite(layer.weight_v).all()
    with torch.no_grad():
        layer.weight_orig.add_(torch.randn_like(layer.weight_orig))
    assert torch.isfinite(layer(x)).all()
    assert float(sigma_of(layer)) > 0


def test_power_iteration_runs_in_float32_under_bfloat16_autocast():
    layer = spectral_norm(nn.Linear(16, 8))
    x = torch.randn(4, 16)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.weight_u.dtype == torch.float32
    torch.testing.assert_close(y.float(), expected, rtol=3e-2, atol=3e-2)
    y.float().sum().backward()
    assert layer.weight_orig.grad.dtype == torch.float32 and torch.isfinite(layer.weight_orig.grad).all()


def test_half_precision_weights_with_tiny_norms_give_no_nan():
    """fp16 norms of tiny vectors underflow (pytorch#61954); the iteration runs in float32."""
    layer = nn.Linear(64, 64)
    with torch.no_grad():
        layer.weight.mul_(1e-4)
    layer = spectral_norm(layer).half()
    y = layer(torch.randn(2, 64, dtype=torch.float16))
    assert torch.isfinite(y).all() and torch.isfinite(layer.weight_u).all()
    assert 0.5 < float(sigma_of(layer)) / float(torch.linalg.matrix_norm(layer.weight_orig.float(), 2)) <= 1.001


def test_deepcopy_and_pickle_whole_module():
    net = nn.Sequential(spectral_norm(nn.Conv2d(2, 3, 3)), nn.ReLU(), nn.Flatten(), spectral_norm(nn.Linear(27, 2)))
    x = torch.randn(2, 2, 5, 5)
    net.eval()
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net)), torch.load(buffer, weights_only=False)):
        torch.testing.assert_close(clone(x), net(x), rtol=0, atol=0)
        assert clone[0].weight_u.data_ptr() != net[0].weight_u.data_ptr()
        clone.train()(x)
        assert not torch.equal(clone[0].weight_u, net[0].weight_u)


def test_remove_spectral_norm_keeps_parameter_object_and_order():
    layer = nn.Linear(6, 4)
    order = [id(p) for p in layer.parameters()]
    spectral_norm(layer)
    assert [id(p) for p in layer.parameters()] == order
    param = layer.weight_orig
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    normalized = layer.weight.detach().clone()
    remove_spectral_norm(layer)
    assert type(layer) is nn.Linear and layer.weight is param
    assert [id(p) for p in layer.parameters()] == order
    assert set(layer.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(layer.weight.detach(), normalized)
    layer(torch.randn(2, 6)).sum().backward()
    optimizer.step()
    assert not torch.equal(layer.weight.detach(), normalized)


@pytest.mark.parametrize("source", ["parametrization", "legacy"])
def test_load_state_dict_from_torch_spectral_norm_checkpoints(source):
    make = lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3))  # noqa: E731
    trained = make()
    register = torch_parametrizations.spectral_norm if source == "parametrization" else nn.utils.spectral_norm
    register(trained[0])
    register(trained[3])
    x = torch.randn(2, 2, 5, 5)
    trained(x)
    trained.eval()
    ours = make()
    spectral_norm(ours[0])
    spectral_norm(ours[3])
    ours.load_state_dict(trained.state_dict())
    ours.eval()
    torch.testing.assert_close(ours(x), trained(x), rtol=1e-5, atol=1e-6)


def test_operator_mode_drops_matrix_vectors_from_torch_checkpoint_and_reinfers():
    trained = torch_parametrizations.spectral_norm(nn.Conv2d(2, 3, 3, padding=1))
    ours = spectral_norm(nn.Conv2d(2, 3, 3, padding=1), mode="operator")
    ours.load_state_dict(trained.state_dict())
    torch.testing.assert_close(ours.weight_orig, trained.parametrizations.weight.original)
    ours(torch.randn(1, 2, 6, 6))
    assert ours.weight_v.shape == (1, 2, 6, 6)
    reloaded = spectral_norm(nn.Conv2d(2, 3, 3, padding=1), mode="operator")
    reloaded.load_state_dict(ours.state_dict())
    torch.testing.assert_close(reloaded.weight_u, ours.weight_u)


def _torch_compile_matches_eager(make, x):
    eager = spectral_norm(make())
    compiled_layer = copy.deepcopy(eager)
    explanation = torch._dynamo.explain(copy.deepcopy(eager))(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(compiled_layer, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        y_eager, y_compiled = eager(x), compiled(x)
        torch.testing.assert_close(y_compiled, y_eager)
        y_eager.square().sum().backward()
        y_compiled.square().sum().backward()
        torch.testing.assert_close(compiled_layer.weight_orig.grad, eager.weight_orig.grad)
        torch.testing.assert_close(compiled_layer.weight_u, eager.weight_u)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_torch_compile_fullgraph(kind):
    torch._dynamo.reset()
    if kind == "linear":
        _torch_compile_matches_eager(lambda: nn.Linear(8, 5), torch.randn(3, 8))
    else:
        _torch_compile_matches_eager(lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.randn(2, 3, 8, 8))


def test_torch_compile_fullgraph_operator_mode_with_input_shape():
    torch._dynamo.reset()
    layer = spectral_norm(nn.Conv2d(3, 4, 3, padding=1), mode="operator", input_shape=(3, 6, 6))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    compiled(torch.randn(2, 3, 6, 6)).sum().backward()
    assert torch.isfinite(layer.weight_orig.grad).all()


def test_unbatched_conv_input():
    layer = spectral_norm(nn.Conv1d(2, 3, 3))
    x = torch.randn(2, 7)
    torch.testing.assert_close(layer.eval()(x), layer(x.unsqueeze(0)).squeeze(0))


def test_conv_transpose_output_size_argument():
    reference, ours = _torch_and_lipnorm(lambda: nn.ConvTranspose2d(2, 3, 3, stride=2), torch.float64)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    y_ref, y_ours = reference(x, output_size=(10, 10)), ours(x, output_size=(10, 10))
    assert y_ours.shape == (1, 3, 10, 10)
    np.testing.assert_allclose(y_ours.detach(), y_ref.detach(), rtol=1e-12)


def test_operator_mode_conv_transpose_output_size_recreates_u():
    """output_size changes a transposed convolution's output padding, hence its operator."""
    layer = spectral_norm(nn.ConvTranspose2d(2, 3, 3, stride=2).double(), mode="operator")
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    assert layer(x).shape == (1, 3, 9, 9)
    y = layer(x, output_size=(10, 10))
    assert y.shape == (1, 3, 10, 10) and layer.weight_u.shape == (1, 3, 10, 10)
    layer.eval()
    expected = nn.functional.conv_transpose2d(x, layer.weight_orig / sigma_of(layer), layer.bias, stride=2,
                                              output_padding=1)
    np.testing.assert_allclose(layer(x, output_size=(10, 10)).detach(), expected.detach(), rtol=1e-12)


def test_sigma_of_and_sigmas_report_each_layer():
    net = nn.Sequential(spectral_norm(nn.Linear(4, 8)), nn.ReLU(),
                        spectral_norm(nn.Linear(8, 2)), spectral_norm(nn.Conv1d(1, 1, 3), mode="operator"))
    found = sigmas(net)
    assert list(found) == ["0.weight", "2.weight"]  # the operator-mode layer has not seen an input
    for key, layer in (("0.weight", net[0]), ("2.weight", net[2])):
        np.testing.assert_allclose(found[key], float(torch.linalg.matrix_norm(layer.weight_orig, 2)), rtol=1e-3)


# --------------------------------------------------------------------------- bad input


def test_numpy_scalars_are_accepted_as_torch_accepts_them():
    """Hyperparameters read from NumPy arrays or configs (np.int64, np.float32) work as in torch."""
    torch.manual_seed(0)
    layer = spectral_norm(nn.Linear(5, 4), n_power_iterations=np.int64(3), eps=np.float32(1e-12))
    reference = torch_parametrizations.spectral_norm(nn.Linear(5, 4), n_power_iterations=np.int64(3),
                                                     eps=np.float32(1e-12))
    with torch.no_grad():
        reference.parametrizations.weight.original.copy_(layer.weight_orig)
    warm_up(layer, np.int64(50))
    assert isinstance(layer.weight_orig, nn.Parameter)
    x = torch.randn(2, 5)
    layer(x)
    reference(x)
    with pytest.raises(ValueError, match="iterations must be an integer >= 1"):
        warm_up(layer, np.float64(2.0))


def test_bad_input_errors():
    with pytest.raises(ValueError, match="no parameter named 'wieght'.*its parameters: weight, bias"):
        spectral_norm(nn.Linear(3, 2), name="wieght")
    with pytest.raises(ValueError, match="n_power_iterations must be an integer >= 1"):
        spectral_norm(nn.Linear(3, 2), n_power_iterations=0)
    with pytest.raises(ValueError, match="eps must be a positive float"):
        spectral_norm(nn.Linear(3, 2), eps=0.0)
    with pytest.raises(ValueError, match="already has spectral norm; call remove_spectral_norm"):
        spectral_norm(spectral_norm(nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="is parametrized by torch"):
        spectral_norm(torch_parametrizations.spectral_norm(nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="torch's legacy spectral norm"):
        spectral_norm(nn.utils.spectral_norm(nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="Linear.weight is not one: use mode='matrix'"):
        spectral_norm(nn.Linear(3, 2), mode="operator")
    with pytest.raises(ValueError, match="mode must be 'matrix' or 'operator'"):
        spectral_norm(nn.Linear(3, 2), mode="spectral")
    with pytest.raises(ValueError, match="use mode='matrix' or zero padding"):
        spectral_norm(nn.Conv2d(3, 2, 3, padding=1, padding_mode="circular"), mode="operator")
    with pytest.raises(IndexError, match=r"dim must be in \[-2, 1\]"):
        spectral_norm(nn.Linear(3, 2), dim=2)
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        spectral_norm(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="has no lipnorm spectral norm"):
        remove_spectral_norm(nn.Linear(3, 2))
    with pytest.raises(RuntimeError, match="run one forward first, or pass input_shape"):
        sigma_of(spectral_norm(nn.Conv2d(3, 2, 3), mode="operator"))
    layer = spectral_norm(nn.Linear(3, 2))
    with pytest.raises(AttributeError, match="assign to weight_orig"):
        layer.weight = torch.zeros(2, 3)


# --------------------------------------------------------------------------- operator mode


@pytest.mark.parametrize("make, input_shape", [
    (lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 8, 8)),
    (lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2), (4, 8, 8)),
    (lambda: nn.Conv1d(2, 3, 3, dilation=2, padding=2), (2, 16)),
    (lambda: nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1), (3, 5, 5)),
], ids=["conv2d", "conv2d_strided_grouped", "conv1d_dilated", "conv_transpose2d"])
def test_operator_mode_bounds_the_true_operator_norm_where_torch_does_not(make, input_shape):
    conv = make().double()
    reference = torch_parametrizations.spectral_norm(copy.deepcopy(conv))
    ours = spectral_norm(copy.deepcopy(conv), mode="operator", n_power_iterations=5)
    x = torch.randn(2, *input_shape, dtype=torch.float64)
    for _ in range(60):  # converge the power iterations (training-mode forwards)
        reference(x)
        ours(x)
    reference.eval()
    ours.eval()
    ours_norm = _operator_norm(ours, input_shape)
    assert 1.0 - 1e-3 <= ours_norm <= 1.0 + 1e-3
    assert _operator_norm(reference, input_shape) > 1.0 + 1e-2


def test_operator_mode_warm_up_normalizes_an_eval_first_layer():
    conv = nn.Conv2d(8, 8, 3, padding=1).double()
    ours = spectral_norm(copy.deepcopy(conv), mode="operator", input_shape=(8, 8, 8)).eval()
    reference = torch_parametrizations.spectral_norm(copy.deepcopy(conv)).eval()
    assert 1.0 - 1e-9 <= _operator_norm(ours, (8, 8, 8)) <= 1.0 + 1e-2
    assert _operator_norm(reference, (8, 8, 8)) > 1.0 + 1e-2


def test_operator_mode_reinitializes_for_a_new_input_size():
    conv = spectral_norm(nn.Conv2d(2, 2, 3, padding=1).double(), mode="operator", n_power_iterations=50)
    conv(torch.randn(1, 2, 4, 4, dtype=torch.float64))
    assert conv.weight_v.shape == (1, 2, 4, 4)
    x = torch.randn(1, 2, 9, 9, dtype=torch.float64)
    conv(x)
    assert conv.weight_v.shape == (1, 2, 9, 9)
    for _ in range(10):
        conv(x)
    conv.eval()
    np.testing.assert_allclose(_operator_norm(conv, (2, 9, 9)), 1.0, atol=1e-3)


# --------------------------------------------------------------------------- complex weights


COMPLEX_LAYERS = {
    "linear": (lambda: nn.Linear(6, 5, dtype=torch.complex128), (4, 6)),
    "conv2d": (lambda: nn.Conv2d(2, 3, 3, padding=1, dtype=torch.complex128), (2, 2, 5, 5)),
}


@pytest.mark.parametrize("kind", list(COMPLEX_LAYERS))
def test_complex_weights_match_torch_in_training_and_eval(kind):
    """sigma = u^H W v with conjugate transposes in the iteration, as torch computes it."""
    make, shape = COMPLEX_LAYERS[kind]
    reference, ours = _torch_and_lipnorm(make, torch.complex128)
    ref_weight = reference.parametrizations.weight.original
    for training in (True, True, False):
        reference.train(training)
        ours.train(training)
        x = torch.randn(shape, dtype=torch.complex128, requires_grad=True)
        y_ref, y_ours = reference(x), ours(x)
        torch.testing.assert_close(y_ours, y_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours.weight_u, reference.parametrizations.weight[0]._u, rtol=1e-10, atol=1e-12)
        grad_out = torch.randn_like(y_ref)
        for g_ref, g_ours in zip(_grads(y_ref, [ref_weight, reference.bias, x], grad_out),
                                 _grads(y_ours, [ours.weight_orig, ours.bias, x], grad_out)):
            torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)


def test_complex_weight_sigma_is_the_largest_singular_value():
    layer = spectral_norm(nn.Linear(7, 4, dtype=torch.complex64))
    warm_up(layer, 200)
    exact = torch.linalg.matrix_norm(layer.weight_orig.detach(), 2)
    sigma = sigma_of(layer)
    assert sigma.dtype == torch.float32
    torch.testing.assert_close(sigma, exact, rtol=1e-5, atol=0)
    assert sigmas(layer) == {"weight": pytest.approx(float(exact), rel=1e-5)}


def test_complex_gradcheck_linear():
    layer = spectral_norm(nn.Linear(4, 3, dtype=torch.complex128))
    x = torch.randn(2, 4, dtype=torch.complex128, requires_grad=True)
    layer.eval()
    assert torch.autograd.gradcheck(lambda x, w: torch.func.functional_call(layer, {"weight_orig": w}, (x,)),
                                    (x, layer.weight_orig.detach().clone().requires_grad_()))


def test_operator_mode_refuses_complex_weights():
    with pytest.raises(ValueError, match="complex weights.*use mode='matrix'"):
        spectral_norm(nn.Conv2d(2, 3, 3, dtype=torch.complex64), mode="operator")


# --------------------------------------------------------------------------- torch's APIs


def _pre_1_0_legacy_state_dict(module, x):
    """A state dict as torch's legacy spectral_norm wrote it before its version 1: the
    normalized weight itself under ``weight``, ``weight_orig`` and ``weight_u``, no ``weight_v``."""
    nn.utils.spectral_norm(module)
    module(x)
    state = module.state_dict()
    state["weight"] = module.weight.detach().clone()
    del state["weight_v"]
    del state._metadata[""]["spectral_norm"]
    return state


@pytest.mark.parametrize("make, x", [
    (lambda: nn.Linear(5, 4), torch.randn(3, 5)),
    (lambda: nn.Conv2d(2, 3, 3), torch.randn(2, 2, 6, 6)),
    (lambda: nn.ConvTranspose2d(3, 2, 3), torch.randn(2, 3, 4, 4)),
], ids=["linear", "conv2d", "conv_transpose2d"])
def test_load_pre_1_0_legacy_checkpoint_like_torch(make, x):
    """v is recomputed from u and the weights, as torch's legacy load hook does, so eval
    reproduces the saved normalized weight."""
    state = _pre_1_0_legacy_state_dict(make(), x)
    saved_weight = state["weight"].clone()
    reference = nn.utils.spectral_norm(make())
    reference.load_state_dict(copy.deepcopy(state))
    ours = spectral_norm(make())
    ours.load_state_dict(copy.deepcopy(state))
    reference.eval()
    ours.eval()
    torch.testing.assert_close(ours.weight, saved_weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-6)
    # Both v give <u, W v> = sigma; lipnorm's is the least-norm solution of W v = u, torch's
    # (from the pseudo-inverse of W^T W in float32) may differ by a null-space component.


def test_torch_parametrization_api_names_lipnorm_equivalents():
    layer = spectral_norm(nn.Linear(3, 4))
    assert not torch.nn.utils.parametrize.is_parametrized(layer)
    with pytest.raises(AttributeError, match=r"weight_orig.*remove_spectral_norm\(module, 'weight'\)"):
        layer.parametrizations.weight.original
    with pytest.raises(ValueError, match=r"lipnorm.*remove_spectral_norm\(module, 'weight'\)"):
        torch.nn.utils.parametrize.remove_parametrizations(layer, "weight")
    assert isinstance(remove_spectral_norm(layer).weight, nn.Parameter)
    with pytest.raises(AttributeError, match="has no attribute 'parametrizations'"):
        layer.parametrizations
