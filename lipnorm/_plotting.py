"""matplotlib for the reports' ``plot`` methods, imported only when a plot is asked for."""

from __future__ import annotations

from typing import Any


def pyplot(path, caller: str) -> Any:
    """``matplotlib.pyplot``, on the Agg backend when the figure goes to a file.

    Parameters
    ----------
    path : str, Path or None
        Where the caller will save the figure (None: the user shows it).
    caller : str
        Named in the error when matplotlib is missing, e.g. ``"Certificate.plot"``.

    Raises
    ------
    ImportError
        Naming the install command.
    """
    try:
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(f"{caller} needs matplotlib: pip install matplotlib") from error
    return plt
