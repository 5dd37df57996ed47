"""The benchmark networks at CNN scale, trained on scikit-learn's digits, cached.

Use::

    from benchmarks.cnn_nets import NETS, load_net   # run from the repository root
    net = load_net("cnn32")                          # trains once, then reads build/cnn_nets/
    lipnorm.certify(net.model, net.input_shape, time_budget=net.spec.budget)
    x, y = net.inputs(), net.labels()                # the training data, in the model's layout

or ``python benchmarks/cnn_nets.py [--only NAME]`` to train and cache them all and print
their train accuracy (``NAME``: a key of :data:`NETS`).

Data: the 1 797 8×8 digits of ``sklearn.datasets.load_digits`` (values / 16), upsampled
bilinearly to 32×32 or 16×16 and repeated in three channels, each image with its own tint
(per channel a factor in [0.3, 1] from ``default_rng(0)``), so the channels differ.

Which nets are trained (Adam 1e-3, batch 64, seeded, one CPU thread, until the train
accuracy in eval mode is ≥ 99 %, at most ``epochs``; 3–6 epochs, 12 s to 7 min each on
a shared 2-core machine) and which keep their random initialization: the two 224×224
nets, whose training on 8×8 digits blown up 28× would cost CPU hours (torchvision's
resnet18 has 3× the CIFAR ResNet-18's 0.56 GMAC a sample, ResNet50 7×) and say nothing
the 32×32 nets do not:

=================  ==========================================================  ========
key                network                                                      weights
=================  ==========================================================  ========
``cnn32``          4-conv CNN at 3×32×32: conv 32 (3×3), 32 (4×4, stride 2),    trained
                   64 (3×3), 64 (4×4, stride 2), zero padding 1, ReLU,
                   FC 256, FC 10
``cnn16``          the same CNN at 3×16×16 (15 616 hidden neurons)               trained
``resnet8``        8-layer CIFAR ResNet: 3×3 stem 16, one basic block per       trained
                   stage 16 / 32 stride 2 / 64 stride 2, BatchNorm, global
                   average pool, FC 10
``bn_gelu_cnn``    conv 32 (3×3), BN, GELU, avg pool 2; conv 64 (3×3), BN,      trained
                   GELU, avg pool 2; FC 128, GELU, FC 10, at 3×32×32
``resnet18_cifar`` CIFAR ResNet-18 (3×3 stem, four stages of two basic blocks)  trained
                   at 3×32×32
``resnet18_224``   torchvision's resnet18 layout at 3×224×224                   random
``keras_resnet50`` ``keras.applications.ResNet50(weights=None)`` at 224×224×3   random
=================  ==========================================================  ========

Random nets: torch's (or Keras's) initial weights from seed 0, and for torch's resnet18
random BatchNorm statistics (:func:`tests.resnet18.randomize_batchnorm`), so that BN is not
the identity. Trained weights are cached in ``build/cnn_nets/`` (or ``$LIPNORM_NETS_CACHE``)
under a name that includes a hash of the architecture and the training settings, so a
change of either retrains. Models come back in eval mode, float32.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

__all__ = ["NETS", "BenchNet", "NetSpec", "digit_images", "digits", "load_net", "train"]

CACHE = Path(os.environ.get("LIPNORM_NETS_CACHE", ROOT / "build" / "cnn_nets"))
TARGET_ACCURACY = 0.99


def digits():
    """scikit-learn's digits as float32 torch tensors: inputs (1797, 64) / 16, labels (1797,)."""
    import torch
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)


