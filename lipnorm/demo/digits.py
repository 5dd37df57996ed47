"""The demo's data set: scikit-learn's bundled 8×8 handwritten digits (no download)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Digits", "load_digits_split"]


@dataclass(frozen=True)
class Digits:
    """Train and test images in [0, 1], shape ``(n, 8, 8)`` float32, with int64 labels 0..9."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> Digits:
    """The 1797 digits of ``sklearn.datasets.load_digits``, shuffled and split.

    Parameters
    ----------
    test_fraction : float
        Share of the images held out for testing.
    seed : int
        Seed of the shuffle.

    Returns
    -------
    Digits
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)
    labels = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    test, train = order[:n_test], order[n_test:]
    return Digits(images[train], labels[train], images[test], labels[test])
