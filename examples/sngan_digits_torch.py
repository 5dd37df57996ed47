"""An SN-GAN on scikit-learn's 8×8 digits, with lipnorm's spectral normalization in PyTorch.

The critic's convolutions are normalized in operator mode (``mode="operator"``): each is
divided by the norm of the convolution on its input, so each is 1-Lipschitz. The same GAN
is then trained with torch's own ``spectral_norm``, which divides by σ of the reshaped
kernel, and the script prints the certified operator norm of every convolution of both
critics: lipnorm's are 1, torch's are not.

Run::

    python examples/sngan_digits_torch.py             # 1500 steps, about a minute on a CPU
    python examples/sngan_digits_torch.py --fast      # 20 steps, a few seconds (what CI runs)
    python examples/sngan_digits_torch.py --plot conv_norms.png

The data set ships with scikit-learn; nothing is downloaded.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

import lipnorm
from lipnorm.backends.torch import spectral_norm as lipnorm_spectral_norm
from lipnorm.backends.torch import warm_up

LATENT = 16


def digits() -> torch.Tensor:
    """The 1797 digits of ``sklearn.datasets.load_digits`` in [-1, 1], shape (n, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32) / 8.0 - 1.0
    return torch.from_numpy(images).unsqueeze(1)


def operator_mode(layer: nn.Module) -> nn.Module:
    """lipnorm's spectral normalization: convolutions by their operator norm."""
    mode = "operator" if isinstance(layer, nn.Conv2d) else "matrix"
    return lipnorm_spectral_norm(layer, mode=mode)


def torch_sn(layer: nn.Module) -> nn.Module:
    """torch's spectral normalization: every layer by σ of its reshaped weight."""
    return nn.utils.parametrizations.spectral_norm(layer)


def critic(normalize) -> nn.Sequential:
    """The critic: three convolutions and a linear layer, each wrapped by ``normalize``."""
    return nn.Sequential(
        normalize(nn.Conv2d(1, 32, 3, padding=1)), nn.LeakyReLU(0.1),
        normalize(nn.Conv2d(32, 64, 4, stride=2, padding=1)), nn.LeakyReLU(0.1),
        normalize(nn.Conv2d(64, 64, 3, padding=1)), nn.LeakyReLU(0.1),
        nn.Flatten(), normalize(nn.Linear(64 * 4 * 4, 1)),
    )


def generator() -> nn.Sequential:
    """Latent vectors of size ``LATENT`` to 8×8 images in [-1, 1]."""
    return nn.Sequential(
        nn.Linear(LATENT, 64 * 4 * 4), nn.ReLU(), nn.Unflatten(1, (64, 4, 4)),
        nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 1, 3, padding=1), nn.Tanh(),
    )


def train(normalize, steps: int, seed: int = 0, batch_size: int = 64) -> nn.Sequential:
    """Train a GAN with the hinge loss of the SN-GAN paper; return its critic, in eval mode.

    Parameters
    ----------
    normalize : callable
        Wraps each critic layer: :func:`operator_mode` or :func:`torch_sn`.
    steps : int
        Training steps (one critic and one generator update each).
    seed : int
        Seed of the initial weights, the batches and the latent vectors.
    batch_size : int

    Returns
    -------
    torch.nn.Sequential
        The critic, after ``warm_up`` where it is lipnorm's.
    """
    torch.manual_seed(seed)
    data = digits()
    d, g = critic(normalize), generator()
    d_opt = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    g_opt = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    for _ in range(steps):
        real = data[torch.randint(len(data), (batch_size,))]
        fake = g(torch.randn(batch_size, LATENT))
        d_loss = torch.relu(1 - d(real)).mean() + torch.relu(1 + d(fake.detach())).mean()
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        g_loss = -d(g(torch.randn(batch_size, LATENT))).mean()
        g_opt.zero_grad()
        g_loss.backward()
        g_opt.step()
    if normalize is operator_mode:
        warm_up(d)  # inference divides by a converged sigma
    return d.eval()


def conv_norms(model: nn.Sequential) -> dict[str, tuple[float, float]]:
    """Certified ``(lower, upper)`` operator norm of each normalized convolution of ``model``.

    The weight is the one the layer applies (``layer.weight``, normalized); the input size
    of each convolution is recorded from one forward pass of an 8×8 image.
    """
    shapes = {}
    hooks = [
        layer.register_forward_hook(
            lambda layer, args, _, name=name: shapes.__setitem__(name, tuple(args[0].shape[1:]))
        )
        for name, layer in model.named_modules() if isinstance(layer, nn.Conv2d)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 1, 8, 8))
    for hook in hooks:
        hook.remove()
    norms = {}
    for name, input_shape in shapes.items():
        layer = model.get_submodule(name)
        with torch.no_grad():
            weight = layer.weight.double()
        operator = lipnorm.conv_operator(
            weight, input_shape, stride=layer.stride, padding=layer.padding,
        )
        interval = lipnorm.sigma_bounds(operator)
        norms[name] = (interval.lower, interval.upper)
    return norms


def plot(norms: dict[str, dict[str, tuple[float, float]]], path: str) -> None:
    """Bar chart of each convolution's certified norm, one bar per normalization."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(next(iter(norms.values())))
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for offset, (label, values) in zip((-0.2, 0.2), norms.items()):
        ax.bar(x + offset, [values[name][1] for name in layers], width=0.4, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(x, [f"conv {name}" for name in layers])
    ax.set_ylabel("certified operator norm")
    ax.set_title("SN-GAN critic on digits: true norm of each convolution")
    ax.set_ylim(0, 1.3 * max(hi for values in norms.values() for _, hi in values.values()))
    ax.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict[str, dict[str, tuple[float, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="20 steps instead of 1500 (for CI)")
    parser.add_argument("--plot", metavar="PNG", help="write a bar chart of the norms here")
    args = parser.parse_args(argv)
    steps = 20 if args.fast else 1500
    norms = {
        "lipnorm, operator mode": conv_norms(train(operator_mode, steps)),
        "torch spectral_norm": conv_norms(train(torch_sn, steps)),
    }
    print(f"Certified operator norm of each critic convolution after {steps} steps:")
    print(f"{'layer':<7}" + "".join(f"{label:>26}" for label in norms))
    for name in norms["lipnorm, operator mode"]:
        cells = "".join(f"{f'[{lo:.4f}, {hi:.4f}]':>26}" for lo, hi in (v[name] for v in norms.values()))
        print(f"{name:<7}{cells}")
    if args.plot:
        plot(norms, args.plot)
        print(f"plot written to {args.plot}")
    return norms


if __name__ == "__main__":
    main()
