"""The ``lipnorm`` command.

``lipnorm sigma FILE [--key NAME] [--method METHOD] [--rtol RTOL] [--json]
[--include-non-float] [--input-size H,W[,D] [--stride S] [--padding P] [--dilation D] [--groups G]]``
    σ_max, its certified interval, the method and the time for the tensors of a weight file
    (``.npy``, ``.npz``, ``.pt``/``.pth``, ``.safetensors``). Without ``--key`` every
    floating-point tensor of 2 to 5 axes gets a row; a tensor of 3 to 5 axes (a convolution
    kernel, torch layout) is measured as its reshaped kernel ``(shape[0], -1)``, and with
    ``--input-size`` also as the convolution operator on inputs of that size (certified, see
    :func:`lipnorm.conv_operator`). Non-float tensors (integer buffers) are skipped unless
    ``--include-non-float``. The file is read as data only (see :mod:`lipnorm.weights_io`).
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
import decimal
import itertools
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

import lipnorm
from lipnorm._xp import to_numpy
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


#: What a row measures, by the number of axes of its tensor.
MEASURES = {1: "vector", 2: "matrix", 3: "reshaped kernel", 4: "reshaped kernel", 5: "reshaped kernel"}


@dataclass(frozen=True)
class SigmaRow:
    """One measured tensor: what ``lipnorm sigma`` prints per row (and writes with --json).

    ``measure`` says which linear map σ is of: ``"vector"``, ``"matrix"``, ``"reshaped
    kernel"`` (a 3-D to 5-D tensor as the matrix ``(shape[0], -1)``, what torch's spectral
    norm normalizes) or ``"conv operator"`` (the convolution on ``input_shape``, with the
    geometry given on the command line: certified bounds only, ``sigma`` is None).
    ``rtol`` is the relative error allowed to the estimate ``sigma``.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    measure: str
    rtol: float
    input_shape: tuple[int, ...] | None = None
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
        help="the one tensor to measure (1-D to 5-D); default: every floating-point tensor "
        "with 2 to 5 axes",
    )
    sigma.add_argument("--method", choices=METHODS, default="auto", help="estimation method")
    sigma.add_argument(
        "--rtol", type=float, default=1e-6, help="relative tolerance of the estimate (default 1e-6)"
    )
    sigma.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sigma.add_argument(
        "--include-non-float", action="store_true",
        help="also measure integer and boolean tensors (as float64); by default they are "
        "skipped and counted",
    )
    conv = sigma.add_argument_group(
        "convolution kernels",
        "A tensor with 3 to 5 axes is a conv kernel in torch layout (out, in/groups, *kernel). "
        "Its row is the sigma of the reshaped kernel (out, -1), which is not the layer's norm; "
        "--input-size adds the certified operator norm of the convolution on inputs of that "
        "size, with the geometry below applied to every kernel of that rank "
        "(use --key for one layer).",
    )
    conv.add_argument(
        "--input-size", type=_sizes, metavar="H,W[,D]",
        help="spatial size of the convolution's input: 1 to 3 integers, one per kernel axis",
    )
    conv.add_argument("--stride", type=_sizes, default=(1,), metavar="S[,S...]",
                      help="stride, one integer or one per axis (default 1)")
    conv.add_argument(
        "--padding", type=_padding, default=0, metavar="P",
        help="zero padding: one integer or one per axis, or 'same', 'valid', 'circular' "
        "(default 0)",
    )
    conv.add_argument("--dilation", type=_sizes, default=(1,), metavar="D[,D...]",
                      help="dilation, one integer or one per axis (default 1)")
    conv.add_argument("--groups", type=int, default=1, metavar="G",
                      help="groups of the convolution (default 1)")
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


def _integers(text: str, minimum: int) -> tuple[int, ...]:
    """Parse ``"32,32"`` (also ``"32x32"``) into integers of at least ``minimum``, for argparse."""
    try:
        values = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from None
    if min(values) < minimum:
        raise argparse.ArgumentTypeError(f"expected integers >= {minimum}, got {text!r}")
    return values


def _sizes(text: str) -> tuple[int, ...]:
    """``--input-size``, ``--stride``, ``--dilation``: positive integers."""
    return _integers(text, 1)


def _padding(text: str) -> int | str | tuple[int, ...]:
    """``--padding``: a mode name, or non-negative integers as ``conv_operator`` takes them."""
    if text.lower() in ("same", "valid", "circular"):
        return text.lower()
    try:
        return _geometry_value(_integers(text, 0))
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; or 'same', 'valid', 'circular'") from None


def _geometry_value(value: tuple[int, ...]) -> int | tuple[int, ...]:
    """One integer for every axis, or one per axis, as ``conv_operator`` takes them."""
    return value[0] if len(value) == 1 else value


def _is_floating(tensor: Any) -> bool:
    """Whether a NumPy array or torch tensor has a real or complex floating dtype."""
    dtype = tensor.dtype
    if isinstance(dtype, np.dtype):
        return bool(np.issubdtype(dtype, np.inexact))
    return bool(dtype.is_floating_point or dtype.is_complex)


