"""What the demo sections share for printing: time formatting and table construction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["format_seconds", "new_table"]


def format_seconds(seconds: float) -> str:
    """``"1.23 s"`` from one second on, ``"45 ms"`` below."""
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.0f} ms"


def new_table(title: str, columns: Sequence[str]) -> Any:
    """A ``rich`` table with the demo's style: first column left-aligned, the others right."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD)
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right", no_wrap=True)
    return table
