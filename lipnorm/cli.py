"""The ``lipnorm`` command.

``lipnorm sigma FILE [--key NAME] [--method METHOD] [--rtol RTOL] [--json]``
    σ_max, its certified interval, the method and the time for the tensors of a weight file
    (``.npy``, ``.npz``, ``.pt``/``.pth``, ``.safetensors``). Without ``--key`` every 2-D
    tensor gets a row. The file is read as data only (see :mod:`lipnorm.weights_io`).
``lipnorm certify MODEL [--input-shape C,H,W] [--lower] [--json OUT] [--plot OUT]``
    A certified upper bound on a network's Lipschitz constant (``.onnx``, ``.keras``,
    ``.pt2``), layer by layer; see :mod:`lipnorm.certify.cli`.
``lipnorm robustness MODEL --data SAMPLES.npz [--eps 0.1,0.25,0.5] [--attack] [--json] [--plot]``
    Certified and empirical accuracy at L2 radii; see :mod:`lipnorm.robustness.cli`.
``lipnorm demo``
    The demonstration: estimates and certified bounds next to the SVD.

Exit codes of ``sigma``: 0 on success, 1 if some tensor could not be measured (its row says
why), 2 for a bad command line or a file that cannot be read. ``certify``: 0 certified, 1 the
model file could not be loaded, 2 a layer cannot be certified.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import lipnorm
from lipnorm.certify.cli import add_arguments, run_certify
from lipnorm.robustness.cli import add_arguments as add_robustness_arguments
from lipnorm.robustness.cli import run_robustness
from lipnorm.weights_io import SUFFIXES, WeightFileError, load_weights

__all__ = ["main"]

METHODS = ("auto", "power", "lanczos", "svd")

EXIT_OK = 0
EXIT_TENSOR_FAILED = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """A user error that ends the command with a one-line message and exit code 2."""


@dataclass(frozen=True)
class SigmaRow:
    """One measured tensor: what ``lipnorm sigma`` prints per row (and writes with --json)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    sigma: float | None = None
    lower: float | None = None
    upper: float | None = None
    method: str | None = None
    bounds_method: str | None = None
    converged: bool | None = None
    sigma_seconds: float | None = None
    bounds_seconds: float | None = None
    error: str | None = None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lipnorm`` command line; return its exit code.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; ``sys.argv[1:]`` when omitted.

    Returns
    -------
    int
        0 on success, 1 if a tensor could not be measured, 2 for a bad command line or file.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except CommandError as exc:
        print(f"lipnorm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lipnorm", description="The spectral norm of neural-network weights."
    )
    parser.add_argument("--version", action="version", version=f"lipnorm {lipnorm.__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    sigma = commands.add_parser(
        "sigma",
        help="sigma_max and its certified interval for the tensors of a weight file",
        description=(
            "Print sigma_max (the largest singular value), a certified interval "
            "lower <= sigma_max <= upper, the method and the time for tensors of a weight "
            f"file ({', '.join(SUFFIXES)}). The file is read as data: nothing in it is run."
        ),
    )
    sigma.add_argument("file", metavar="FILE", help="weight file")
    sigma.add_argument(
        "--key", metavar="NAME",
        help="the tensor to measure (1-D or 2-D); default: every 2-D tensor in the file",
    )
    sigma.add_argument("--method", choices=METHODS, default="auto", help="estimation method")
    sigma.add_argument(
        "--rtol", type=float, default=1e-6, help="relative tolerance of the estimate (default 1e-6)"
    )
    sigma.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sigma.set_defaults(run=_run_sigma)

    certify = commands.add_parser(
        "certify",
        help="certified upper bound on a network's Lipschitz constant",
        description=(
            "Certify an upper bound on the Lipschitz constant (l2) of a model file, layer by "
            "layer. Pickled torch models are refused unless --trust-pickle is given."
        ),
    )
    add_arguments(certify)
    certify.set_defaults(run=run_certify)

    robustness = commands.add_parser(
        "robustness",
        help="certified L2 radii and accuracy of a classifier on labelled samples",
        description=(
            "Certified accuracy at L2 radii eps of a classifier file on the samples of an .npz "
            "file (x, y; read without pickle), with --attack the accuracy under an L2 attack."
        ),
    )
    add_robustness_arguments(robustness)
    robustness.set_defaults(run=run_robustness)

    demo = commands.add_parser(
        "demo", help="estimates next to the SVD; train, normalize and certify a small CNN"
    )
    demo.add_argument(
        "--output-dir", metavar="DIR", default=".",
        help="existing directory for the demo's plot (default: the current directory)",
    )
    demo.set_defaults(run=_run_demo)
    return parser


