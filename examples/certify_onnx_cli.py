"""Certify an ONNX model's Lipschitz constant from the command line.

The script trains a small CNN on scikit-learn's 8×8 digits with PyTorch, exports it to
ONNX, and runs the shell command a user would::

    lipnorm certify digits_cnn.onnx --json certificate.json --plot certificate.png

(the input shape is read from the ONNX graph; ``--input-shape 1,8,8`` gives it where the
graph leaves it open). The command prints the per-layer table and writes the certificate
as JSON and as a bar chart; the script reads the JSON back. ``--lower`` (an empirical lower
bound beside it) needs autodiff, so it is for torch and Keras models, not ONNX files.

Run::

    python examples/certify_onnx_cli.py          # 5 epochs of training
    python examples/certify_onnx_cli.py --fast   # 1 epoch on 256 images (what CI runs)

The data set ships with scikit-learn; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings

import numpy as np
import torch
from torch import nn


def train_cnn(epochs: int, n: int | None = None, seed: int = 0) -> nn.Sequential:
    """A two-convolution CNN fitted to the digits with cross-entropy; returned in eval mode."""
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    data = load_digits()
    images = torch.from_numpy(data.images[:n].astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(data.target[:n])
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(images)).split(64):
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="1 epoch on 256 images (for CI)")
    args = parser.parse_args(argv)
    model = train_cnn(epochs=1 if args.fast else 5, n=256 if args.fast else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), "digits_cnn.onnx", dynamo=False)
    command = ["lipnorm", "certify", "digits_cnn.onnx",
               "--json", "certificate.json", "--plot", "certificate.png"]
    print("$", " ".join(command))
    # `python -m lipnorm.cli` is the `lipnorm` command, run with this script's interpreter.
    subprocess.run([sys.executable, "-m", "lipnorm.cli", *command[1:]], check=True)
    with open("certificate.json") as file:
        certificate = json.load(file)
    print(f"certificate.json: Lipschitz constant <= {certificate['upper']:.6g} "
          f"on inputs of shape {tuple(certificate['input_shape'])}")
    return certificate


if __name__ == "__main__":
    main()
