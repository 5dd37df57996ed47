"""The certificate ladder figure (docs/img/certify_ladder.png) from bench_tight's results.

Every bar is a certified upper bound divided by the best lower bound found for that
network (1 would be the true constant), for the product, chain and SDP methods.

Run: python benchmarks/plot_tight.py (after benchmarks/bench_tight.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "bench_tight.json"
FIGURE = Path(__file__).resolve().parents[1] / "docs" / "img" / "certify_ladder.png"


def main() -> None:
    rows = [row for row in json.loads(RESULTS.read_text()) if row["lower"]]
    figure, axes = plt.subplots(figsize=(9, 4.4))
    positions = np.arange(len(rows))
    series = [("product", "tab:red"), ("chain", "tab:orange"), ("sdp", "tab:blue")]
    for offset, (method, color) in zip((-0.27, 0.0, 0.27), series):
        values = [(row["methods"][method]["upper"] or np.nan) / row["lower"] for row in rows]
        axes.bar(positions + offset, values, width=0.27, color=color, label=method)
    axes.axhline(1.0, color="tab:green", linestyle="--", label="best lower bound")
    axes.set_xticks(positions)
    axes.set_xticklabels([row["network"] for row in rows], rotation=30, ha="right", fontsize=7)
    axes.set_yscale("log")
    axes.set_ylabel("certified upper bound / lower bound")
    axes.set_title("The certificate ladder: every bar is a certified upper bound")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(FIGURE, dpi=120)


if __name__ == "__main__":
    main()
