"""The certificate ladder figures from bench_tight's results.

docs/img/certify_ladder.png (digits networks) and docs/img/certify_cnn_ladder.png
(CNN-scale networks): every bar is a certified upper bound divided by the best lower bound
found for that network (1 would be the true constant), one bar per rung of the ladder
(``lipnorm.certify.methods.LADDER``) that gave a bound. The CNN figure also marks each
bar's time.

Run: python benchmarks/plot_tight.py (after benchmarks/bench_tight.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lipnorm.certify.methods import LADDER  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "bench_tight.json"
IMAGES = Path(__file__).resolve().parents[1] / "docs" / "img"
COLORS = ["tab:red", "tab:orange", "tab:blue", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]


def draw(rows, path: Path, title: str, times: bool) -> None:
    """Bars of bound / lower per rung for each row; saved to ``path``."""
    methods = [m for m in LADDER if any(row["methods"].get(m, {}).get("upper") for row in rows)]
    figure, axes = plt.subplots(figsize=(max(9, 1.3 * len(rows)), 4.6))
    positions = np.arange(len(rows))
    width = 0.8 / len(methods)
    for index, method in enumerate(methods):
        offset = (index - (len(methods) - 1) / 2) * width
        values = [(row["methods"].get(method, {}).get("upper") or np.nan) / row["lower"] for row in rows]
        bars = axes.bar(positions + offset, values, width=width, color=COLORS[index % len(COLORS)], label=method)
        if times:
            for bar, row in zip(bars, rows):
                result = row["methods"].get(method, {})
                if result.get("upper"):
                    axes.annotate(f"{result['seconds']:.3g} s", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                  ha="center", va="bottom", fontsize=6, rotation=90)
    axes.axhline(1.0, color="tab:green", linestyle="--", label="best lower bound")
    axes.set_xticks(positions)
    axes.set_xticklabels([row["network"] for row in rows], rotation=25, ha="right", fontsize=7)
    axes.set_yscale("log")
    axes.set_ylabel("certified upper bound / lower bound")
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    rows = [row for row in json.loads(RESULTS.read_text()) if row["lower"]]
    digits = [row for row in rows if row.get("group", "digits") == "digits"]
    cnn = [row for row in rows if row.get("group") == "cnn"]
    if digits:
        draw(digits, IMAGES / "certify_ladder.png",
             "The certificate ladder on digits networks: every bar is a certified upper bound", times=False)
    if cnn:
        draw(cnn, IMAGES / "certify_cnn_ladder.png",
             "CNN-scale networks (3×32×32 unless named): certified bound / lower bound, and time", times=True)


if __name__ == "__main__":
    main()