def _dtype_name(tensor: Any) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _run_sigma(args: argparse.Namespace) -> int:
    if not args.rtol > 0:
        raise CommandError(f"--rtol must be positive, got {args.rtol}")
    try:
        tensors = load_weights(args.file, key=args.key)
    except WeightFileError as exc:
        raise CommandError(str(exc)) from None
    if args.key is not None:
        (tensor,) = tensors.values()
        if len(tensor.shape) not in MEASURES:
            raise CommandError(
                f"{args.file}: tensor {args.key!r} has shape {tuple(tensor.shape)}; "
                "`lipnorm sigma` takes tensors with 1 to 5 axes"
            )
        if not (args.include_non_float or _is_floating(tensor)):
            raise CommandError(
                f"{args.file}: tensor {args.key!r} is {_dtype_name(tensor)}, not floating "
                "point (a buffer, not a weight); pass --include-non-float to measure it as float64"
            )
        skipped = []
    else:
        tensors = {name: t for name, t in tensors.items() if 2 <= len(t.shape) <= 5}
        skipped = [name for name, t in tensors.items() if not _is_floating(t)]
        if not args.include_non_float:
            tensors = {name: t for name, t in tensors.items() if name not in skipped}
        if not tensors:
            raise CommandError(
                f"{args.file}: no floating-point tensors with 2 to 5 axes"
                + (f" ({len(skipped)} non-float skipped: --include-non-float)" if skipped else "")
                + "; pick a 1-D one with --key"
            )
    rows = []
    for name, tensor in tensors.items():
        rows.append(_measure(name, tensor, args.method, args.rtol))
        if args.input_size is not None and len(tensor.shape) == len(args.input_size) + 2:
            rows.append(_measure_conv(name, tensor, args))
    skipped_note = _skipped_note(skipped) if skipped and not args.include_non_float else None
    if args.json:
        print(json.dumps([asdict(row) for row in rows], indent=2))
        if skipped_note:
            print(skipped_note, file=sys.stderr)
    else:
        _print_table(args.file, rows, skipped_note)
    return EXIT_TENSOR_FAILED if any(row.error for row in rows) else EXIT_OK


def _skipped_note(names: list[str], shown: int = 3) -> str:
    listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
    plural = "s" if len(names) > 1 else ""
    return (
        f"skipped {len(names)} non-float tensor{plural} ({listed}); "
        "--include-non-float measures them"
    )


