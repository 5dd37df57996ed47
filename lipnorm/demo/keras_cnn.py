"""Demo section: the digits CNN in Keras 3 with lipnorm's ``SpectralNormalization``.

The model is trained with ``model.fit`` on whichever backend Keras runs on
(``KERAS_BACKEND``), then certified with :func:`lipnorm.certify`, which reads Keras models
as well as torch ones.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lipnorm
from lipnorm.demo.digits import load_digits_split
from lipnorm.demo.report import format_seconds, new_table

__all__ = ["build_keras_model", "keras_section"]


def build_keras_model(seed: int = 0) -> Any:
    """Two operator-normalized convolutions and a normalized dense classifier, channels last.

    Parameters
    ----------
    seed : int
        Seed of Keras's initializers.

    Returns
    -------
    keras.Sequential
        Maps ``(batch, 8, 8, 1)`` images to 10 logits.
    """
    import keras

    from lipnorm.backends.keras import SpectralNormalization

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            SpectralNormalization(layers.Conv2D(16, 3, padding="same", activation="relu"),
                                  mode="operator"),
            SpectralNormalization(layers.Conv2D(32, 3, strides=2, padding="same",
                                                activation="relu"), mode="operator"),
            layers.Flatten(),
            SpectralNormalization(layers.Dense(10)),
        ],
        name="digits_cnn",
    )


def keras_section(console: Any, output_dir: Path) -> None:
    """Fit :func:`build_keras_model` on the digits, print its σ's and its certificate."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's start-up log lines
    import keras

    digits = load_digits_split()
    model = build_keras_model()
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(digits.train_images[..., None], digits.train_labels, epochs=15, batch_size=32,
              verbose=0)
    seconds = time.perf_counter() - start
    normalized = [layer for layer in model.layers if hasattr(layer, "sigmas")]
    for layer in normalized:
        layer.warm_up(100)
    _, accuracy = model.evaluate(digits.test_images[..., None], digits.test_labels, verbose=0)
    console.print(
        f"model.fit on the {keras.backend.backend()} backend, 15 epochs in "
        f"{format_seconds(seconds)}, then layer.warm_up(100) on each normalized layer: "
        f"test accuracy {accuracy:.1%}."
    )
    table = new_table("σ of each normalized layer (SpectralNormalization.sigmas())",
                      ("layer", "mode", "σ"))
    for layer in normalized:
        sigmas = ", ".join(f"{float(sigma):.6g}" for sigma in layer.sigmas())
        table.add_row(layer.name, layer.mode, sigmas)
    console.print(table)

    start = time.perf_counter()
    certificate = lipnorm.certify(model, lower=True)
    console.print(
        f"lipnorm.certify(model, lower=True) in {format_seconds(time.perf_counter() - start)}: "
        f"upper bound {certificate.upper:.6g} (certified by {certificate.method}; the product of "
        f"layer bounds gives {certificate.ladder[0].upper:.6g}), lower bound {certificate.lower:.6g}."
    )
