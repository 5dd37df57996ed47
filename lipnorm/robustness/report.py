"""``robustness``: clean, certified and (optionally) empirical accuracy at several eps.

The report holds the figures and the radii, and prints them as a table, writes JSON, and
plots accuracy against eps beside a histogram of the radii.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lipnorm.robustness.bounds import LogitBounds
from lipnorm.robustness.radii import certified_predictions, check_eps

__all__ = ["RobustnessReport", "robustness"]

DEFAULT_EPS = (0.1, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class RobustnessReport:
    """Accuracy of a classifier on a labelled set: clean, certified, under attack.

    Attributes
    ----------
    model : str
        The model's name or type.
    samples : int
    eps : tuple of float
        L2 radii.
    clean_accuracy : float
    certified_accuracy : tuple of float
        Per eps, with the pairwise bounds.
    global_certified_accuracy : tuple of float
        Per eps, with the global-L form margin / (√2 L), for comparison.
    empirical_accuracy : tuple of float or None
        Per eps, accuracy under ``attack`` (None without ``attack=True``).
    attack : str or None
    radii : ndarray, shape (samples,)
        Certified radius per sample (0 where misclassified).
    global_radii : ndarray, shape (samples,)
    method : str
        The certificate method the pairwise bounds come from.
    global_upper : float
        Certified bound of the whole output's Lipschitz constant.
    mean_pair_bound : float
        Mean of the pairwise bounds L_yj over pairs y < j.
    domain : (float, float) or None
        The input domain the attack stayed in; the radii never use it.
    seconds : dict of str to float
        Time for the bounds, the radii and the attack.
    """

    model: str
    samples: int
    eps: tuple[float, ...]
    clean_accuracy: float
    certified_accuracy: tuple[float, ...]
    global_certified_accuracy: tuple[float, ...]
    empirical_accuracy: tuple[float, ...] | None
    attack: str | None
    radii: np.ndarray = field(repr=False)
    global_radii: np.ndarray = field(repr=False)
    method: str
    global_upper: float
    mean_pair_bound: float
    domain: tuple[float, float] | None
    seconds: dict

    def table(self) -> str:
        """The figures as aligned plain text, one line per eps."""
        header = ["eps", "certified", "certified (global L)"] + (["empirical"] if self.empirical_accuracy else [])
        lines = [header]
        for index, eps in enumerate(self.eps):
            line = [f"{eps:g}", f"{self.certified_accuracy[index]:.1%}",
                    f"{self.global_certified_accuracy[index]:.1%}"]
            if self.empirical_accuracy:
                line.append(f"{self.empirical_accuracy[index]:.1%}")
            lines.append(line)
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = [f"{self.model} on {self.samples} samples: clean accuracy {self.clean_accuracy:.1%}"]
        text += ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines]
        correct = self.radii[self.radii > 0]
        text.append(f"bounds: pairwise L_yj by {self.method} (mean {self.mean_pair_bound:.4g}), "
                    f"global L {self.global_upper:.4g}")
        if correct.size:
            text.append(f"radii of certified samples: median {np.median(correct):.4g}, max {np.max(correct):.4g}")
        if self.attack:
            text.append(f"empirical: {self.attack}" + (f" in the domain {list(self.domain)}" if self.domain else ""))
        if self.domain and not self.attack:
            text.append(f"input domain {list(self.domain)} (not used by the radii)")
        text.append("time: " + ", ".join(f"{name} {value:.2f} s" for name, value in self.seconds.items()))
        return "\n".join(text)

    def to_dict(self) -> dict:
        """The report as JSON-compatible data (radii as lists)."""
        return {
            "model": self.model, "samples": self.samples, "eps": list(self.eps),
            "clean_accuracy": self.clean_accuracy, "certified_accuracy": list(self.certified_accuracy),
            "global_certified_accuracy": list(self.global_certified_accuracy),
            "empirical_accuracy": None if self.empirical_accuracy is None else list(self.empirical_accuracy),
            "attack": self.attack, "method": self.method, "global_upper": self.global_upper,
            "mean_pair_bound": self.mean_pair_bound,
            "domain": None if self.domain is None else list(self.domain), "seconds": dict(self.seconds),
            "radii": self.radii.tolist(), "global_radii": self.global_radii.tolist(),
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialize to JSON; write it to ``path`` when given. Returns the text."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def plot(self, path: str | Path | None = None, *, title: str | None = None):
        """Accuracy against eps (certified, global-L, empirical) and a histogram of radii.

        Parameters
        ----------
        path : str or Path, optional
            Where to save the figure (format from the suffix).
        title : str, optional
            What was evaluated (a model and data set), written above both panels.

        Returns
        -------
        matplotlib.figure.Figure
        """
        from lipnorm._plotting import pyplot

        plt = pyplot(path, "RobustnessReport.plot")
        figure, (curves, histogram) = plt.subplots(1, 2, figsize=(10, 4))
        curves.plot(self.eps, self.certified_accuracy, marker="o", label="certified (pairwise L_yj)")
        curves.plot(self.eps, self.global_certified_accuracy, marker=".", linestyle="--",
                    label="certified (global L)")
        if self.empirical_accuracy:
            curves.plot(self.eps, self.empirical_accuracy, marker="s", label=f"empirical ({self.attack})")
        curves.axhline(self.clean_accuracy, color="gray", linestyle=":", label="clean")
        curves.set_xlabel("eps (L2)")
        curves.set_ylabel("accuracy")
        curves.set_ylim(0, 1.02)
        curves.legend(fontsize=8)
        curves.set_title(f"Accuracy within an L2 ball of radius eps\n"
                         f"{self.samples} samples, clean accuracy {self.clean_accuracy:.1%}", fontsize=10)
        correct = self.radii[self.radii > 0]
        histogram.hist(correct, bins=30, color="tab:blue", alpha=0.8, label="pairwise")
        histogram.hist(self.global_radii[self.global_radii > 0], bins=30, color="tab:orange", alpha=0.5,
                       label="global L")
        histogram.set_xlabel("certified radius (L2)")
        histogram.set_ylabel("samples")
        histogram.legend(fontsize=8)
        histogram.set_title("Certified radii of the correct predictions", fontsize=10)
        if title:
            figure.suptitle(title)
        figure.tight_layout()
        if path is not None:
            figure.savefig(path, dpi=120)
        return figure


def robustness(model, x, y, eps=DEFAULT_EPS, *, attack: bool = False, domain=None,
               attack_steps: int = 100, seed: int = 0, bounds: LogitBounds | None = None,
               method: str = "auto", time_budget: float = 10.0, rules=None, batch_size: int = 256,
               progress=None) -> RobustnessReport:
    """Clean, certified and empirical accuracy of a classifier at several L2 radii.

    Parameters
    ----------
    model : torch.nn.Module, keras.Model, onnx.ModelProto or path to a .onnx file
        A classifier in inference mode.
    x : array_like, shape (N, *input_shape)
    y : array_like of int, shape (N,)
    eps : sequence of float
        L2 radii, each >= 0.
    attack : bool
        Also attack every sample (:func:`lipnorm.robustness.attack.attack_success`, foolbox)
        and report the empirical robust accuracy.
    domain : (float, float), optional
        The inputs' valid range (e.g. ``(0, 1)``): stated in the report and used to keep the
        attack's inputs valid; the certified radii never use it.
    attack_steps : int
    seed : int
        Seed of the attack's random starts.
    bounds, method, time_budget, rules, batch_size, progress
        As for :func:`lipnorm.certified_radius`.

    Returns
    -------
    RobustnessReport

    Raises
    ------
    NotCertifiableError, ValueError, TypeError
        As :func:`lipnorm.certified_radius`; ValueError also for a bad ``domain``.
    """
    eps_values = check_eps(eps).reshape(-1)
    if y is None:
        raise ValueError("robustness needs the labels y")
    if domain is not None:
        domain = tuple(float(v) for v in domain)
        if len(domain) != 2 or not domain[0] < domain[1]:
            raise ValueError(f"domain must be (low, high) with low < high, got {domain!r}")
    if attack:
        from lipnorm.robustness.attack import check_attackable

        check_attackable(model)
    start = time.perf_counter()
    found = certified_predictions(model, x, y, bounds=bounds, method=method, time_budget=time_budget,
                                  rules=rules, batch_size=batch_size, progress=progress)
    seconds = {"bounds and radii": time.perf_counter() - start}
    global_radii = found.radii_with(found.bounds.global_pairwise())
    empirical, attack_name = None, None
    if attack:
        from lipnorm.certify.formats import model_format
        from lipnorm.robustness.attack import ATTACKS, attack_success

        start = time.perf_counter()
        success = attack_success(model, found.inputs, found.labels, eps_values, domain=domain,
                                 steps=attack_steps, seed=seed)
        empirical = tuple(float(v) for v in 1.0 - success.mean(axis=0))
        attack_name = f"{ATTACKS[model_format(model)]}, {attack_steps} steps"
        seconds["attack"] = time.perf_counter() - start
    pairs = found.bounds.pairwise[np.triu_indices(found.bounds.classes, k=1)]
    return RobustnessReport(
        model=_model_name(model), samples=len(found.radii), eps=tuple(float(e) for e in eps_values),
        clean_accuracy=float(np.mean(found.predicted == found.labels)),
        certified_accuracy=tuple(float(v) for v in found.accuracy(eps_values)),
        global_certified_accuracy=tuple(float(np.mean(global_radii > e)) for e in eps_values),
        empirical_accuracy=empirical, attack=attack_name, radii=found.radii, global_radii=global_radii,
        method=found.bounds.pairwise_certificate.method, global_upper=found.bounds.global_upper,
        mean_pair_bound=float(np.mean(pairs)), domain=domain, seconds=seconds,
    )


def _model_name(model) -> str:
    if isinstance(model, (str, Path)):
        return Path(model).name
    return getattr(model, "name", None) or type(model).__name__
