"""Demo section: a Lipschitz CNN trained on the digits for certified robustness.

Two operator-normalized convolutions (each ≈ 1-Lipschitz) feed a plain linear classifier,
trained with :class:`lipnorm.robustness.torch_loss.MarginLoss`, which asks every logit
difference f_y − f_j to exceed eps·‖w_y − w_j‖. Then :func:`lipnorm.robustness` certifies
the radii with the pairwise bounds and attacks every test digit with foolbox's L2 PGD, so
the table shows certified ≤ empirical ≤ clean at each eps.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import lipnorm
from lipnorm.demo.digits import load_digits_split
from lipnorm.demo.report import format_seconds, new_table

__all__ = ["ROBUSTNESS_PLOT", "build_model", "robust_section", "train_for_margins"]

#: File name of the accuracy-against-eps plot, written into the demo's output directory.
ROBUSTNESS_PLOT = "lipnorm-demo-robustness.png"
#: The radius trained for, and the ones reported (L2, inputs in [0, 1], 64 pixels).
TRAIN_EPS = 0.5
EPS = (0.1, 0.25, 0.5, 1.0)
EPOCHS = 30


def build_model(seed: int = 0) -> Any:
    """Operator-normalized convolutions and a free linear classifier (the torch demo's CNN).

    Parameters
    ----------
    seed : int
        Seed of torch's generator for the initial weights.

    Returns
    -------
    torch.nn.Sequential
        Maps ``(batch, 1, 8, 8)`` images to 10 logits.
    """
    from lipnorm.demo.torch_cnn import build_model as normalized_cnn

    return normalized_cnn(seed, normalized_classifier=False)


def train_for_margins(model: Any, digits, *, epochs: int = EPOCHS, eps: float = TRAIN_EPS) -> float:
    """Train with the margin loss for radius ``eps``; warm up the norms; return test accuracy."""
    from lipnorm.backends.torch import warm_up
    from lipnorm.demo.torch_cnn import train
    from lipnorm.robustness.torch_loss import MarginLoss

    accuracy = train(model, digits, epochs=epochs, loss=MarginLoss(eps, model[-1], temperature=0.1))
    warm_up(model, iterations=100)
    return accuracy


def robust_section(console: Any, output_dir: Path) -> None:
    """Train :func:`build_model` for margins, certify and attack it, print the table, plot."""
    digits = load_digits_split()
    model = build_model()
    start = time.perf_counter()
    train_for_margins(model, digits)
    console.print(f"Trained with MarginLoss(eps={TRAIN_EPS}) for {EPOCHS} epochs in "
                  f"{format_seconds(time.perf_counter() - start)}.")
    attack = importlib.util.find_spec("foolbox") is not None
    start = time.perf_counter()
    report = lipnorm.robustness(model, digits.test_images[:, None], digits.test_labels, eps=EPS,
                                attack=attack, domain=(0.0, 1.0))
    console.print(f"lipnorm.robustness(model, x, y, eps={list(EPS)}, attack={attack}) on "
                  f"{report.samples} test digits in {format_seconds(time.perf_counter() - start)}:")
    table = new_table(f"Accuracy within an L2 ball of radius eps (clean accuracy {report.clean_accuracy:.1%})",
                      ("eps", "certified, pairwise L_yj", "certified, global L", "under attack"))
    for index, eps in enumerate(report.eps):
        table.add_row(f"{eps:g}", f"{report.certified_accuracy[index]:.1%}",
                      f"{report.global_certified_accuracy[index]:.1%}",
                      f"{report.empirical_accuracy[index]:.1%}" if attack else "(pip install foolbox)")
    console.print(table)
    console.print(f"Pairwise bounds of f_y − f_j certified by {report.method} (mean {report.mean_pair_bound:.3g}); "
                  f"the global form margin / (√2 L) uses L = {report.global_upper:.3g}. Empirical: "
                  f"{report.attack or 'not run'}, inputs kept in [0, 1]; the radii do not use that box.")
    plot_path = output_dir / ROBUSTNESS_PLOT
    report.plot(plot_path, title="Lipschitz CNN trained for margins, on the digits' test set")
    console.print(f"Accuracy against eps and the radii plotted to {plot_path}.")
