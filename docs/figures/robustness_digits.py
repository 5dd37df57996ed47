"""The certified-robustness plot of ``lipnorm demo``: its margin-trained CNN on the digits.

Runs the demo's robustness section (train, certify, attack) and keeps its plot as
docs/img/robustness_digits.png; about a minute on a CPU.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from rich.console import Console

from _style import IMG
from lipnorm.demo.robust_cnn import ROBUSTNESS_PLOT, robust_section


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        robust_section(Console(), Path(folder))
        shutil.copyfile(Path(folder) / ROBUSTNESS_PLOT, IMG / "robustness_digits.png")
    print("wrote docs/img/robustness_digits.png")


if __name__ == "__main__":
    main()
