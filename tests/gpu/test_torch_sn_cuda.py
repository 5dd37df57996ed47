"""lipnorm's torch spectral norm on CUDA (skipped without a CUDA device)."""

import copy

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import torch.nn.utils.parametrizations as torch_parametrizations  # noqa: E402

from lipnorm.backends.torch import sigma_of, spectral_norm  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Linear(64, 32), (16, 64)),
    (lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1), (4, 8, 16, 16)),
    (lambda: nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1), (4, 8, 8, 8)),
], ids=["linear", "conv2d", "conv_transpose2d"])
def test_matches_torch_on_cuda(make, shape):
    torch.manual_seed(0)
    reference = make().cuda().double()
    ours = copy.deepcopy(reference)
    torch_parametrizations.spectral_norm(reference)
    spectral_norm(ours)
    assert ours.weight_u.is_cuda
    with torch.no_grad():
        ours.weight_u.copy_(reference.parametrizations.weight[0]._u)
        ours.weight_v.copy_(reference.parametrizations.weight[0]._v)
    x = torch.randn(shape, device="cuda", dtype=torch.float64, requires_grad=True)
    y_ref, y_ours = reference(x), ours(x)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad(y_ref, [reference.parametrizations.weight.original, x], g)
    grads_ours = torch.autograd.grad(y_ours, [ours.weight_orig, x], g)
    for a, b in zip(grads_ours, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_autocast_on_cuda_keeps_power_iteration_in_float32(dtype):
    layer = spectral_norm(nn.Conv2d(8, 8, 3, padding=1).cuda())
    x = torch.randn(4, 8, 16, 16, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype and layer.weight_u.dtype == torch.float32
    y.float().square().mean().backward()
    assert torch.isfinite(layer.weight_orig.grad).all() and torch.isfinite(sigma_of(layer))


def test_operator_mode_on_cuda_bounds_the_operator_norm():
    layer = spectral_norm(nn.Conv2d(4, 4, 3, padding=1).cuda().double(), mode="operator", n_power_iterations=50)
    x = torch.randn(2, 4, 6, 6, device="cuda", dtype=torch.float64)
    for _ in range(20):
        layer(x)
    layer.eval()
    n = 4 * 6 * 6
    basis = torch.eye(n, device="cuda", dtype=torch.float64).reshape(n, 4, 6, 6)
    with torch.no_grad():
        columns = layer(basis) - layer(torch.zeros(1, 4, 6, 6, device="cuda", dtype=torch.float64))
    norm = torch.linalg.matrix_norm(columns.reshape(n, -1), 2)
    assert abs(float(norm) - 1.0) <= 1e-3
