"""Demo section: a spectrally normalized CNN trained on the digits with PyTorch, then certified.

The convolutions are normalized in lipnorm's ``mode="operator"`` (by the norm of the
convolution itself), the classifier in torch's matrix semantics. After training, the table
compares every layer's certified operator norm with what torch's spectral norm (σ of the
reshaped kernel) would have left, and :func:`lipnorm.certify` bounds the whole network with
a lower bound beside it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

import lipnorm
from lipnorm.demo.digits import Digits, load_digits_split
from lipnorm.demo.report import format_seconds, new_table

__all__ = ["CERTIFICATE_PLOT", "build_model", "torch_section", "train"]

#: File name of the certificate's bar chart, written into the demo's output directory.
CERTIFICATE_PLOT = "lipnorm-demo-certificate.png"
INPUT_SHAPE = (1, 8, 8)


def build_model(seed: int = 0, *, normalized_classifier: bool = True) -> Any:
    """Two operator-normalized convolutions and a linear classifier.

    Parameters
    ----------
    seed : int
        Seed of torch's generator for the initial weights.
    normalized_classifier : bool
        Spectrally normalize the classifier too (else it is free, as a margin loss wants:
        its rows set the logit differences' scale).

    Returns
    -------
    torch.nn.Sequential
        Maps ``(batch, 1, 8, 8)`` images to 10 logits.
    """
    import torch
    from torch import nn

    from lipnorm.backends.torch import spectral_norm

    torch.manual_seed(seed)
    first = spectral_norm(nn.Conv2d(1, 16, 3, padding=1), mode="operator", input_shape=INPUT_SHAPE)
    second = spectral_norm(nn.Conv2d(16, 32, 3, stride=2, padding=1), mode="operator",
                           input_shape=(16, 8, 8))
    classifier = nn.Linear(32 * 4 * 4, 10)
    return nn.Sequential(
        first,
        nn.ReLU(),
        second,
        nn.ReLU(),
        nn.Flatten(),
        spectral_norm(classifier) if normalized_classifier else classifier,
    )


def train(model: Any, digits: Digits, *, epochs: int, batch_size: int = 32, seed: int = 0,
          loss: Any = None) -> float:
    """Train with Adam on cross-entropy (or ``loss``); return the test accuracy.

    Parameters
    ----------
    model : torch.nn.Module
        Maps ``(batch, 1, 8, 8)`` to 10 logits; left in eval mode.
    digits : Digits
    epochs : int
    batch_size : int
    seed : int
        Seed of the batch order.
    loss : callable, optional
        ``loss(logits, labels)``; default: cross-entropy.

    Returns
    -------
    float
        Share of test images classified correctly.
    """
    import torch

    images = torch.from_numpy(digits.train_images[:, None])
    labels = torch.from_numpy(digits.train_labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    loss = loss or torch.nn.functional.cross_entropy
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=generator).split(batch_size):
            value = loss(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(digits.test_images[:, None])).argmax(dim=1)
    return float((predicted.numpy() == digits.test_labels).mean())


def torch_section(console: Any, output_dir: Path) -> None:
    """Train :func:`build_model` on the digits, print its layers' norms, certify it, plot."""
    from lipnorm.backends.torch import warm_up

    digits = load_digits_split()
    model = build_model()
    start = time.perf_counter()
    accuracy = train(model, digits, epochs=15)
    seconds = time.perf_counter() - start
    warm_up(model, iterations=100)
    console.print(
        f"Trained on {len(digits.train_labels)} digits, 15 epochs in {format_seconds(seconds)}: "
        f"test accuracy {accuracy:.1%}. Then warm_up(model, iterations=100) converges u, v "
        "to the final weights (one power step per training step lags behind Adam)."
    )
    console.print(_layer_table(model))
    console.print(
        "σ: what the layer divides its weight by (lipnorm.backends.torch.sigma_of). Operator "
        "norm: certified interval of the normalized layer as a map on its input (σ is estimated "
        "from below, so the norm can sit a hair above 1). Torch's SN divides a convolution by "
        "σ of its reshaped kernel instead, which is not the convolution's norm."
    )

    start = time.perf_counter()
    certificate = lipnorm.certify(model, input_shape=INPUT_SHAPE, lower=True)
    console.print(f"lipnorm.certify(model, input_shape={INPUT_SHAPE}, lower=True) in "
                  f"{format_seconds(time.perf_counter() - start)}:")
    console.print(certificate.table(), markup=False, highlight=False)
    plot_path = output_dir / CERTIFICATE_PLOT
    certificate.plot(plot_path, title="Spectrally normalized CNN trained on the digits: bound of each layer")
    console.print(f"Per-layer bounds plotted to {plot_path}.")


def _layer_table(model: Any) -> Any:
    """Per normalized layer: σ, the certified operator norm, and torch's SN's operator norm."""
    import torch

    from lipnorm.backends.torch import sigma_of

    table = new_table(
        "The trained layers: lipnorm's normalization next to torch's",
        ("layer", "σ", "operator norm, lipnorm", "operator norm, torch SN"),
    )
    shapes = _input_shapes(model, torch.zeros(1, *INPUT_SHAPE))
    for name, module in model.named_modules():
        if name not in shapes:
            continue
        raw = module.weight_orig.detach().numpy().astype(np.float64)
        normalized = module.weight.detach().numpy().astype(np.float64)
        reshaped_sigma = float(lipnorm.sigma_bounds(raw.reshape(raw.shape[0], -1)).upper)
        ours = lipnorm.sigma_bounds(_operator(module, normalized, shapes[name]))
        torchs = lipnorm.sigma_bounds(_operator(module, raw / reshaped_sigma, shapes[name]))
        table.add_row(
            f"{name} {type(module).__name__}", f"{float(sigma_of(module)):.6g}",
            f"[{ours.lower:.5f}, {ours.upper:.5f}]", f"[{torchs.lower:.5f}, {torchs.upper:.5f}]",
        )
    return table


def _operator(module: Any, weight: np.ndarray, input_shape: tuple[int, ...]) -> Any:
    """The layer's linear part with ``weight`` as a matrix (Linear) or a conv operator."""
    if weight.ndim == 2:
        return weight
    return lipnorm.conv_operator(
        weight, input_shape=input_shape, stride=module.stride, padding=module.padding,
        dilation=module.dilation, groups=module.groups, layout="torch",
    )


def _input_shapes(model: Any, example: Any) -> dict[str, tuple[int, ...]]:
    """Shape of one input (no batch axis) of every normalized submodule, from one forward."""
    import torch

    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Any:
        def hook(_module: Any, args: tuple, _output: Any) -> None:
            shapes[name] = tuple(args[0].shape[1:])

        return hook

    handles = [
        module.register_forward_hook(record(name))
        for name, module in model.named_modules()
        if hasattr(module, "weight_orig")
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return shapes
