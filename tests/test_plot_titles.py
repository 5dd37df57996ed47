"""Plots are titled by what they show, not by the model's class name ("Sequential")."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")
from torch import nn  # noqa: E402

import lipnorm  # noqa: E402


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).eval()


def titles(figure):
    found = [axes.get_title() for axes in figure.axes]
    return found + [figure.get_suptitle()] if figure.get_suptitle() else found


def test_certificate_plot_says_what_it_shows(tmp_path):
    certificate = lipnorm.certify(mlp(), (6,), method="product")
    default = titles(certificate.plot(tmp_path / "default.png"))
    assert default == [f"Lipschitz bound of each layer\nwhole model: upper bound {certificate.upper:.4g} (product)"]
    named = titles(certificate.plot(tmp_path / "named.png", title="An MLP"))
    assert named[0].startswith("An MLP\nwhole model: upper bound")
    assert not any("Sequential" in title for title in default + named)


def test_robustness_plot_says_what_it_shows(tmp_path):
    x = np.random.default_rng(0).standard_normal((20, 6)).astype(np.float32)
    y = np.arange(20) % 3
    report = lipnorm.robustness(mlp(), x, y, eps=[0.1, 0.5], method="product")
    default = titles(report.plot(tmp_path / "default.png"))
    assert default == [f"Accuracy within an L2 ball of radius eps\n20 samples, clean accuracy {report.clean_accuracy:.1%}",
                       "Certified radii of the correct predictions"]
    named = titles(report.plot(tmp_path / "named.png", title="An MLP on noise"))
    assert named == default + ["An MLP on noise"]
    assert report.model == "Sequential"  # the report keeps the name; the plot does not use it
