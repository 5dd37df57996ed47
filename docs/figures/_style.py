"""What every figure script shares: the output folder and a matplotlib set up without a display."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

#: docs/img, where the pages take their figures from.
IMG = Path(__file__).resolve().parent.parent / "img"


def save(fig, name: str) -> Path:
    """Write ``fig`` to docs/img/NAME at the resolution the pages use, and close it."""
    path = IMG / name
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    fig.clf()
    print(f"wrote {path.relative_to(IMG.parent.parent)}")
    return path
