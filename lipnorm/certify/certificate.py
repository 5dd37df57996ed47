"""The result of certification: the bound, the per-layer report, JSON and a plot."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

__all__ = ["Certificate", "LayerBound"]


@dataclass(frozen=True)
class LayerBound:
    """One row of a certificate.

    Attributes
    ----------
    name, layer_type : str
        The layer's name and type.
    bound : float
        Upper bound of this layer's own Lipschitz constant (for a sum or concatenation:
        the composed bound of the block).
    cumulative : float or None
        Upper bound of the Lipschitz constant from the model input to this layer's output.
    method : str
        How the bound was obtained.
    seconds : float
        Time spent bounding this layer.
    merged : tuple of str
        Layers whose linear maps were merged into this one before bounding.
    composition : str
        For sums and concatenations, the branch bounds that were composed.
    lower : float or None
        A certified lower bound of this linear layer's own norm (from the same
        computation), so ``bound / lower`` bounds how far ``bound`` can be from the truth.
    """

    name: str
    layer_type: str
    bound: float
    cumulative: float | None
    method: str
    seconds: float
    merged: tuple[str, ...] = ()
    composition: str = ""
    lower: float | None = None


@dataclass(frozen=True)
class Certificate:
    """A certified upper bound of a model's L2 Lipschitz constant, layer by layer.

    Attributes
    ----------
    model : str
        The model's name or type.
    input_shape : tuple of int or None
        Input shape (without batch axis) the bound holds for.
    upper : float
        Sound upper bound of the Lipschitz constant of the whole model.
    layers : list of LayerBound
        Per-layer report, in graph order.
    seconds : float
        Time spent bounding.
    lower : float or None
        A lower bound (from :func:`lipnorm.lipschitz_lower_bound`) when one was computed.
    """

    model: str
    input_shape: tuple[int, ...] | None
    upper: float
    layers: list[LayerBound] = field(default_factory=list)
    seconds: float = 0.0
    lower: float | None = None

    def with_lower(self, lower: float) -> Certificate:
        """A copy with the lower bound filled in."""
        return replace(self, lower=float(lower))

    def table(self) -> str:
        """The per-layer report as aligned plain text.

        Returns
        -------
        str
            One line per layer (name, type, bound, cumulative bound, method, time), then
            the totals.
        """
        header = ("layer", "type", "bound", "cumulative", "method", "time [s]")
        lines = [header]
        for row in self.layers:
            method = row.method
            if row.merged:
                method += f" [merged: {', '.join(row.merged)}]"
            if row.composition:
                method += f" = {row.composition}"
            lines.append(
                (
                    row.name,
                    row.layer_type,
                    f"{row.bound:.6g}",
                    "" if row.cumulative is None else f"{row.cumulative:.6g}",
                    method,
                    f"{row.seconds:.3f}",
                )
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 2)]
        text = [
            "  ".join(cell.ljust(width) for cell, width in zip(line[:-2], widths))
            + f"  {line[-1]:>8}  {line[-2]}"
            for line in lines
        ]
        text.append("")
        text.append(f"upper bound: {self.upper:.6g}   (certified, {self.seconds:.2f} s)")
        if self.lower is not None:
            text.append(f"lower bound: {self.lower:.6g}   (upper/lower = {self.upper / self.lower:.3g})"
                        if self.lower > 0 else f"lower bound: {self.lower:.6g}")
        return "\n".join(text)

    def to_dict(self) -> dict:
        """The certificate as plain JSON-compatible data."""
        data = asdict(self)
        data["input_shape"] = None if self.input_shape is None else list(self.input_shape)
        for row in data["layers"]:
            row["merged"] = list(row["merged"])
        return data

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialize to JSON; write it to ``path`` when given.

        Parameters
        ----------
        path : str or Path, optional

        Returns
        -------
        str
            The JSON text.
        """
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def plot(self, path: str | Path | None = None, *, log: bool = True):
        """Bar chart of per-layer bounds with the cumulative bound (needs matplotlib).

        Parameters
        ----------
        path : str or Path, optional
            Where to save the figure (format from the suffix).
        log : bool
            Logarithmic y axis (default).

        Returns
        -------
        matplotlib.figure.Figure
        """
        try:
            import matplotlib

            if path is not None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("Certificate.plot needs matplotlib: pip install matplotlib") from error
        rows = [row for row in self.layers if row.cumulative is not None]
        figure, axes = plt.subplots(figsize=(max(6.0, 0.22 * len(rows) + 2), 4.0))
        positions = range(len(rows))
        axes.bar(positions, [row.bound for row in rows], color="tab:blue", label="layer bound")
        axes.plot(positions, [row.cumulative for row in rows], color="tab:red", marker=".",
                  label="cumulative bound")
        if self.lower is not None and self.lower > 0:
            axes.axhline(self.lower, color="tab:green", linestyle="--", label="lower bound (model)")
        axes.set_xticks(list(positions))
        axes.set_xticklabels([row.name for row in rows], rotation=90, fontsize=6)
        if log and all(row.bound > 0 for row in rows):
            axes.set_yscale("log")
        axes.set_ylabel("Lipschitz bound (L2)")
        axes.set_title(f"{self.model}: upper bound {self.upper:.4g}"
                       + ("" if self.lower is None else f", lower bound {self.lower:.4g}"))
        axes.legend(fontsize=8)
        figure.tight_layout()
        if path is not None:
            figure.savefig(path, dpi=120)
        return figure

    def __post_init__(self):
        if not (math.isfinite(self.upper) and self.upper >= 0):
            raise ValueError(f"certificate bound must be finite and non-negative, got {self.upper!r}")
