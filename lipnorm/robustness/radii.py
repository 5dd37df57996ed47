"""Per-sample certified L2 radii and certified accuracy of a classifier.

If every logit difference f_c − f_j is L_cj-Lipschitz, the prediction c at x cannot change
within r(x) = min_{j≠c} (f_c(x) − f_j(x)) / L_cj. The bounds L_cj come from
:func:`lipnorm.robustness.logit_bounds` (certified once per model); every sample then costs
one evaluation of the model and a few float64 operations.

Rounding, so that a radius is never larger than the certificate allows:

* the model is evaluated in its own dtype; its evaluation error is taken to be at most
  ``E = EVALUATION_TOLERANCE[dtype] · (1 + max_j |f_j(x)|)`` per logit (a stated bound, see
  :data:`lipnorm.robustness.evaluate.EVALUATION_TOLERANCE`), at x and at every point of the
  ball, so each margin is reduced by 2E;
* the margin, its reduction and the division by L_cj are rounded down in float64;
* inputs given in a wider dtype than the model's are rounded to it first, and the distance
  that rounding moved them is subtracted from the radius.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from lipnorm.certify.inputs import check_input_shape
from lipnorm.robustness.bounds import LogitBounds, logit_bounds
from lipnorm.robustness.evaluate import EVALUATION_TOLERANCE, evaluate_logits, input_dtype, to_numpy

__all__ = ["CertifiedPredictions", "certified_accuracy", "certified_predictions", "certified_radius",
           "radii_from_logits"]

BOUNDS = ("pairwise", "global")


@dataclass(frozen=True)
class CertifiedPredictions:
    """A model's predictions on a batch with their certified radii.

    Attributes
    ----------
    radii : ndarray, shape (N,)
        Certified L2 radius of each prediction (0 where misclassified, when labels were
        given, and where the margin is within the evaluation error).
    predicted : ndarray of int64, shape (N,)
    logits : ndarray, shape (N, classes), float64
        The model's outputs, computed in its own dtype.
    labels : ndarray of int64 or None
    bounds : LogitBounds
    inputs : ndarray
        The inputs as the model saw them (in its dtype).
    moved : ndarray, shape (N,)
        How far (L2, rounded up) casting the given inputs to the model's dtype moved them.
    """

    radii: np.ndarray
    predicted: np.ndarray
    logits: np.ndarray
    labels: np.ndarray | None
    bounds: LogitBounds
    inputs: np.ndarray
    moved: np.ndarray

    def radii_with(self, pairwise: np.ndarray) -> np.ndarray:
        """The radii these predictions get from other pairwise bounds (e.g. the global form)."""
        radii, _ = radii_from_logits(self.logits, pairwise, EVALUATION_TOLERANCE[self.inputs.dtype.name],
                                     self.labels)
        return np.maximum(np.nextafter(radii - self.moved, -np.inf), 0.0)

    def accuracy(self, eps) -> float | np.ndarray:
        """Share of samples certified at each ``eps`` (radius > eps, and correct with labels)."""
        eps = check_eps(eps)
        shares = (self.radii[:, None] > eps.reshape(-1)[None, :]).mean(axis=0)
        return float(shares[0]) if eps.ndim == 0 else shares.reshape(eps.shape)


def certified_radius(model, x, y=None, *, bounds: LogitBounds | None = None, bound: str = "pairwise",
                     method: str = "auto", time_budget: float = 10.0, rules=None, batch_size: int = 256,
                     progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Certified L2 radius of a classifier's prediction at each input.

    No input within distance ``radii[i]`` of ``x[i]`` (strictly) changes the predicted class,
    for the network computed exactly from its weights; the rounding of the evaluation is
    accounted for as described in :mod:`lipnorm.robustness.radii`.

    Parameters
    ----------
    model : torch.nn.Module, keras.Model, onnx.ModelProto or path to a .onnx file
        A classifier (at least two outputs), in inference mode.
    x : array_like, shape (N, *input_shape)
        Inputs in the model's layout (channels first for torch and ONNX); NumPy, torch,
        TensorFlow or JAX arrays.
    y : array_like of int, shape (N,), optional
        Labels: the radius is 0 where the prediction is wrong.
    bounds : LogitBounds, optional
        Bounds from :func:`lipnorm.robustness.logit_bounds` (computed here when omitted;
        pass them to reuse them across calls).
    bound : {"pairwise", "global"}
        ``"pairwise"`` (default): min_j margin_j / L_cj. ``"global"``: the form other
        libraries use, (f_c − max_{j≠c} f_j) / (√2 L) with L the bound of the whole output.
    method, time_budget, rules
        Passed to :func:`lipnorm.certify` when the bounds are computed here.
    batch_size : int
        Inputs per model evaluation.
    progress : callable, optional
        Called as ``progress(done, total)`` after each batch.

    Returns
    -------
    ndarray, shape (N,), float64

    Raises
    ------
    NotCertifiableError
        For a model :func:`lipnorm.certify` refuses (same message).
    ValueError
        For NaN/Inf inputs, inputs of the wrong shape, labels out of range or of the wrong
        length, a model with one output, an unknown ``bound``.
    TypeError
        For inputs or labels that are not arrays of real numbers (labels: integers).

    Example
    -------
    >>> radii = lipnorm.certified_radius(net, images, labels)         # doctest: +SKIP
    """
    return certified_predictions(model, x, y, bounds=bounds, bound=bound, method=method,
                                 time_budget=time_budget, rules=rules, batch_size=batch_size,
                                 progress=progress).radii


