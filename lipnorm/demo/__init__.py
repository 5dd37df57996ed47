"""``lipnorm demo``: what lipnorm computes, side by side with the exact answer.

The demo is a list of sections, :data:`SECTIONS`, run in order by :func:`run_demo`. A
section is a title and a function ``run(console, output_dir)`` that prints to a ``rich``
console and writes its files (plots) into ``output_dir``; a new feature adds its section
to the list. A section whose framework is not installed prints how to install it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lipnorm.demo.keras_cnn import keras_section
from lipnorm.demo.robust_cnn import robust_section
from lipnorm.demo.sigma import sigma_section
from lipnorm.demo.torch_cnn import torch_section

__all__ = ["SECTIONS", "DemoSection", "run_demo"]


@dataclass(frozen=True)
class DemoSection:
    """One part of the demo.

    Attributes
    ----------
    title : str
        Heading printed above the section.
    run : callable
        ``run(console, output_dir)`` prints the section to a ``rich.console.Console`` and
        writes its files into the directory ``output_dir``.
    requires : tuple of str
        Modules the section imports beyond lipnorm's own dependencies.
    """

    title: str
    run: Callable[[Any, Path], None]
    requires: tuple[str, ...] = ()


SECTIONS: list[DemoSection] = [
    DemoSection("σ_max of weight matrices: lipnorm next to the SVD", sigma_section),
    DemoSection(
        "PyTorch: a spectrally normalized CNN on the digits, certified",
        torch_section, requires=("torch", "sklearn", "matplotlib"),
    ),
    DemoSection(
        "Keras 3: the same CNN with lipnorm's SpectralNormalization",
        keras_section, requires=("keras", "sklearn"),
    ),
    DemoSection(
        "Certified robustness: a Lipschitz CNN trained for margins, certified and attacked",
        robust_section, requires=("torch", "sklearn", "matplotlib"),
    ),
]


def run_demo(console: Any, output_dir: Path | str = ".") -> None:
    """Print every section of :data:`SECTIONS` to ``console``; write files into ``output_dir``.

    Parameters
    ----------
    console : rich.console.Console
    output_dir : path
        Existing directory for the demo's plots.
    """
    for section in SECTIONS:
        console.rule(section.title)
        missing = [name for name in section.requires if importlib.util.find_spec(name) is None]
        if missing:
            console.print(
                f"[yellow]Skipped: needs {', '.join(missing)} "
                "(make demo installs everything; or pip install 'lipnorm[demo]')."
            )
            continue
        section.run(console, Path(output_dir))
