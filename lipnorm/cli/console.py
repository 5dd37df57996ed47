"""What every ``lipnorm`` command prints with and exits with."""

from __future__ import annotations

from typing import Any

__all__ = ["EXIT_OK", "EXIT_TENSOR_FAILED", "EXIT_USAGE", "CommandError", "rich_table_console"]

EXIT_OK = 0
EXIT_TENSOR_FAILED = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """A user error that ends the command with a one-line message and exit code 2."""


def rich_table_console() -> tuple[Any, Any]:
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
