"""The ``lipnorm robustness`` command: certified (and empirical) accuracy of a model file.

``lipnorm robustness MODEL --data SAMPLES.npz [--eps 0.1,0.25,0.5] [--attack] [--json] [--plot [PNG]]``

The model file is loaded as by ``lipnorm certify`` (:func:`lipnorm.certify.cli.load_model`);
the ``.npz`` file holds the inputs ``x`` (in the model's layout) and integer labels ``y``
and is read with ``allow_pickle=False``, so nothing in it runs. Exit status: 0 done; 1 a
file could not be read or the data do not fit the model; 2 the model cannot be certified.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from lipnorm.certify.cli import ModelFileError, load_model
from lipnorm.certify.errors import NotCertifiableError
from lipnorm.certify.methods import METHODS

__all__ = ["DataFileError", "add_arguments", "load_samples", "run_robustness"]


class DataFileError(ValueError):
    """A samples file that cannot be read, or lacks ``x`` or ``y``."""


def load_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``y`` from an ``.npz`` file, read without unpickling.

    Raises
    ------
    DataFileError
        For a missing or unreadable file, object arrays, or a missing ``x`` or ``y``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"samples file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in ("x", "y") if key not in data.files]
            if missing:
                raise DataFileError(f"{path} has arrays {data.files}; it needs 'x' (inputs) and 'y' "
                                    f"(integer labels), missing {missing}")
            return data["x"], data["y"]
    except DataFileError:
        raise
    except Exception as error:
        raise DataFileError(f"cannot read {path} as .npz without pickle ({type(error).__name__}: "
                            f"{str(error).splitlines()[0] if str(error) else ''})") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``robustness`` subcommand's arguments to ``parser``."""
    parser.add_argument("model", help="model file: .onnx, .keras or .pt2 (torch.export)")
    parser.add_argument("--data", required=True, type=Path,
                        help=".npz file with inputs x (model layout) and integer labels y")
    parser.add_argument("--eps", type=_floats, default=(0.1, 0.25, 0.5, 1.0),
                        help="L2 radii separated by commas (default 0.1,0.25,0.5,1)")
    parser.add_argument("--attack", action="store_true",
                        help="also report accuracy under foolbox's L2 attack")
    parser.add_argument("--domain", type=_floats,
                        help="LOW,HIGH: the inputs' valid range, kept by the attack (the radii never use it)")
    parser.add_argument("--method", choices=METHODS, default="auto",
                        help="certificate method for the bounds (default auto)")
    parser.add_argument("--time-budget", type=float, default=10.0,
                        help="seconds the tighter certificate methods may use (default 10)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--plot", nargs="?", const=Path("robustness.png"), type=Path, metavar="PNG",
                        help="plot accuracy against eps and the radii (default file robustness.png)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow pickled torch models (loading them runs their code)")


def run_robustness(args: argparse.Namespace) -> int:
    """Run ``lipnorm robustness`` with parsed ``args``; returns the exit status."""
    from lipnorm.robustness.report import robustness

    try:
        model = load_model(args.model, trust_pickle=args.trust_pickle)
        x, y = load_samples(args.data)
    except (ModelFileError, DataFileError, FileNotFoundError) as error:
        print(f"lipnorm: error: {error}", file=sys.stderr)
        return 1
    if args.domain is not None and len(args.domain) != 2:
        print(f"lipnorm: error: --domain takes LOW,HIGH, got {args.domain}", file=sys.stderr)
        return 1
    try:
        if args.json:
            report = robustness(model, x, y, eps=args.eps, attack=args.attack, domain=args.domain,
                                method=args.method, time_budget=args.time_budget)
        else:
            report = _with_progress(robustness, model, x, y, eps=args.eps, attack=args.attack,
                                    domain=args.domain, method=args.method, time_budget=args.time_budget)
    except NotCertifiableError as error:
        print(f"lipnorm: not certifiable: {error}", file=sys.stderr)
        return 2
    except (TypeError, ValueError, ImportError) as error:
        print(f"lipnorm: error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(report.to_json())
    else:
        print(report.table())
    if args.plot:
        report.plot(args.plot)
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0


def _with_progress(function, *args, **kwargs):
    """Call ``function`` with a rich progress bar over the evaluated samples."""
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("certifying", total=None)
        return function(*args, progress=lambda done, total: bar.update(task, completed=done, total=total),
                        **kwargs)


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}")
    return values
