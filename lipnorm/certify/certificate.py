"""The result of certification: the bound, the per-layer report, JSON and a plot."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

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
    method : str
        The method whose bound ``upper`` is (``"product"``, ``"chain"``, ``"conv_sdp"`` or ``"sdp"``).
    ladder : tuple of MethodRun
        Every method tried, with its certified bound (None where it did not apply, and
        why) and its time.
    row_upper : tuple of float or None
        With ``rows=`` given to :func:`lipnorm.certify`: a certified bound of the
        Lipschitz constant of each functional ``x ↦ rows[i] · f(x)``.
    proof : object
        What the bound rests on (the graph, the dense network, the SDP multipliers);
        :meth:`verify` checks it again. Not serialized.
    """

    model: str
    input_shape: tuple[int, ...] | None
    upper: float
    layers: list[LayerBound] = field(default_factory=list)
    seconds: float = 0.0
    lower: float | None = None
    method: str = "product"
    ladder: tuple = ()
    row_upper: tuple[float, ...] | None = None
    proof: Any = field(default=None, repr=False, compare=False)

    def with_lower(self, lower: float) -> Certificate:
        """A copy with the lower bound filled in."""
        return replace(self, lower=float(lower))

    def verify(self) -> float:
        """Check the certificate again from what it stores, and return the bound.

        The product bound is computed again layer by layer; the chain bound from the
        dense network with every chain norm certified anew; the SDP bound by the exact
        positive-semidefiniteness test of the stored multipliers.

        Returns
        -------
        float
            The bound the stored proof certifies (``upper``).

        Raises
        ------
        ValueError
            If the certificate has no proof (one read back from JSON), or the check does
            not reproduce ``upper``.
        """
        if self.proof is None:
            raise ValueError("this certificate carries no proof (it was not computed in this "
                             "process); certify the model again")
        value = self.proof.verify()
        if self.row_upper is not None:
            rows = [float(v) for v in value]
            if any(v > u for v, u in zip(rows, self.row_upper)):
                raise ValueError("the stored proof does not reproduce the row bounds")
            return max(rows)
        if float(value) > self.upper:
            raise ValueError(f"the stored proof gives {float(value)!r}, above the reported {self.upper!r}")
        return float(value)

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
        if len(self.ladder) > 1:
            text.append("method    bound         time [s]  note")
            for run in self.ladder:
                bound = "—" if run.upper is None else f"{run.upper:.6g}"
                notes = [run.note]
                if run.method == self.method and run.upper is not None:
                    notes.append("(reported)")
                if run.upper is not None and self.lower:
                    notes.append(f"upper/lower = {run.upper / self.lower:.4g}")
                text.append(f"{run.method:<8}  {bound:<12}  {run.seconds:>8.2f}  "
                            + "  ".join(n for n in notes if n))
            text.append("")
        text.append(f"upper bound: {self.upper:.6g}   (certified by {self.method}, {self.seconds:.2f} s)")
        if self.lower is not None:
            text.append(f"lower bound: {self.lower:.6g}   (upper/lower = {self.upper / self.lower:.3g})"
                        if self.lower > 0 else f"lower bound: {self.lower:.6g}")
        return "\n".join(text)

    def to_dict(self) -> dict:
        """The certificate as plain JSON-compatible data."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "proof"}
        data["layers"] = [asdict(row) for row in self.layers]
        data["ladder"] = [asdict(run) for run in self.ladder]
        data["row_upper"] = None if self.row_upper is None else list(self.row_upper)
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

    def plot(self, path: str | Path | None = None, *, log: bool = True, title: str | None = None):
        """Bar chart of per-layer bounds with the cumulative bound (needs matplotlib).

        Parameters
        ----------
        path : str or Path, optional
            Where to save the figure (format from the suffix).
        log : bool
            Logarithmic y axis (default).
        title : str, optional
            What was certified (a model), the first line of the title; the second gives
            the whole model's bounds.

        Returns
        -------
        matplotlib.figure.Figure
        """
        from lipnorm._plotting import pyplot

        plt = pyplot(path, "Certificate.plot")
        rows = [row for row in self.layers if row.cumulative is not None]
        figure, axes = plt.subplots(figsize=(max(6.0, 0.22 * len(rows) + 2), 4.0))
        positions = range(len(rows))
        axes.bar(positions, [row.bound for row in rows], color="tab:blue", label="layer bound")
        axes.plot(positions, [row.cumulative for row in rows], color="tab:red", marker=".",
                  label="cumulative bound")
        if self.lower is not None and self.lower > 0:
            axes.axhline(self.lower, color="tab:green", linestyle="--", label="lower bound (model)")
        styles = {"chain": "tab:orange", "conv_sdp": "tab:green", "sdp": "tab:purple"}
        for run in self.ladder:
            if run.method in styles and run.upper is not None:
                axes.axhline(run.upper, color=styles[run.method], linestyle=":",
                             label=f"{run.method} bound (whole model)")
        axes.set_xticks(list(positions))
        axes.set_xticklabels([row.name for row in rows], rotation=90, fontsize=6)
        if log and all(row.bound > 0 for row in rows):
            axes.set_yscale("log")
        axes.set_ylabel("Lipschitz bound (L2)")
        axes.set_title(f"{title or 'Lipschitz bound of each layer'}\nwhole model: upper bound {self.upper:.4g} "
                       f"({self.method})" + ("" if self.lower is None else f", lower bound {self.lower:.4g}"),
                       fontsize=10)
        axes.legend(fontsize=8)
        figure.tight_layout()
        if path is not None:
            figure.savefig(path, dpi=120)
        return figure

    def __post_init__(self):
        if not (math.isfinite(self.upper) and self.upper >= 0):
            raise ValueError(f"certificate bound must be finite and non-negative, got {self.upper!r}")
