"""The core on GPU arrays (torch CUDA, CuPy). Skipped cleanly where no GPU is present.

The same promises as tests/test_devices.py, which proves them without a GPU on
array_api_strict's second device: results, states and start vectors stay on the
weight's device, and a state on another device is refused rather than moved.
"""

from __future__ import annotations

import numpy as np
import pytest

import lipnorm
from lipnorm._xp import device_of
from tests.helpers import assert_contains, assert_relative_close, true_sigma

RNG = np.random.default_rng(3)
MATRIX = RNG.standard_normal((300, 200)).astype(np.float32)


class GpuBackend:
    """A GPU array library: ``asarray`` puts NumPy data on its device, ``host`` its CPU twin."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "torch-cuda":
            torch = pytest.importorskip("torch")
            if not torch.cuda.is_available():
                pytest.skip("no CUDA device")
            self.module = torch
        else:
            cupy = pytest.importorskip("cupy")
            try:
                if cupy.cuda.runtime.getDeviceCount() < 1:
                    pytest.skip("no CUDA device")
            except cupy.cuda.runtime.CUDARuntimeError:
                pytest.skip("no CUDA device")
            self.module = cupy

    def asarray(self, values: np.ndarray, dtype=None):
        if self.name == "torch-cuda":
            return self.module.asarray(values, device="cuda", dtype=dtype)
        return self.module.asarray(values, dtype=dtype)

    def host(self, array):
        """The same values in the library on the CPU (NumPy for CuPy)."""
        return array.cpu() if self.name == "torch-cuda" else array.get()


@pytest.fixture(params=["torch-cuda", "cupy"])
def gpu(request) -> GpuBackend:
    return GpuBackend(request.param)


def assert_on_device(x, device, what: str) -> None:
    assert device_of(x) == device, f"{what} is on {device_of(x)}, not on {device}"


@pytest.mark.parametrize("method", ["lanczos", "power", "svd"])
def test_result_and_state_stay_on_the_gpu(gpu, method):
    weight = gpu.asarray(MATRIX)
    sigma, state = lipnorm.estimate_sigma(weight, method=method, return_state=True, seed=0)
    assert_on_device(sigma, device_of(weight), "sigma")
    assert str(sigma.dtype).endswith("float32")
    if method != "svd":
        assert_on_device(state.u, device_of(weight), "state.u")
        assert_on_device(state.v, device_of(weight), "state.v")
    assert_relative_close(float(sigma), true_sigma(MATRIX), 2e-6, f"{gpu.name} {method}")
    assert_contains(lipnorm.sigma_bounds(weight), true_sigma(MATRIX))


def test_warm_start_stays_on_the_gpu(gpu):
    weight = gpu.asarray(MATRIX)
    _, state = lipnorm.estimate_sigma(weight, method="lanczos", return_state=True, seed=0)
    nudged = (MATRIX + 1e-4 * RNG.standard_normal(MATRIX.shape)).astype(np.float32)
    sigma, warm = lipnorm.estimate_sigma(gpu.asarray(nudged), state=state, return_state=True)
    assert_on_device(sigma, device_of(weight), "sigma")
    assert_on_device(warm.v, device_of(weight), "state.v")
    assert warm.converged
    assert_relative_close(float(sigma), true_sigma(nudged), 2e-6, f"{gpu.name} warm start")


def test_a_gpu_state_is_not_moved_to_a_host_weight():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _, state = lipnorm.estimate_sigma(
        torch.asarray(MATRIX, device="cuda"), method="lanczos", return_state=True, seed=0
    )
    with pytest.raises(ValueError, match="state's vectors are on device cuda"):
        lipnorm.estimate_sigma(torch.asarray(MATRIX), state=state)


def test_torch_cuda_half_precision():
    gpu = GpuBackend("torch-cuda")
    weight = gpu.asarray(MATRIX, dtype=gpu.module.float16)
    sigma = lipnorm.estimate_sigma(weight)
    assert sigma.dtype == gpu.module.float16 and sigma.device.type == "cuda"
    assert_relative_close(float(sigma), true_sigma(weight), 1e-2, "float16")


STACK = RNG.standard_normal((4, 2, 60, 40)).astype(np.float32)


def test_a_stack_result_and_state_stay_on_the_gpu(gpu):
    weight = gpu.asarray(STACK)
    sigma, state = lipnorm.estimate_sigma(weight, batched=True, method="lanczos", return_state=True)
    device = device_of(weight)
    for array, what in ((sigma, "sigma"), (state.u, "state.u"), (state.v, "state.v")):
        assert_on_device(array, device, what)
    assert tuple(sigma.shape) == (4, 2) and str(sigma.dtype).endswith("float32")
    assert tuple(state.u.shape) == (4, 2, 60) and tuple(state.v.shape) == (4, 2, 40)
    truths = np.array([true_sigma(matrix) for matrix in STACK.reshape(-1, 60, 40)]).reshape(4, 2)
    np.testing.assert_allclose(np.asarray(gpu.host(sigma)), truths, rtol=2e-6)
    nudged = gpu.asarray((STACK * 1.001).astype(np.float32))
    warm_sigma, warm = lipnorm.estimate_sigma(nudged, batched=True, state=state, return_state=True)
    assert_on_device(warm_sigma, device, "warm sigma")
    assert np.all(warm.converged)
    lower, upper = lipnorm.sigma_bounds(nudged, batched=True, state=warm)
    assert np.all((lower <= 1.001 * truths * (1 + 1e-6)) & (1.001 * truths * (1 - 1e-6) <= upper))


def test_torch_cuda_bfloat16_stack():
    gpu = GpuBackend("torch-cuda")
    weight = gpu.asarray(STACK, dtype=gpu.module.bfloat16)
    sigma = lipnorm.estimate_sigma(weight, batched=True)
    assert sigma.dtype == gpu.module.bfloat16 and sigma.device.type == "cuda"
    truths = np.array([true_sigma(m) for m in weight.float().cpu().numpy().reshape(-1, 60, 40)])
    np.testing.assert_allclose(sigma.float().cpu().numpy().reshape(-1), truths, rtol=1e-2)
