"""The table of ``lipnorm sigma``: rows that fit the terminal, numbers to the digits they have."""

from __future__ import annotations

import decimal
import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from lipnorm.cli import console
from lipnorm.cli.sigma_row import SigmaRow

__all__ = ["print_table"]


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
    elif row.measure == "stack":
        text = f"stack of {math.prod(row.shape[:-2])} {_shape(row.shape[-2:])}"
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


def print_table(file: str, rows: list[SigmaRow], notes: Sequence[str] = (), *,
                 bounds: bool = True) -> None:
    """Print the rows so that they fit the terminal and no tensor's name is ever cut.

    Columns are dropped (time, then method, then dtype) while the table is too wide; if it
    still does not fit, each tensor's name gets a line of its own above its rows. ``--json``
    has every field. ``notes`` (skipped tensors) are printed below the table.
    """
    terminal, table_type = console.rich_table_console()
    from rich.measure import Measurement

    unconstrained = terminal.options.update_width(10**6)
    title = f"sigma_max of the tensors in {file}"
    columns = [column for column in COLUMNS if bounds or column != "certified interval"]
    for dropped in (None, *DROPPED_FIRST):
        if dropped:
            columns.remove(dropped)
        table = _table(table_type, rows, columns, title=title)
        if Measurement.get(terminal, unconstrained, table).maximum <= terminal.width:
            terminal.print(table)
            break
    else:
        terminal.print(title, style="italic")
        row_columns = [column for column in columns if column != "tensor"]
        for index, (name, group) in enumerate(itertools.groupby(rows, key=lambda row: row.name)):
            terminal.print(name, style="bold", soft_wrap=True)
            terminal.print(_table(
                table_type, list(group), row_columns, box=None, padding=(0, 1, 0, 2),
                show_header=index == 0,
            ))
    dropped = [column for column in COLUMNS
               if column not in columns and (bounds or column != "certified interval")]
    for line in _footnotes(rows, bounds, dropped):
        terminal.print(line)
    for note in notes:
        terminal.print(note)


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
            "for a stack of matrices (experts, heads), --stack measures each matrix."
        )
    if "stack" in measures:
        lines.append(
            "stack: each matrix of the last two axes; sigma and the interval are of the largest "
            "(--json has every matrix's sigma)."
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
