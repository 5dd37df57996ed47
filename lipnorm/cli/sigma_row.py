"""One row of ``lipnorm sigma``: what was measured on a tensor, as the table and JSON show it."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MEASURES", "SigmaRow"]

#: What a row measures: by the number of axes of its tensor, or "stack" (``--stack``) or
#: "conv operator" (``--input-size``).
MEASURES = {1: "vector", 2: "matrix", 3: "reshaped", 4: "reshaped", 5: "reshaped"}


@dataclass(frozen=True)
class SigmaRow:
    """One measured tensor: what ``lipnorm sigma`` prints per row (and writes with --json).

    ``measure`` says which linear map σ is of: ``"vector"``, ``"matrix"``, ``"reshaped"``
    (a 3-D to 5-D tensor as the matrix ``(shape[0], -1)``: for a conv kernel, what torch's
    spectral norm normalizes), ``"stack"`` (``--stack``: each matrix of the last two axes;
    ``sigma`` is their maximum, ``sigmas``, ``frobenius_norms`` and ``stable_ranks`` are
    nested lists of shape ``shape[:-2]``, one value per matrix, and ``lower``/``upper``
    certify the maximum) or ``"conv operator"`` (the
    convolution on ``input_shape``, with the geometry given on the command line: certified
    bounds only, ``sigma`` is None). ``dtype`` is the stored dtype; floats narrower than
    float32 are measured widened to float32, which is exact. ``dequantized`` says how a
    scale tensor was applied (see :mod:`lipnorm.weights_io`). ``rtol`` is the relative error
    allowed to the estimate ``sigma``; ``frobenius`` and ``stable_rank`` (``frobenius**2 /
    sigma**2``) are of the measured matrix.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    measure: str
    rtol: float
    dequantized: str | None = None
    input_shape: tuple[int, ...] | None = None
    sigma: float | None = None
    lower: float | None = None
    upper: float | None = None
    method: str | None = None
    bounds_method: str | None = None
    converged: bool | None = None
    sigma_seconds: float | None = None
    bounds_seconds: float | None = None
    frobenius: float | None = None
    stable_rank: float | None = None
    sigmas: list | None = None
    frobenius_norms: list | None = None
    stable_ranks: list | None = None
    error: str | None = None