def _timed(function, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def _measure(name: str, tensor: Any, method: str, rtol: float) -> SigmaRow:
    """Estimate and bound σ of one tensor; a tensor lipnorm rejects gets a row with the error.

    A tensor with 3 to 5 axes is measured as its reshaped kernel ``(shape[0], -1)``; a
    non-float tensor (measured only with ``--include-non-float``) as float64.
    """
    row = SigmaRow(
        name, tuple(int(n) for n in tensor.shape), _dtype_name(tensor),
        measure=MEASURES[len(tensor.shape)], rtol=rtol,
    )
    if not _is_floating(tensor):
        tensor = to_numpy(tensor).astype(np.float64)
    dim = 0 if len(tensor.shape) > 2 else None
    try:
        with warnings.catch_warnings():
            # Non-convergence is reported in the row through state.converged.
            warnings.simplefilter("ignore", lipnorm.ConvergenceWarning)
            (sigma, state), sigma_seconds = _timed(
                lipnorm.estimate_sigma, tensor, dim=dim, method=method, rtol=rtol,
                return_state=True,
            )
        interval, bounds_seconds = _timed(lipnorm.sigma_bounds, tensor, dim=dim)
    except (ValueError, TypeError) as exc:
        return replace(row, error=str(exc))
    return replace(
        row, sigma=float(sigma), lower=interval.lower, upper=interval.upper,
        method=state.method, bounds_method=interval.method, converged=bool(state.converged),
        sigma_seconds=sigma_seconds, bounds_seconds=bounds_seconds,
    )


def _measure_conv(name: str, kernel: Any, args: argparse.Namespace) -> SigmaRow:
    """Certified bounds of the convolution with ``kernel`` on ``--input-size`` inputs."""
    input_shape = (int(kernel.shape[1]) * args.groups, *args.input_size)
    row = SigmaRow(
        name, tuple(int(n) for n in kernel.shape), _dtype_name(kernel),
        measure="conv operator", rtol=args.rtol, input_shape=input_shape,
    )
    try:
        operator = lipnorm.conv_operator(
            kernel if _is_floating(kernel) else to_numpy(kernel).astype(np.float64),
            input_shape, stride=_geometry_value(args.stride), padding=args.padding,
            dilation=_geometry_value(args.dilation), groups=args.groups,
        )
        interval, bounds_seconds = _timed(lipnorm.sigma_bounds, operator)
    except (ValueError, TypeError) as exc:
        return replace(row, error=str(exc))
    return replace(
        row, lower=interval.lower, upper=interval.upper, bounds_method=interval.method,
        bounds_seconds=bounds_seconds,
    )


#: Columns of the table, and the order they are dropped in when the terminal is too narrow;
#: if it is still too narrow, each tensor's name is printed on its own line above its rows.
COLUMNS = ("tensor", "shape", "dtype", "measure", "sigma", "certified interval", "method", "time")
DROPPED_FIRST = ("time", "method", "dtype")


def _significant(value: float, digits: int, rounding: str) -> str:
    """``value`` to ``digits`` significant digits, rounded exactly (in decimal) as asked.

    ``rounding`` is ``"down"``, ``"up"`` (the ends of a certified interval, rounded outward)
    or ``"nearest"``.
    """
    if value == 0 or not np.isfinite(value):
        return f"{value:g}"
    exact = decimal.Decimal(value)  # the float's exact decimal value
    quantum = decimal.Decimal(1).scaleb(exact.adjusted() - digits + 1)
    mode = {"down": decimal.ROUND_FLOOR, "up": decimal.ROUND_CEILING,
            "nearest": decimal.ROUND_HALF_EVEN}[rounding]
    return format(exact.quantize(quantum, rounding=mode), "f")


def _estimate_digits(row: SigmaRow) -> int:
    """Significant digits the estimate supports: its rtol, or its dtype's precision."""
    if row.dtype == "bfloat16":  # a torch dtype NumPy does not know: 8 bits of mantissa
        eps = 2.0**-7
    else:
        try:
            eps = float(np.finfo(np.dtype(row.dtype)).eps)
        except (TypeError, ValueError):  # an integer tensor, measured as float64
            eps = float(np.finfo(np.float64).eps)
    return max(2, int(np.floor(-np.log10(max(row.rtol, eps)))))


def _cells(row: SigmaRow) -> dict[str, str]:
    """The text of each column for one row."""
    cells = {
        "tensor": row.name, "shape": _shape(row.shape), "dtype": row.dtype,
        "measure": row.measure if row.input_shape is None
        else f"conv operator on {_shape(row.input_shape)}",
    }
    if row.error:
        return {**cells, "certified interval": f"[red]error: {row.error}"}
    if row.sigma is not None:
        cells["sigma"] = _significant(row.sigma, _estimate_digits(row), "nearest") + (
            "" if row.converged else " [red](not converged)"
        )
    cells["certified interval"] = (
        f"[{_significant(row.lower, 7, 'down')}, {_significant(row.upper, 7, 'up')}]"
    )
    cells["method"] = " / ".join(m for m in (row.method, row.bounds_method) if m)
    cells["time"] = " + ".join(
        f"{seconds * 1e3:.1f} ms" for seconds in (row.sigma_seconds, row.bounds_seconds)
        if seconds is not None
    )
    return cells


def _table(table_type: Any, rows: list[SigmaRow], columns: Sequence[str], **options) -> Any:
    table = table_type(**options)
    for column in columns:
        table.add_column(
            column, justify="right" if column in ("sigma", "time") else "left",
            no_wrap=column == "tensor", overflow="fold",
        )
    for row in rows:
        cells = _cells(row)
        table.add_row(*(cells.get(column, "") for column in columns))
    return table


def _print_table(file: str, rows: list[SigmaRow], skipped_note: str | None = None) -> None:
    """Print the rows so that they fit the terminal and no tensor's name is ever cut.

    Columns are dropped (time, then method, then dtype) while the table is too wide; if it
    still does not fit, each tensor's name gets a line of its own above its rows. ``--json``
    has every field.
    """
    console, table_type = _rich()
    from rich.measure import Measurement

    unconstrained = console.options.update_width(10**6)
    title = f"sigma_max of the tensors in {file}"
    columns = list(COLUMNS)
    for dropped in (None, *DROPPED_FIRST):
        if dropped:
            columns.remove(dropped)
        table = _table(table_type, rows, columns, title=title)
        if Measurement.get(console, unconstrained, table).maximum <= console.width:
            console.print(table)
            break
    else:
        console.print(title, style="italic")
        row_columns = [column for column in columns if column != "tensor"]
        for index, (name, group) in enumerate(itertools.groupby(rows, key=lambda row: row.name)):
            console.print(name, style="bold", soft_wrap=True)
            console.print(_table(
                table_type, list(group), row_columns, box=None, padding=(0, 1, 0, 2),
                show_header=index == 0,
            ))
    digits = sorted({_estimate_digits(row) for row in rows if row.sigma is not None})
    if digits:
        console.print(
            "sigma: the estimate, relative error <= rtol (or its dtype's precision), printed "
            f"to {'/'.join(map(str, digits))} significant digits. certified interval: float64 "
            "with rounding accounted for, rounded outward."
        )
    if any(row.measure == "reshaped kernel" for row in rows):
        console.print(
            "reshaped kernel: sigma of the kernel as a (shape[0], -1) matrix, what torch's "
            "spectral norm divides by; not the convolution's norm (see --input-size)."
        )
    dropped = [column for column in COLUMNS if column not in columns]
    if dropped:
        console.print(f"not shown to fit the terminal: {', '.join(dropped)} (see --json).")
    else:
        console.print("time: estimate + certified bounds. method: estimate / bounds.")
    if skipped_note:
        console.print(skipped_note)


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
