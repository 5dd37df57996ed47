"""The per-layer bounds of the small CNN that opens docs/certify.md (the same model and call).

Writes docs/img/certify_small_cnn.png.
"""

from __future__ import annotations

import torch
from torch import nn

import lipnorm
from _style import IMG


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()
    certificate = lipnorm.certify(model, input_shape=(1, 8, 8), lower=True)
    certificate.plot(IMG / "certify_small_cnn.png", title="Small CNN (convolutions, BatchNorm, pooling): bound of each layer")
    print("wrote docs/img/certify_small_cnn.png")


if __name__ == "__main__":
    main()
