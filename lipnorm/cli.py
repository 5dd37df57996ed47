"""The ``lipnorm`` command.

``lipnorm sigma PATH [--key NAME] [--method METHOD] [--rtol RTOL] [--no-bounds] [--json]
[--include-non-float] [--input-size H,W[,D] [--stride S] [--padding P] [--dilation D] [--groups G]]``
    σ_max, its certified interval, the method and the time for the tensors of a weight file
    (``.npy``, ``.npz``, ``.pt``/``.pth``, ``.safetensors``), a sharded checkpoint's
    ``*.safetensors.index.json`` or a directory of shards, read one tensor at a time (see
    :mod:`lipnorm.weights_io`: low-precision floats widened exactly, float8/int8 weights with
    scales dequantized, packed integer quantizations skipped and counted). Without ``--key``
    every floating-point tensor of 2 to 5 axes gets a row; a tensor of 3 to 5 axes is
    measured as the matrix ``(shape[0], -1)`` (a conv kernel's reshaped form), and with
    ``--input-size`` also as the convolution operator on inputs of that size (certified, see
    :func:`lipnorm.conv_operator`). Non-float tensors (integer buffers) are skipped unless
    ``--include-non-float``. ``--json`` adds the Frobenius norm and the stable rank.
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
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

import lipnorm
from lipnorm._xp import to_numpy
from lipnorm.certify.cli import add_arguments, run_certify
from lipnorm.robustness.cli import add_arguments as add_robustness_arguments
from lipnorm.robustness.cli import run_robustness
from lipnorm.weights_io import (
    INDEX_SUFFIX,
    SUFFIXES,
    StoredTensor,
    WeightFileError,
    missing_key,
    open_weights,
)

__all__ = ["main"]

METHODS = ("auto", "power", "lanczos", "svd")

EXIT_OK = 0
EXIT_TENSOR_FAILED = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """A user error that ends the command with a one-line message and exit code 2."""


#: What a row measures: by the number of axes of its tensor, or "conv operator" (``--input-size``).
MEASURES = {1: "vector", 2: "matrix", 3: "reshaped", 4: "reshaped", 5: "reshaped"}


@dataclass(frozen=True)
class SigmaRow:
    """One measured tensor: what ``lipnorm sigma`` prints per row (and writes with --json).

    ``measure`` says which linear map σ is of: ``"vector"``, ``"matrix"``, ``"reshaped"``
    (a 3-D to 5-D tensor as the matrix ``(shape[0], -1)``: for a conv kernel, what torch's
    spectral norm normalizes) or ``"conv operator"`` (the
    convolution on ``input_shape``, with the geometry given on the command line: certified
    bounds only, ``sigma`` is None). ``dtype`` is the stored dtype; floats narrower than
    float32 are measured widened to float32, which is exact. ``dequantized`` says how a
    scale tensor was applied (see :mod:`lipnorm.weights_io`). ``rtol`` is the relative error
    allowed to the estimate ``sigma``; ``frobenius`` and ``stable_rank`` (``frobenius**2 /
    sigma**2``) are of the measured matrix.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    measure: str
    rtol: float
    dequantized: str | None = None
    input_shape: tuple[int, ...] | None = None
    sigma: float | None = None
    lower: float | None = None
    upper: float | None = None
    method: str | None = None
    bounds_method: str | None = None
    converged: bool | None = None
    sigma_seconds: float | None = None
    bounds_seconds: float | None = None
    frobenius: float | None = None
    stable_rank: float | None = None
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
        help="sigma_max and its certified interval for the tensors of a weight file or checkpoint",
        description=(
            "Print sigma_max (the largest singular value), a certified interval "
            "lower <= sigma_max <= upper, the method and the time for tensors of a weight "
            f"file ({', '.join(SUFFIXES)}), a sharded checkpoint's *{INDEX_SUFFIX} or a "
            "directory of shards. Files are read as data: nothing in them is run. Tensors "
            "are read one at a time; bfloat16, float16 and float8 are widened to float32 "
            "(exact), and float8/int8 weights with a scale tensor are dequantized."
        ),
    )
    sigma.add_argument("file", metavar="PATH", help="weight file, checkpoint index or directory")
    sigma.add_argument(
        "--key", metavar="NAME",
        help="the one tensor to measure (1-D to 5-D); default: every floating-point tensor "
        "with 2 to 5 axes",
    )
    sigma.add_argument("--method", choices=METHODS, default="auto", help="estimation method")
    sigma.add_argument(
        "--rtol", type=float, default=1e-6, help="relative tolerance of the estimate (default 1e-6)"
    )
    sigma.add_argument(
        "--no-bounds", action="store_true",
        help="estimates only, without the certified interval (whose float64 Gram matrix "
        "costs several times the estimate on large matrices)",
    )
    sigma.add_argument(
        "--json", action="store_true",
        help="print JSON instead of a table, with the Frobenius norm and the stable rank",
    )
    sigma.add_argument(
        "--include-non-float", action="store_true",
        help="also measure integer and boolean tensors (as float64); by default they are "
        "skipped and counted",
    )
    conv = sigma.add_argument_group(
        "convolution kernels",
        "A tensor with 3 to 5 axes is measured as the matrix (shape[0], -1): for a conv kernel "
        "in torch layout (out, in/groups, *kernel), what torch's spectral norm divides by, "
        "which is not the layer's norm; "
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


def _run_sigma(args: argparse.Namespace) -> int:
    if not args.rtol > 0:
        raise CommandError(f"--rtol must be positive, got {args.rtol}")
    try:
        tensors = open_weights(args.file)
    except WeightFileError as exc:
        raise CommandError(str(exc)) from None
    selected, skipped = _select(tensors, args)
    rows = []
    with _Progress(selected) as progress:
        for tensor in selected:
            progress.working_on(tensor)
            try:
                values = tensor.read()
            except WeightFileError as exc:
                raise CommandError(str(exc)) from None
            rows.append(_measure(tensor, values, args))
            if args.input_size is not None and len(tensor.shape) == len(args.input_size) + 2:
                rows.append(_measure_conv(tensor, values, args))
            del values  # one tensor in memory at a time
            progress.finished(tensor)
    notes = _skipped_notes(skipped)
    if args.json:
        print(json.dumps([asdict(row) for row in rows], indent=2))
        for note in notes:
            print(note, file=sys.stderr)
    else:
        _print_table(args.file, rows, notes, bounds=not args.no_bounds)
    return EXIT_TENSOR_FAILED if any(row.error for row in rows) else EXIT_OK


def _select(
    tensors: dict[str, StoredTensor], args: argparse.Namespace
) -> tuple[list[StoredTensor], dict[str, list[str]]]:
    """The tensors to measure, and the names of those skipped by the reason's kind.

    ``--key`` names one tensor, which must be measurable. Without it every floating-point
    tensor of 2 to 5 axes is measured; non-float tensors are
    skipped unless ``--include-non-float``, packed quantizations always.
    """
    if args.key is not None:
        if args.key not in tensors:
            raise CommandError(str(missing_key(Path(args.file), args.key, list(tensors))))
        tensor = tensors[args.key]
        if tensor.unsupported:
            raise CommandError(f"{tensor.file}: tensor {args.key!r} is a {tensor.unsupported}")
        if not 1 <= len(tensor.shape) <= 5:
            raise CommandError(
                f"{tensor.file}: tensor {args.key!r} has shape {tensor.shape}; `lipnorm sigma` "
                "takes tensors with 1 to 5 axes"
            )
        if not (args.include_non_float or tensor.is_floating):
            raise CommandError(
                f"{tensor.file}: tensor {args.key!r} is {tensor.dtype}, not floating "
                "point (a buffer, not a weight); pass --include-non-float to measure it as float64"
            )
        return [tensor], {}
    candidates = [t for t in tensors.values() if 2 <= len(t.shape) <= 5]
    skipped: dict[str, list[str]] = {"packed": [], "non-float": []}
    selected = []
    for tensor in candidates:
        if tensor.unsupported:
            skipped["packed"].append(tensor.name)
        elif not (tensor.is_floating or args.include_non_float):
            skipped["non-float"].append(tensor.name)
        else:
            selected.append(tensor)
    if not selected:
        notes = "; ".join(_skipped_notes(skipped))
        raise CommandError(
            f"{args.file}: no floating-point tensors with 2 to 5 axes"
            + (f" ({notes})" if notes else "") + "; pick a 1-D one with --key"
        )
    return selected, skipped


def _skipped_notes(skipped: dict[str, list[str]], shown: int = 3) -> list[str]:
    """One line per kind of skipped tensors: how many, the first names, why or the fix."""
    notes = []
    for kind, names in skipped.items():
        if not names:
            continue
        listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
        plural = "s" if len(names) > 1 else ""
        if kind == "non-float":
            notes.append(f"skipped {len(names)} non-float tensor{plural} ({listed}); "
                         "--include-non-float measures them")
        else:
            notes.append(f"skipped {len(names)} tensor{plural} of packed integer quantizations "
                         f"({listed}), which lipnorm does not unpack (GPTQ/AWQ qweight, "
                         "compressed-tensors weight_packed)")
    return notes


class _Progress:
    """A progress bar over the tensors measured, on stderr when it is a terminal.

    It advances by the tensors' entries (the work grows with them) and names the tensor
    being measured; it is removed when done, so tables and JSON print as without it.
    """

    def __init__(self, tensors: list[StoredTensor]) -> None:
        self.bar = None
        self.count = len(tensors)
        self.done = 0
        console = _progress_console()
        if console is None:
            return
        from rich.progress import (BarColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), console=console, transient=True,
        )
        self.task = self.bar.add_task("", total=sum(max(t.size, 1) for t in tensors))

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.bar is not None:
            self.bar.stop()

    def working_on(self, tensor: StoredTensor) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=f"{self.done + 1}/{self.count} {tensor.name}")

    def finished(self, tensor: StoredTensor) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.advance(self.task, max(tensor.size, 1))