def _run_sigma(args: argparse.Namespace) -> int:
    if not args.rtol > 0:
        raise CommandError(f"--rtol must be positive, got {args.rtol}")
    try:
        tensors = load_weights(args.file, key=args.key)
    except WeightFileError as exc:
        raise CommandError(str(exc)) from None
    if args.key is not None:
        (tensor,) = tensors.values()
        if len(tensor.shape) not in (1, 2):
            raise CommandError(
                f"{args.file}: tensor {args.key!r} has shape {tuple(tensor.shape)}; "
                "`lipnorm sigma` takes 1-D and 2-D tensors"
            )
    else:
        tensors = {name: t for name, t in tensors.items() if len(t.shape) == 2}
        if not tensors:
            raise CommandError(f"{args.file}: no 2-D tensors; pick a 1-D one with --key")
    rows = [_measure(name, tensor, args.method, args.rtol) for name, tensor in tensors.items()]
    if args.json:
        print(json.dumps([asdict(row) for row in rows], indent=2))
    else:
        _print_table(args.file, rows)
    return EXIT_TENSOR_FAILED if any(row.error for row in rows) else EXIT_OK


def _measure(name: str, tensor: Any, method: str, rtol: float) -> SigmaRow:
    """Estimate and bound σ of one tensor; a tensor lipnorm rejects gets a row with the error."""
    shape = tuple(int(n) for n in tensor.shape)
    dtype = str(tensor.dtype).removeprefix("torch.")
    try:
        with warnings.catch_warnings():
            # Non-convergence is reported in the row through state.converged.
            warnings.simplefilter("ignore", lipnorm.ConvergenceWarning)
            start = time.perf_counter()
            sigma, state = lipnorm.estimate_sigma(tensor, method=method, rtol=rtol, return_state=True)
            sigma = float(sigma)
            sigma_seconds = time.perf_counter() - start
        start = time.perf_counter()
        interval = lipnorm.sigma_bounds(tensor)
        bounds_seconds = time.perf_counter() - start
    except (ValueError, TypeError) as exc:
        return SigmaRow(name, shape, dtype, error=str(exc))
    return SigmaRow(
        name, shape, dtype, sigma=sigma, lower=interval.lower, upper=interval.upper,
        method=state.method, bounds_method=interval.method, converged=bool(state.converged),
        sigma_seconds=sigma_seconds, bounds_seconds=bounds_seconds,
    )


def _print_table(file: str, rows: list[SigmaRow]) -> None:
    console, table_type = _rich()
    table = table_type(title=f"sigma_max of the tensors in {file}")
    for column in ("tensor", "shape", "dtype", "sigma", "certified interval", "method", "time"):
        table.add_column(column, justify="right" if column in ("sigma", "time") else "left")
    for row in rows:
        if row.error:
            table.add_row(row.name, _shape(row.shape), row.dtype, "", f"[red]error: {row.error}", "", "")
            continue
        sigma = f"{row.sigma:.7g}" + ("" if row.converged else " [red](not converged)")
        table.add_row(
            row.name, _shape(row.shape), row.dtype, sigma,
            f"[{row.lower:.7g}, {row.upper:.7g}]",
            f"{row.method} / {row.bounds_method}",
            f"{row.sigma_seconds * 1e3:.1f} ms + {row.bounds_seconds * 1e3:.1f} ms",
        )
    console.print(table)
    console.print("time: estimate + certified bounds. method: estimate / bounds.")


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(str(n) for n in shape)


def _rich() -> tuple[Any, Any]:
    """The rich console and Table class, or a CommandError that names the fix."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        raise CommandError(
            "the table output needs rich: pip install 'lipnorm[cli]' (or pass --json)"
        ) from None
    console = Console()
    if not console.is_terminal:
        # Piped or captured output (CI logs, files) has no width; don't squeeze to 80 columns.
        console = Console(width=120)
    return console, Table


def _run_demo(args: argparse.Namespace) -> int:
    from lipnorm.demo import run_demo

    if not os.path.isdir(args.output_dir):
        raise CommandError(f"--output-dir {args.output_dir}: not a directory")
    console, _ = _rich()
    run_demo(console, args.output_dir)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