def digit_images(size: int, count: int | None = None, channels_last: bool = False):
    """The digits upsampled to ``size``×``size`` in three tinted channels.

    Parameters
    ----------
    size : int
        Side of the images (bilinear upsampling of the 8×8 digits).
    count : int, optional
        The first ``count`` images only (all 1 797 by default).
    channels_last : bool
        Layout (count, size, size, 3) (Keras) instead of (count, 3, size, size).

    Returns
    -------
    x : torch.Tensor, float32
    y : torch.Tensor, int64, shape (count,)
    """
    import torch

    x, y = digits()
    count = len(x) if count is None else min(count, len(x))
    tint = torch.tensor(np.random.default_rng(0).uniform(0.3, 1.0, (len(x), 3)), dtype=torch.float32)[:count]
    images = x[:count].reshape(count, 1, 8, 8)
    if size != 8:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images * tint[:, :, None, None]
    if channels_last:
        images = images.permute(0, 2, 3, 1)
    return images.contiguous(), y[:count]


def train(model, x, y, epochs: int, seed: int = 0, target: float | None = None):
    """Adam (1e-3, batch 64, seeded) on cross-entropy; the model in eval mode, and its accuracy.

    Parameters
    ----------
    model : torch.nn.Module
    x, y : torch.Tensor
        Inputs and integer labels.
    epochs : int
        Epochs to train (at most that many when ``target`` is given).
    seed : int
        Seed of the batch order.
    target : float, optional
        Stop after the first epoch whose train accuracy (eval mode) reaches it.

    Returns
    -------
    model : torch.nn.Module
        The same module, in eval mode.
    accuracy : float
        Train accuracy in eval mode.
    epochs : int
        Epochs run.
    """
    import torch

    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    accuracy, done = 0.0, 0
    for done in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            batch = order[start:start + 64]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        if target is not None or done == epochs:
            accuracy = _accuracy(model.eval(), x, y)
            if target is not None and accuracy >= target:
                break
    return model.eval(), accuracy, done


def _accuracy(model, x, y) -> float:
    import torch

    with torch.no_grad():
        return float(sum((model(x[i:i + 256]).argmax(1) == y[i:i + 256]).sum() for i in range(0, len(x), 256))
                     / len(x))


def cnn4(size: int):
    """The 4-conv CNN of issue 19 for 3×``size``×``size`` inputs (``size`` divisible by 4)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * (size // 4) ** 2, 256), nn.ReLU(), nn.Linear(256, 10))


def bn_gelu_cnn():
    """A CNN with BatchNorm, GELU and average pooling, for 3×32×32 inputs."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.GELU(), nn.AvgPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.GELU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.GELU(), nn.Linear(128, 10))


def resnet8():
    from tests.resnet18 import cifar_resnet

    return cifar_resnet((16, 32, 64), 1)


def cifar_resnet18():
    from tests.resnet18 import cifar_resnet

    return cifar_resnet((64, 128, 256, 512), 2)


def random_resnet18_224():
    from tests.resnet18 import ResNet18, randomize_batchnorm

    return randomize_batchnorm(ResNet18())


def keras_resnet50():
    import keras

    keras.utils.set_random_seed(0)
    return keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3))


@dataclass(frozen=True)
class NetSpec:
    """One benchmark network.

    Attributes
    ----------
    key : str
    title : str
        The row label in the benchmark's table.
    input_shape : tuple of int
        One input, without the batch axis, in the model's layout.
    build : callable
        ``build() -> model`` with its initial weights (torch: call under a seed).
    epochs : int or None
        Training epochs at most (until ≥ 99 % train accuracy); None: random weights.
    budget : float
        The ``time_budget`` of the benchmark for this net (the issue's targets).
    framework : {"torch", "keras"}
    """

    key: str
    title: str
    input_shape: tuple[int, ...]
    build: Callable
    epochs: int | None
    budget: float
    framework: str = "torch"

    @property
    def trained(self) -> bool:
        return self.epochs is not None

    @property
    def image_size(self) -> int:
        return self.input_shape[0] if self.framework == "keras" else self.input_shape[-1]