def _progress_console() -> Any:
    """The console for the progress bar: stderr when it is a terminal and rich is installed."""
    try:
        from rich.console import Console
    except ImportError:
        return None
    console = Console(stderr=True)
    return console if console.is_terminal else None


def _timed(function, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def _row(tensor: StoredTensor, measure: str, args: argparse.Namespace, **fields: Any) -> SigmaRow:
    return SigmaRow(tensor.name, tensor.shape, tensor.dtype, measure=measure, rtol=args.rtol,
                    dequantized=tensor.dequantized, **fields)


def _floating(values: Any) -> Any:
    """``values`` if floating point, else as float64 (``--include-non-float``)."""
    dtype = values.dtype
    floating = (np.issubdtype(dtype, np.inexact) if isinstance(dtype, np.dtype)
                else dtype.is_floating_point or dtype.is_complex)
    return values if floating else to_numpy(values).astype(np.float64)


def _measure(tensor: StoredTensor, values: Any, args: argparse.Namespace) -> SigmaRow:
    """Estimate and bound σ of one tensor; a tensor lipnorm rejects gets a row with the error.

    A tensor with 3 to 5 axes is measured as the matrix ``(shape[0], -1)``; a non-float
    tensor (measured only with ``--include-non-float``) as float64.
    """
    row = _row(tensor, MEASURES[len(tensor.shape)], args)
    values = _floating(values)
    dim = 0 if len(tensor.shape) > 2 else None
    try:
        with warnings.catch_warnings():
            # Non-convergence is reported in the row through state.converged.
            warnings.simplefilter("ignore", lipnorm.ConvergenceWarning)
            (sigma, state), sigma_seconds = _timed(
                lipnorm.estimate_sigma, values, dim=dim, method=args.method, rtol=args.rtol,
                return_state=True,
            )
        row = replace(
            row, sigma=float(sigma), method=state.method, converged=bool(state.converged),
            sigma_seconds=sigma_seconds,
        )
        if not args.no_bounds:
            interval, bounds_seconds = _timed(lipnorm.sigma_bounds, values, dim=dim)
            row = replace(row, lower=interval.lower, upper=interval.upper,
                          bounds_method=interval.method, bounds_seconds=bounds_seconds)
    except (ValueError, TypeError) as exc:
        return replace(row, sigma=None, error=str(exc))
    frobenius = _frobenius(values)
    return replace(row, frobenius=frobenius, stable_rank=_stable_rank(frobenius, row.sigma))


def _frobenius(values: Any, chunk: int = 1 << 20) -> float:
    """The Frobenius norm, summed in float64 chunk by chunk (no float64 copy of the tensor)."""
    flat = to_numpy(values).reshape(-1)
    total = 0.0
    for start in range(0, flat.size, chunk):
        part = flat[start:start + chunk].astype(np.complex128 if np.iscomplexobj(flat) else np.float64)
        total += float(np.vdot(part, part).real)
    return float(np.sqrt(total))


def _stable_rank(frobenius: float, sigma: float) -> float | None:
    """``frobenius**2 / sigma**2``: how many singular values of sigma's size the energy fills."""
    return frobenius**2 / sigma**2 if sigma else None


def _measure_conv(tensor: StoredTensor, kernel: Any, args: argparse.Namespace) -> SigmaRow:
    """Certified bounds of the convolution with ``kernel`` on ``--input-size`` inputs."""
    input_shape = (int(kernel.shape[1]) * args.groups, *args.input_size)
    row = _row(tensor, "conv operator", args, input_shape=input_shape)
    try:
        operator = lipnorm.conv_operator(
            _floating(kernel), input_shape, stride=_geometry_value(args.stride),
            padding=args.padding, dilation=_geometry_value(args.dilation), groups=args.groups,
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
    """Significant digits the estimate supports: its rtol, or the precision it was computed in.

    Floats narrower than float32 are measured widened to float32, non-float tensors as float64.
    """
    floating = row.dequantized or row.dtype.startswith(("float", "bfloat", "complex"))
    wide = row.dtype in ("float64", "complex128") or not floating
    eps = float(np.finfo(np.float64 if wide else np.float32).eps)
    return max(2, int(np.floor(-np.log10(max(row.rtol, eps)))))


def _measure_text(row: SigmaRow) -> str:
    """The measure column: which matrix (or operator) sigma is of."""
    if row.measure == "conv operator":
        text = f"conv operator on {_shape(row.input_shape)}"
    elif row.measure == "reshaped":
        text = f"reshaped {row.shape[0]}×{math.prod(row.shape[1:])}"
    else:
        text = row.measure
    return f"{text} {row.dequantized}" if row.dequantized else text


def _cells(row: SigmaRow) -> dict[str, str]:
    """The text of each column for one row."""
    cells = {"tensor": row.name, "shape": _shape(row.shape), "dtype": row.dtype,
             "measure": _measure_text(row)}
    if row.error:
        return {**cells, "certified interval": f"[red]error: {row.error}"}
    if row.sigma is not None:
        cells["sigma"] = _significant(row.sigma, _estimate_digits(row), "nearest") + (
            "" if row.converged else " [red](not converged)"
        )
    if row.lower is not None:
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


def _print_table(file: str, rows: list[SigmaRow], notes: Sequence[str] = (), *,
                 bounds: bool = True) -> None:
    """Print the rows so that they fit the terminal and no tensor's name is ever cut.

    Columns are dropped (time, then method, then dtype) while the table is too wide; if it
    still does not fit, each tensor's name gets a line of its own above its rows. ``--json``
    has every field. ``notes`` (skipped tensors) are printed below the table.
    """
    console, table_type = _rich()
    from rich.measure import Measurement

    unconstrained = console.options.update_width(10**6)
    title = f"sigma_max of the tensors in {file}"
    columns = [column for column in COLUMNS if bounds or column != "certified interval"]
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
    dropped = [column for column in COLUMNS
               if column not in columns and (bounds or column != "certified interval")]
    for line in _footnotes(rows, bounds, dropped):
        console.print(line)
    for note in notes:
        console.print(note)


def _footnotes(rows: list[SigmaRow], bounds: bool, dropped: list[str]) -> list[str]:
    """What the table's columns and measures mean, for the rows it has."""
    lines = []
    digits = sorted({_estimate_digits(row) for row in rows if row.sigma is not None})
    if digits:
        lines.append(
            "sigma: the estimate, relative error <= rtol (or its dtype's precision), printed to "
            f"{'/'.join(map(str, digits))} significant digits."
            + (" certified interval: float64 with rounding accounted for, rounded outward."
               if bounds else "")
        )
    if not bounds:
        lines.append("No certified interval (--no-bounds).")
    measures = {row.measure for row in rows}
    if "reshaped" in measures:
        lines.append(
            "reshaped: sigma of the tensor as the matrix (shape[0], -1): for a conv kernel, what "
            "torch's spectral norm divides by, not the convolution's norm (see --input-size); "
            "for a stack of matrices (experts, heads), not any one matrix's sigma."
        )
    if any(row.dequantized for row in rows):
        lines.append(
            "× scale: a float8 or int8 weight times its scale tensor, in float32: the matrix "
            "the model uses."
        )
    if dropped:
        lines.append(f"not shown to fit the terminal: {', '.join(dropped)} (see --json).")
    else:
        lines.append("time: estimate + certified bounds. method: estimate / bounds."
                     if bounds else "time and method: the estimate's.")
    return lines


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
