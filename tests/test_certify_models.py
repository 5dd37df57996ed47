"""Real architectures written by others certify end to end: finite bound, upper >= lower.

Slow (minutes on 2 CPU cores): marked ``slow``; inputs are reduced to 32×32 (the bound
holds for the input size it was computed on; the 224×224 figures are in
benchmarks/bench_certify.py).
"""

import os

import numpy as np
import pytest

from lipnorm.certify import certify, lipschitz_lower_bound
from tests.helpers import FLOAT32_EVALUATION_SLACK

pytestmark = pytest.mark.slow


def check(model, shape=None):
    certificate = certify(model, shape)
    assert np.isfinite(certificate.upper) and certificate.upper > 0
    lower = lipschitz_lower_bound(model, input_shape=certificate.input_shape, starts=2, steps=4)
    assert certificate.upper >= lower.value * (1 - FLOAT32_EVALUATION_SLACK) > 0, certificate.table()
    convs = [row for row in certificate.layers if row.method.startswith("conv")]
    assert convs and all(row.lower and row.bound >= row.lower for row in convs)
    return certificate


def test_torch_resnet18():
    torch = pytest.importorskip("torch")
    from tests.resnet18 import ResNet18

    torch.manual_seed(0)
    certificate = check(ResNet18(classes=10).eval(), (3, 32, 32))
    merged = [row for row in certificate.layers if row.layer_type == "Conv2d+BatchNorm2d"]
    assert len(merged) == 20  # every convolution has its BatchNorm folded in


@pytest.mark.parametrize("name", ["ResNet50", "VGG16", "MobileNetV2"])
def test_keras_applications(name):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3), classes=10)
    check(model)
