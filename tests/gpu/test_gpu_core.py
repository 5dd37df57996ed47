"""The core on GPU arrays (CuPy, torch CUDA). Skipped where no GPU is present."""

from __future__ import annotations

import numpy as np
import pytest

import lipnorm
from tests.helpers import assert_contains, assert_relative_close, true_sigma

RNG = np.random.default_rng(3)
MATRIX = RNG.standard_normal((300, 200)).astype(np.float32)


def _cupy():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except cupy.cuda.runtime.CUDARuntimeError:
        pytest.skip("no CUDA device")
    return cupy


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch


@pytest.mark.parametrize("method", ["lanczos", "power", "svd"])
def test_cupy_stays_on_device(method):
    cupy = _cupy()
    weight = cupy.asarray(MATRIX)
    sigma, state = lipnorm.estimate_sigma(weight, method=method, return_state=True)
    assert isinstance(sigma, cupy.ndarray) and sigma.dtype == cupy.float32
    if state.v is not None:
        assert isinstance(state.v, cupy.ndarray)
    assert_relative_close(float(sigma), true_sigma(MATRIX), 2e-6, f"cupy {method}")
    assert_contains(lipnorm.sigma_bounds(weight), true_sigma(MATRIX))


@pytest.mark.parametrize("method", ["lanczos", "power", "svd"])
def test_torch_cuda_stays_on_device(method):
    torch = _torch_cuda()
    weight = torch.asarray(MATRIX, device="cuda")
    sigma, state = lipnorm.estimate_sigma(weight, method=method, return_state=True)
    assert sigma.device.type == "cuda" and sigma.dtype == torch.float32
    if state.v is not None:
        assert state.v.device.type == "cuda"
    assert_relative_close(float(sigma), true_sigma(MATRIX), 2e-6, f"torch cuda {method}")
    assert_contains(lipnorm.sigma_bounds(weight), true_sigma(MATRIX))


def test_torch_cuda_half_precision():
    torch = _torch_cuda()
    weight = torch.asarray(MATRIX, device="cuda", dtype=torch.float16)
    sigma = lipnorm.estimate_sigma(weight)
    assert sigma.dtype == torch.float16 and sigma.device.type == "cuda"
    assert_relative_close(float(sigma), true_sigma(weight), 1e-2, "float16")
