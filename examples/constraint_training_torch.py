"""Train an MLP on the digits with AdamW under a certified spectral cap, then certify the network.

1. ``lipnorm.backends.torch.SpectralConstraint(model, max_sigma=1.0)`` is attached to AdamW:
   after every step each Linear weight has a certified sigma <= 1.001 (the cap times 1 + rtol);
2. ``constraint.certify()`` gives each weight's certified sigma;
3. ``lipnorm.certify(model)`` certifies the whole network's Lipschitz constant: with
   1-Lipschitz ReLUs the product of the layers' bounds is at most 1.001^3, and the ladder's
   tighter methods improve on it;
4. the same network trained without the constraint, for comparison.

Run::

    python examples/constraint_training_torch.py          # 40 epochs
    python examples/constraint_training_torch.py --fast   # 4 epochs (what CI runs)

The data set ships with scikit-learn; nothing is downloaded.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import lipnorm
from lipnorm.backends.torch import SpectralConstraint
from lipnorm.demo.digits import load_digits_split


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def train(model: nn.Module, digits, epochs: int, constraint: SpectralConstraint | None) -> float:
    """AdamW on the cross-entropy (logits scaled by 10, so that a 1-Lipschitz network can still
    be confident); returns the test accuracy."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    if constraint is not None:
        constraint.attach(optimizer)
    images, labels = torch.as_tensor(digits.train_images), torch.as_tensor(digits.train_labels)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(10 * model(images[batch]), labels[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = model(torch.as_tensor(digits.test_images)).argmax(dim=1)
    return float((predicted == torch.as_tensor(digits.test_labels)).float().mean())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="4 epochs (for CI)")
    args = parser.parse_args(argv)
    digits = load_digits_split()
    epochs = 4 if args.fast else 40
    results = {}
    for name in ("constrained", "unconstrained"):
        model = build_model()
        constraint = SpectralConstraint(model, max_sigma=1.0)
        accuracy = train(model, digits, epochs, constraint if name == "constrained" else None)
        sigmas = constraint.certify() if name == "constrained" else None
        product = lipnorm.certify(model, (8, 8), method="product").upper
        certificate = lipnorm.certify(model, (8, 8), time_budget=20.0)
        results[name] = {"accuracy": accuracy, "product": product, "upper": certificate.upper}
        print(f"{name}: test accuracy {accuracy:.3f}, Lipschitz constant <= {certificate.upper:.4f} "
              f"(product of the layers' bounds {product:.4f})")
        if sigmas is not None:
            print("certified sigma of each weight:", ", ".join(f"{k} {v:.4f}" for k, v in sigmas.items()))
    return results


if __name__ == "__main__":
    main()
