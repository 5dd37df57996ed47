"""The SN-GAN critic of ``sngan_digits_torch.py`` in Keras 3, on the JAX backend.

Three convolutions normalized by their operator norm (lipnorm's ``SpectralNormalization``
with ``mode="operator"``) and a normalized dense layer, trained with ``model.fit`` to tell
the real digits from noise images (a critic's half of GAN training: the alternating
generator updates need a custom training loop, which is the same on every backend). The
whole critic is then certified with :func:`lipnorm.certify`: every normalized layer is
1-Lipschitz, so the certified bound is 1 up to the slack of the strided convolution's bound
(its norm is certified from above, not computed exactly).

Run::

    python examples/critic_digits_keras_jax.py          # 10 epochs, about 20 s on a CPU
    python examples/critic_digits_keras_jax.py --fast   # 1 epoch on 256 images (what CI runs)

The data set ships with scikit-learn; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os

os.environ["KERAS_BACKEND"] = "jax"  # before the first import of keras

import keras  # noqa: E402
import numpy as np  # noqa: E402

import lipnorm  # noqa: E402
from lipnorm.backends.keras import SpectralNormalization  # noqa: E402


def real_and_noise(n: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Digits in [-1, 1] (label 1) and as many uniform-noise images (label 0), channels last."""
    from sklearn.datasets import load_digits

    real = load_digits().images.astype(np.float32)[:n, ..., None] / 8.0 - 1.0
    noise = np.random.default_rng(seed).uniform(-1, 1, real.shape).astype(np.float32)
    images = np.concatenate([real, noise])
    labels = np.concatenate([np.ones(len(real)), np.zeros(len(noise))]).astype(np.float32)
    return images, labels


def critic(seed: int = 0) -> keras.Sequential:
    """The critic of the torch example, channels last: (batch, 8, 8, 1) images to one score."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            SpectralNormalization(layers.Conv2D(32, 3, padding="same"), mode="operator"),
            layers.LeakyReLU(0.1),
            SpectralNormalization(layers.Conv2D(64, 4, strides=2, padding="same"), mode="operator"),
            layers.LeakyReLU(0.1),
            SpectralNormalization(layers.Conv2D(64, 3, padding="same"), mode="operator"),
            layers.LeakyReLU(0.1),
            layers.Flatten(),
            SpectralNormalization(layers.Dense(1)),
        ],
        name="critic",
    )


def main(argv=None) -> lipnorm.Certificate:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="1 epoch on 256 images (for CI)")
    args = parser.parse_args(argv)
    images, labels = real_and_noise(256 if args.fast else None)
    model = critic()
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True), metrics=["accuracy"])
    history = model.fit(images, labels, epochs=1 if args.fast else 10, batch_size=64,
                        shuffle=True, verbose=0)
    for layer in model.layers:
        if isinstance(layer, SpectralNormalization):
            layer.warm_up(100)  # inference divides by a converged sigma
    print(f"backend {keras.backend.backend()}: training accuracy "
          f"{history.history['accuracy'][-1]:.3f} after {len(history.history['loss'])} epoch(s)")
    certificate = lipnorm.certify(model)
    print(certificate.table())
    return certificate


if __name__ == "__main__":
    main()
