"""The ``lipnorm certify`` command: load a model file safely, certify it, print a table.

:mod:`lipnorm.cli` wires it as the ``certify`` subcommand with :func:`add_arguments` and
:func:`run_certify`.

Model files: ``.onnx`` (checked by ``onnx.checker``), ``.keras`` (loaded with Keras's
``safe_mode=True``, which refuses serialized Python code), ``.pt2`` (a ``torch.export``
program: a graph, no pickled code). A pickled torch model (``.pt``, ``.pth``, ``.pkl``,
written by ``torch.save(model)``) can run arbitrary code when loaded, so it is refused
unless ``--trust-pickle`` is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lipnorm.certify.errors import NotCertifiableError
from lipnorm.certify.methods import METHODS

__all__ = ["ModelFileError", "add_arguments", "load_model", "run_certify"]

_PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".bin"}


class ModelFileError(ValueError):
    """A model file that cannot be loaded (malformed, truncated, unknown or unsafe)."""


def load_model(path: str | Path, *, trust_pickle: bool = False):
    """Load a model file for :func:`lipnorm.certify.certify`.

    Parameters
    ----------
    path : str or Path
        ``.onnx``, ``.keras``, ``.pt2``; pickled torch files only with ``trust_pickle``.
    trust_pickle : bool
        Allow ``torch.load(..., weights_only=False)`` on a pickled model: only for files
        from a source you trust, since unpickling runs code.

    Returns
    -------
    onnx.ModelProto, keras.Model or torch.nn.Module

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ModelFileError
        For an unknown suffix, a refused pickle, or a file the framework cannot read
        (the message names the file and the framework's complaint, without a traceback).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix in _PICKLE_SUFFIXES and not trust_pickle:
        raise ModelFileError(
            f"{path} is a pickled torch model: loading it can run arbitrary code. Export it "
            "with torch.export.save(torch.export.export(model, (example,)), 'model.pt2') or "
            "torch.onnx.export, or pass --trust-pickle if you trust its source"
        )
    try:
        if suffix == ".onnx":
            from lipnorm.certify.onnx_frontend import load_onnx

            return load_onnx(path)
        if suffix == ".keras":
            import keras

            return keras.saving.load_model(path, compile=False, safe_mode=True)
        if suffix == ".pt2":
            import torch

            return torch.export.load(str(path)).module()
        if suffix in _PICKLE_SUFFIXES:
            import torch

            model = torch.load(str(path), weights_only=False, map_location="cpu")
            return model.eval()
    except (ModelFileError, FileNotFoundError):
        raise
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ModelFileError(f"cannot read {path} ({type(error).__name__}: {message}); is the "
                             "file complete and in the format its suffix says?") from None
    raise ModelFileError(f"unknown model file type {suffix!r} for {path}; expected .onnx, "
                         ".keras or .pt2 (or a pickled .pt with --trust-pickle)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``certify`` subcommand's arguments to ``parser``."""
    parser.add_argument("model", help="model file: .onnx, .keras or .pt2 (torch.export)")
    parser.add_argument("--input-shape", type=_shape,
                        help="one input's shape without batch, e.g. 3,224,224 (channels first "
                             "for torch and ONNX)")
    parser.add_argument("--method", choices=METHODS, default="auto",
                        help="how to bound the network (default auto: the tightest certified "
                             "bound of the ladder within --time-budget)")
    parser.add_argument("--time-budget", type=_seconds, default=10.0,
                        help="seconds the tighter methods may use (default 10)")
    parser.add_argument("--lower", action="store_true",
                        help="also search a lower bound (torch and Keras models)")
    parser.add_argument("--json", type=Path, help="write the certificate as JSON here")
    parser.add_argument("--plot", type=Path, help="write a bar chart of per-layer bounds here")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow pickled torch models (loading them runs their code)")


def run_certify(args: argparse.Namespace, *, console=None) -> int:
    """Run ``lipnorm certify`` with parsed ``args``; returns the exit status.

    0: certified; 1: the model file could not be loaded; 2: a layer cannot be certified.
    """
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from lipnorm.certify.api import certify

    console = console or Console()
    try:
        model = load_model(args.model, trust_pickle=args.trust_pickle)
    except (ModelFileError, FileNotFoundError) as error:
        console.print(f"[red]error:[/red] {error}")
        return 1
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("certifying", total=None)

        def progress(done, total, name):
            bar.update(task, completed=done, total=total, description=f"bounding {name}")

        try:
            certificate = certify(model, args.input_shape, method=args.method,
                                  time_budget=args.time_budget,
                                  lower=True if args.lower else None, progress=progress)
        except NotCertifiableError as error:
            console.print(f"[red]not certifiable:[/red] {error}")
            return 2
        except (TypeError, ValueError) as error:
            console.print(f"[red]error:[/red] {error}")
            return 1
    table = Table(title=f"{certificate.model} on inputs {certificate.input_shape}")
    for column in ("layer", "type", "bound", "cumulative", "method", "time [s]"):
        table.add_column(column, justify="right" if column in {"bound", "cumulative", "time [s]"} else "left")
    for row in certificate.layers:
        method = row.method + (f" = {row.composition}" if row.composition else "")
        if row.merged:
            method += f" [merged {', '.join(row.merged)}]"
        table.add_row(row.name, row.layer_type, f"{row.bound:.6g}",
                      "" if row.cumulative is None else f"{row.cumulative:.6g}", method,
                      f"{row.seconds:.3f}")
    console.print(table)
    ladder = Table(title="the ladder of methods (every bound shown is certified)")
    for column in ("method", "bound", "upper/lower", "time [s]", "note"):
        ladder.add_column(column, justify="right" if column in {"bound", "upper/lower", "time [s]"} else "left")
    for run in certificate.ladder:
        ratio = "" if run.upper is None or not certificate.lower else f"{run.upper / certificate.lower:.4g}"
        note = (run.note + (" (reported)" if run.method == certificate.method and run.upper is not None else "")).strip()
        ladder.add_row(run.method, "—" if run.upper is None else f"{run.upper:.6g}", ratio,
                       f"{run.seconds:.2f}", note)
    console.print(ladder)
    console.print(f"certified upper bound: [bold]{certificate.upper:.6g}[/bold] ({certificate.method})")
    if certificate.lower is not None:
        console.print(f"lower bound (search): {certificate.lower:.6g}"
                      + (f"   upper/lower = {certificate.upper / certificate.lower:.4g}" if certificate.lower > 0 else ""))
    if args.json:
        certificate.to_json(args.json)
    if args.plot:
        certificate.plot(args.plot)
    return 0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"time budget must be a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"time budget must be a positive number of seconds, got {text!r}")
    return value


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape must be integers separated by commas, got {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"input shape must be positive integers, got {text!r}")
    return shape