def certified_accuracy(model, x, y, eps, **options) -> float | np.ndarray:
    """Share of inputs whose prediction is correct and certified beyond ``eps`` (L2).

    A sample counts at ``eps`` when it is classified correctly and its certified radius is
    larger than ``eps``; at ``eps = 0`` that is the clean accuracy, apart from samples whose
    margin is within the evaluation error. The bounds are computed once for all ``eps``.

    Parameters
    ----------
    model, x, y
        As for :func:`certified_radius` (labels required).
    eps : float or array_like of float
        Radii, each >= 0.
    **options
        ``bounds``, ``bound``, ``method``, ``time_budget``, ``rules``, ``batch_size``,
        ``progress`` as for :func:`certified_radius`.

    Returns
    -------
    float, or ndarray of the shape of ``eps``

    Raises
    ------
    ValueError
        For ``eps < 0`` or NaN, and as :func:`certified_radius`.
    """
    check_eps(eps)
    if y is None:
        raise ValueError("certified_accuracy needs the labels y")
    return certified_predictions(model, x, y, **options).accuracy(eps)


def certified_predictions(model, x, y=None, *, bounds: LogitBounds | None = None, bound: str = "pairwise",
                          method: str = "auto", time_budget: float = 10.0, rules=None,
                          batch_size: int = 256, progress=None) -> CertifiedPredictions:
    """Predictions, logits and radii in one pass; the arguments are those of :func:`certified_radius`."""
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")
    inputs, moved = model_inputs(model, x, bounds)
    if bounds is None:
        classes = evaluate_logits(model, inputs[:1]).shape[1]
        check_classes(classes)
        bounds = logit_bounds(model, inputs.shape[1:], classes, method=method, time_budget=time_budget,
                              rules=rules)
    logits = evaluate_logits(model, inputs, batch_size=batch_size, progress=progress)
    if logits.shape[1] != bounds.classes:
        raise ValueError(f"the model has {logits.shape[1]} outputs, the bounds are for {bounds.classes}")
    labels = None if y is None else check_labels(y, len(inputs), bounds.classes)
    found = CertifiedPredictions(np.zeros(len(inputs)), np.argmax(logits, axis=1).astype(np.int64), logits,
                                 labels, bounds, inputs, moved)
    pairwise = bounds.pairwise if bound == "pairwise" else bounds.global_pairwise()
    return replace(found, radii=found.radii_with(pairwise))