NETS = {spec.key: spec for spec in (
    NetSpec("cnn32", "4-conv CNN 32×32", (3, 32, 32), lambda: cnn4(32), 30, 60.0),
    NetSpec("cnn16", "4-conv CNN 16×16", (3, 16, 16), lambda: cnn4(16), 30, 5.0),
    NetSpec("resnet8", "ResNet-8 32×32", (3, 32, 32), resnet8, 30, 60.0),
    NetSpec("bn_gelu_cnn", "BN-GELU-avgpool CNN 32×32", (3, 32, 32), bn_gelu_cnn, 30, 60.0),
    NetSpec("resnet18_cifar", "CIFAR ResNet-18 32×32", (3, 32, 32), cifar_resnet18, 10, 120.0),
    NetSpec("resnet18_224", "resnet18 224×224 (random)", (3, 224, 224), random_resnet18_224, None, 600.0),
    NetSpec("keras_resnet50", "Keras ResNet50 224×224 (random)", (224, 224, 3), keras_resnet50, None, 600.0,
            "keras"),
)}


@dataclass
class BenchNet:
    """A benchmark network ready to measure: ``model`` in eval mode, with its data at hand.

    Attributes
    ----------
    spec : NetSpec
    model : torch.nn.Module or keras.Model
    accuracy : float or None
        Train accuracy (None for random weights).
    epochs : int
        Epochs trained (0 for random weights).
    weights : str
        Names these weights: the cache file's name for trained ones, ``"<key>-random"`` else.
    """

    spec: NetSpec
    model: object
    accuracy: float | None
    epochs: int
    weights: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.spec.input_shape

    def inputs(self, count: int | None = None) -> np.ndarray:
        """The digits images in the model's input shape and layout, float32 (count, *input_shape)."""
        x, _ = digit_images(self.spec.image_size, count, channels_last=self.spec.framework == "keras")
        return x.numpy()

    def labels(self, count: int | None = None) -> np.ndarray:
        return digits()[1][:count].numpy()


def load_net(key: str) -> BenchNet:
    """The network ``key`` of :data:`NETS`: built, trained (or read from the cache), in eval mode.

    Raises
    ------
    KeyError
        For an unknown key (the message lists them).
    """
    if key not in NETS:
        raise KeyError(f"unknown benchmark net {key!r}; expected one of {', '.join(NETS)}")
    spec = NETS[key]
    if spec.framework == "keras":
        return BenchNet(spec, spec.build(), None, 0, f"{key}-random")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: deterministic, and kind to a shared machine
    try:
        torch.manual_seed(0)
        model = spec.build()
        if not spec.trained:
            return BenchNet(spec, model.eval(), None, 0, f"{key}-random")
        path = CACHE / f"{key}-{_fingerprint(spec, model)}.pt"
        if path.exists():
            saved = torch.load(path, weights_only=True)
            model.load_state_dict(saved["state"])
            return BenchNet(spec, model.eval(), float(saved["accuracy"]), int(saved["epochs"]), path.stem)
        x, y = digit_images(spec.image_size)
        model, accuracy, epochs = train(model, x, y, spec.epochs, target=TARGET_ACCURACY)
        if accuracy < TARGET_ACCURACY:
            print(f"warning: {key} reached {accuracy:.4f} train accuracy in {epochs} epochs", file=sys.stderr)
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save({"state": model.state_dict(), "accuracy": accuracy, "epochs": epochs}, path)
        return BenchNet(spec, model, accuracy, epochs, path.stem)
    finally:
        torch.set_num_threads(threads)


def _fingerprint(spec: NetSpec, model) -> str:
    """A short hash of the architecture and the training settings (a change retrains)."""
    text = f"{model}|{spec.input_shape}|{spec.epochs}|{TARGET_ACCURACY}|adam1e-3|batch64|seed0|tint0.3-1"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description="Train and cache the benchmark networks.")
    parser.add_argument("--only", choices=list(NETS), action="append", help="these nets only (repeatable)")
    args = parser.parse_args()
    for key in args.only or [k for k, spec in NETS.items() if spec.trained]:
        start = time.perf_counter()
        net = load_net(key)
        accuracy = "random weights" if net.accuracy is None else f"train accuracy {net.accuracy:.4f}"
        print(f"{key}: {accuracy}, {net.epochs} epochs, {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
