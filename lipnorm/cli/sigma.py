"""``lipnorm sigma``: σ_max and its certified interval for the tensors of a weight file or checkpoint.

Tensors are read one at a time (:func:`lipnorm.weights_io.open_weights`), measured, and
dropped; each gives a :class:`SigmaRow`, printed as a table (:mod:`lipnorm.cli.sigma_table`)
or as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

import lipnorm
from lipnorm._xp import to_numpy
from lipnorm.cli.console import EXIT_OK, EXIT_TENSOR_FAILED, CommandError
from lipnorm.cli.sigma_row import MEASURES, SigmaRow
from lipnorm.cli.sigma_table import print_table
from lipnorm.weights_io import StoredTensor, WeightFileError, missing_key, open_weights

__all__ = ["add_arguments", "run_sigma"]

METHODS = ("auto", "power", "lanczos", "svd")


def add_arguments(sigma: argparse.ArgumentParser) -> None:
    """The arguments of ``lipnorm sigma``."""
    sigma.add_argument("file", metavar="PATH", help="weight file, checkpoint index or directory")
    sigma.add_argument(
        "--key", metavar="NAME",
        help="the one tensor to measure (1-D to 5-D, or more with --stack); default: every "
        "floating-point tensor with 2 to 5 axes (2 or more with --stack)",
    )
    sigma.add_argument("--method", choices=METHODS, default="auto", help="estimation method")
    sigma.add_argument(
        "--rtol", type=float, default=1e-6, help="relative tolerance of the estimate (default 1e-6)"
    )
    sigma.add_argument(
        "--stack", action="store_true",
        help="measure each tensor of 3 or more axes as a stack of matrices (its last two "
        "axes), e.g. MoE experts (E, d, f): sigma of each matrix and their maximum",
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


def run_sigma(args: argparse.Namespace) -> int:
    """Run ``lipnorm sigma``; return its exit code (2 is raised as :class:`CommandError`)."""
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
            stack = args.stack and len(tensor.shape) > 2
            rows.append((_measure_stack if stack else _measure)(tensor, values, args))
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
        print_table(args.file, rows, notes, bounds=not args.no_bounds)
    return EXIT_TENSOR_FAILED if any(row.error for row in rows) else EXIT_OK


def _select(
    tensors: dict[str, StoredTensor], args: argparse.Namespace
) -> tuple[list[StoredTensor], dict[str, list[str]]]:
    """The tensors to measure, and the names of those skipped by the reason's kind.

    ``--key`` names one tensor, which must be measurable. Without it every floating-point
    tensor of 2 to 5 axes (2 or more with ``--stack``) is measured; non-float tensors are
    skipped unless ``--include-non-float``, packed quantizations always.
    """
    if args.key is not None:
        if args.key not in tensors:
            raise CommandError(str(missing_key(Path(args.file), args.key, list(tensors))))
        tensor = tensors[args.key]
        if tensor.unsupported:
            raise CommandError(f"{tensor.file}: tensor {args.key!r} is a {tensor.unsupported}")
        if not (1 <= len(tensor.shape) <= 5 or (args.stack and len(tensor.shape) > 5)):
            raise CommandError(
                f"{tensor.file}: tensor {args.key!r} has shape {tensor.shape}; `lipnorm sigma` "
                "takes tensors with 1 to 5 axes (or more with --stack)"
            )
        if not (args.include_non_float or tensor.is_floating):
            raise CommandError(
                f"{tensor.file}: tensor {args.key!r} is {tensor.dtype}, not floating "
                "point (a buffer, not a weight); pass --include-non-float to measure it as float64"
            )
        return [tensor], {}
    most_axes = math.inf if args.stack else 5
    candidates = [t for t in tensors.values() if 2 <= len(t.shape) <= most_axes]
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
            f"{args.file}: no floating-point tensors with 2 to {'more' if args.stack else 5} axes"
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
    try:
        row = _estimated(row, values, args, dim=0 if len(tensor.shape) > 2 else None)
    except (ValueError, TypeError) as exc:
        return replace(row, error=str(exc))
    frobenius = _frobenius(values)
    return replace(row, frobenius=frobenius, stable_rank=_stable_rank(frobenius, row.sigma))


def _measure_stack(tensor: StoredTensor, values: Any, args: argparse.Namespace) -> SigmaRow:
    """σ of every matrix of a stack (the last two axes) in one batched call, and their maximum.

    The certified interval is of the maximum: the largest lower and the largest upper end.
    """
    row = _row(tensor, "stack", args)
    values = _floating(values)
    try:
        row = _estimated(row, values, args, batched=True)
    except (ValueError, TypeError) as exc:
        return replace(row, error=str(exc))
    frobenius = [_frobenius(matrix) for matrix in to_numpy(values).reshape(-1, *tensor.shape[-2:])]
    sigmas = np.ravel(row.sigmas)
    ranks = [_stable_rank(norm, sigma) for norm, sigma in zip(frobenius, sigmas)]
    shape = tensor.shape[:-2]
    return replace(row, frobenius_norms=_nested(frobenius, shape), stable_ranks=_nested(ranks, shape))


def _estimated(row: SigmaRow, values: Any, args: argparse.Namespace, **layout: Any) -> SigmaRow:
    """``row`` with the estimate and, unless ``--no-bounds``, the certified interval.

    ``layout`` is ``dim=`` (a matrix or a reshaped tensor) or ``batched=True`` (a stack: the
    row gets every matrix's σ in ``sigmas``, and the maximum's estimate and interval).
    """
    with warnings.catch_warnings():
        # Non-convergence is reported in the row through state.converged.
        warnings.simplefilter("ignore", lipnorm.ConvergenceWarning)
        (sigma, state), sigma_seconds = _timed(
            lipnorm.estimate_sigma, values, method=args.method, rtol=args.rtol,
            return_state=True, **layout,
        )
    sigma = to_numpy(sigma).astype(np.float64)
    row = replace(
        row, sigma=float(sigma.max()), sigmas=sigma.tolist() if sigma.ndim else None,
        method=state.method, converged=bool(np.all(state.converged)), sigma_seconds=sigma_seconds,
    )
    if args.no_bounds:
        return row
    interval, bounds_seconds = _timed(lipnorm.sigma_bounds, values, state=state, **layout)
    return replace(row, lower=float(np.max(interval.lower)), upper=float(np.max(interval.upper)),
                   bounds_method=interval.method, bounds_seconds=bounds_seconds)


def _nested(values: list, shape: tuple[int, ...]) -> list:
    """Python values as nested lists of ``shape`` (a stack's leading axes), for JSON."""
    return np.array(values, dtype=object).reshape(shape).tolist()


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