def radii_from_logits(logits: np.ndarray, pairwise: np.ndarray, tolerance: float,
                      labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Certified radii from logits and pairwise bounds, rounded down.

    Parameters
    ----------
    logits : ndarray, shape (N, classes), float64
    pairwise : ndarray, shape (classes, classes)
        ``pairwise[c, j]`` bounds the Lipschitz constant of ``f_c − f_j``.
    tolerance : float
        Evaluation error per logit, relative to ``1 + max_j |f_j|``.
    labels : ndarray of int, shape (N,), optional

    Returns
    -------
    radii : ndarray, shape (N,)
    predicted : ndarray of int64, shape (N,)
    """
    predicted = np.argmax(logits, axis=1).astype(np.int64)
    rows = np.arange(len(logits))
    error = np.nextafter(2 * tolerance * (1 + np.max(np.abs(logits), axis=1, initial=0.0)), np.inf)
    margins = np.nextafter(logits[rows, predicted][:, None] - logits, -np.inf)
    margins = np.nextafter(margins - error[:, None], -np.inf)
    scale = pairwise[predicted]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(scale > 0, np.nextafter(margins / scale, -np.inf), np.where(margins > 0, np.inf, 0.0))
    ratios[rows, predicted] = np.inf
    radii = np.maximum(np.min(ratios, axis=1), 0.0)
    if labels is not None:
        radii = np.where(predicted == labels, radii, 0.0)
    return radii, predicted


def model_inputs(model, x, bounds: LogitBounds | None = None) -> tuple[np.ndarray, float]:
    """``x`` in the model's dtype and checked; and how far (L2, rounded up) the cast moved it.

    Raises
    ------
    ValueError
        For NaN/Inf, fewer than two axes, samples of another shape than ``bounds`` hold for,
        or of a shape the model does not take (see :func:`lipnorm.certify.inputs.check_input_shape`).
    TypeError
        For a non-numeric array.
    """
    given = to_numpy(x, "x")
    if given.ndim < 2 or len(given) == 0:
        raise ValueError(f"x must be a non-empty batch (N, *input_shape), got shape {given.shape}")
    if not np.all(np.isfinite(given)):
        sample = int(np.argwhere(~np.isfinite(given.reshape(len(given), -1)))[0, 0])
        raise ValueError(f"x contains NaN or Inf (first at sample {sample})")
    if bounds is not None and tuple(given.shape[1:]) != bounds.input_shape:
        raise ValueError(f"the bounds hold for inputs of shape {bounds.input_shape}, "
                         f"x has samples of shape {tuple(given.shape[1:])}")
    check_input_shape(model, given.shape[1:], "x has samples of shape")
    inputs = given.astype(input_dtype(model), copy=False)
    flat = (given.astype(np.float64) - inputs.astype(np.float64)).reshape(len(given), -1)
    distance = np.linalg.norm(flat, axis=1)
    moved = np.where(distance > 0, np.nextafter(distance * (1 + 2.0**-40), np.inf), 0.0)
    return inputs, moved


def check_labels(y, count: int, classes: int) -> np.ndarray:
    """Labels as int64, checked against the number of samples and of classes."""
    labels = to_numpy(y, "y")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels y must be integers (class indices), got dtype {labels.dtype}")
    if labels.shape != (count,):
        raise ValueError(f"labels y must have shape ({count},) for {count} samples, got {labels.shape}")
    outside = (labels < 0) | (labels >= classes)
    if outside.any():
        index = int(np.argmax(outside))
        raise ValueError(f"label {int(labels[index])} at sample {index} is out of range for a model "
                         f"with {classes} outputs (0..{classes - 1})")
    return labels.astype(np.int64)


def check_classes(classes: int) -> None:
    """Refuse a model with fewer than two outputs: it is not a classifier."""
    if classes < 2:
        raise ValueError(f"the model has {classes} output; certified radii need a classifier "
                         "with at least 2 logits (one per class)")


def check_eps(eps) -> np.ndarray:
    """``eps`` as a float64 array, each finite and >= 0."""
    values = np.asarray(eps, dtype=np.float64)
    if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    return values
