"""Certified upper bounds of sigma_max for a stack of torch matrices, computed where they live.

The proof is the Cholesky certificate of :mod:`lipnorm.certificates`, with its rounding
analysis taken from there (:func:`lipnorm.certificates.gram_formation_error` and
:func:`lipnorm.certificates.cholesky_rounding_bound`, the one place the formula lives): with
``G`` the Gram matrix of a matrix's smaller side, formed in float64, a floating-point
Cholesky factorization ``R`` of ``fl(t I - G)`` that succeeds proves
``lambda_max(G_exact) <= t + delta`` with

    delta = gamma_{d+1} ||R||_F^2 + ||G - G_exact|| + 2u (t + max|G_ii|) + d * inner * 2^-1074

(Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., Thm 10.3 and §3.5),
so ``sigma_max <= sqrt(t + delta)``.

What differs from :func:`lipnorm.sigma_bounds` (and why this module exists beside it) is
where the arithmetic runs and which question it answers. :mod:`lipnorm.certificates` copies
the matrices to the host and computes a tight interval (an exact top eigenvalue, then a
factorization just above it, and a certified lower bound); the constraint needs, every
training step, only an upper bound against a level it already knows. Here the Gram
matrices and their factorizations run in torch, in float64, batched over the stack, on the
weights' own device (MKL on a CPU, cuBLAS and cuSOLVER on a GPU; both conventional,
non-Strassen, as the bound requires; no copy of the weights leaves the device), as a *test
against a level*: one factorization per matrix proves ``sigma_max <= level`` without first
computing sigma to ten digits, and no lower bound is computed. A matrix that fails the test
gets a tight bound from :func:`certified_upper`. Only a few numbers per matrix go to the host,
where the rounding terms are evaluated.

A float64 matrix is first scaled by a power of two that brings its largest entry into
[0.5, 1) (exact, unless it creates subnormals, whose rounding is added as an absolute slack,
as in :mod:`lipnorm.certificates`), so its float64 Gram matrix neither overflows nor
underflows; narrower weights need no scaling (see :func:`gram_stack`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import torch

from lipnorm.certificates import cholesky_rounding_bound, gram_formation_error, scaling_slack
from lipnorm.certify.rounding import UNIT_ROUNDOFF, gamma
from lipnorm.sigma import ConvergenceWarning, estimate_sigma

__all__ = ["GramStack", "certified_upper", "certify_levels", "gram_stack"]

#: Gram matrices up to this size get their top eigenvalue from a dense eigensolver,
#: larger ones from Lanczos (as in :mod:`lipnorm.certificates`).
_DENSE_EIGENVALUE_LIMIT = 256


@dataclasses.dataclass
class GramStack:
    """The scaled float64 Gram matrices of a stack, and what bounds their rounding.

    Attributes
    ----------
    gram : torch.Tensor, float64, shape (batch, d, d)
        ``fl(A A^T)`` or ``fl(A^T A)`` of each scaled matrix ``A = scale * W``, whichever
        is smaller; ``d = min(m, n)``.
    formation_error : numpy.ndarray, float64, shape (batch,)
        Bound on the spectral norm of ``gram - A A^T`` (``gamma_{inner+2} ||A||_F^2``).
    squares : numpy.ndarray, float64, shape (batch,)
        Upper bound of ``||A||_F^2`` (from the trace of ``gram``).
    scale : numpy.ndarray, float64, shape (batch,)
        The power of two each matrix was multiplied by.
    slack : numpy.ndarray, float64, shape (batch,)
        Absolute bound (in sigma) of what scaling rounded into the subnormal range.
    inner : int
        Inner length of the Gram products, ``max(m, n)``.
    """

    gram: torch.Tensor
    formation_error: np.ndarray
    squares: np.ndarray
    scale: np.ndarray
    slack: np.ndarray
    inner: int

    def __len__(self) -> int:
        return self.gram.shape[0]

    def subset(self, index: np.ndarray) -> "GramStack":
        """The matrices at positions ``index`` (an integer array)."""
        rows = torch.as_tensor(index, device=self.gram.device)
        return GramStack(self.gram[rows], self.formation_error[index], self.squares[index],
                         self.scale[index], self.slack[index], self.inner)

    def frobenius_upper(self) -> np.ndarray:
        """Certified ``||W_i||_F`` of every (unscaled) matrix."""
        return self.unscaled_upper(self.squares)

    def unscaled_upper(self, squared: np.ndarray) -> np.ndarray:
        """A certified sigma bound from a certified bound ``squared`` on ``lambda_max(gram)``."""
        root = np.sqrt(squared) * (1.0 + 4 * UNIT_ROUNDOFF)
        return (root / self.scale + self.slack) * (1.0 + 4 * UNIT_ROUNDOFF)


def gram_stack(matrices) -> GramStack:
    """Form the smaller Gram matrix of each matrix in float64, scaled where float64 needs it.

    Weights of float32 or narrower are exact in float64 and their Gram matrices can neither
    overflow (entries below 2^128, sums of fewer than 2^31 terms) nor underflow (products of
    nonzero entries at least 2^-298): they are used unscaled. Float64 matrices are first
    multiplied by the power of two that brings their largest entry into [0.5, 1).

    Parameters
    ----------
    matrices : torch.Tensor of shape (batch, m, n), or sequence of torch.Tensor of shape (m, n)
        Real floating matrices, finite (the caller checks), on one device; a sequence (views
        of several parameters) is copied once, straight into the float64 stack.

    Returns
    -------
    GramStack
    """
    with torch.no_grad():
        if isinstance(matrices, torch.Tensor):
            source_dtype = matrices.dtype
            scaled = matrices.detach().to(torch.float64)
        else:
            source_dtype = matrices[0].dtype
            scaled = matrices[0].new_empty((len(matrices), *matrices[0].shape), dtype=torch.float64)
            for slot, matrix in zip(scaled, matrices):
                slot.copy_(matrix.detach())
        batch, m, n = scaled.shape
        scale = np.ones(batch)
        if source_dtype == torch.float64:
            exponents = torch.frexp(scaled.abs().amax(dim=(-2, -1))).exponent.tolist()
            scale = np.array([math.ldexp(1.0, -max(e, -1022)) for e in exponents])
            scaled.mul_(torch.as_tensor(scale, dtype=torch.float64, device=scaled.device)[:, None, None])
        gram = scaled @ scaled.mT if m <= n else scaled.mT @ scaled
        trace = gram.diagonal(dim1=-2, dim2=-1).sum(dim=-1).cpu().numpy()
    # The diagonal of the computed Gram matrix holds the squared row (or column) norms, each
    # within gamma_{inner+1} (relative) of the exact one; the trace adds gamma_d.
    d, inner = min(m, n), max(m, n)
    squares = trace * (1.0 + gamma(inner + d + 2))
    formation_error = gram_formation_error(squares, inner=inner)
    slack = scaling_slack(scale, m, n)  # what scaling down rounded into the subnormal range
    return GramStack(gram, formation_error, squares, scale, slack, inner)


def _margin(grams: GramStack) -> float:
    """A relative margin above what the rounding term ``delta`` of a factorization can be
    (``delta / t`` is at most about ``2 d (d + inner) u``)."""
    d = grams.gram.shape[-1]
    return 4.0 * (d + 1) * (d + grams.inner) * UNIT_ROUNDOFF


def _cholesky_bounds(grams: GramStack, levels: np.ndarray) -> np.ndarray:
    """Per matrix, a certified bound ``t + delta`` on ``lambda_max`` of the exact scaled Gram
    matrix from a factorization of ``fl(t I - gram)`` at ``t = levels``, or ``inf`` where the
    factorization failed (``t`` below ``lambda_max``, or too close to it for the rounding).

    Parameters
    ----------
    grams : GramStack
    levels : numpy.ndarray, float64, shape (batch,)
        Positive shifts ``t``.
    """
    gram = grams.gram
    d = gram.shape[-1]
    with torch.no_grad():
        shift = torch.as_tensor(levels, dtype=torch.float64, device=gram.device)
        shifted = torch.diag_embed(shift.unsqueeze(-1).expand(-1, d)) - gram
        factor, info = torch.linalg.cholesky_ex(shifted)
        factor_squares = torch.linalg.vector_norm(factor, dim=(-2, -1)).square()
        diagonal = gram.diagonal(dim1=-2, dim2=-1).abs().amax(dim=-1)
        host = torch.stack([factor_squares, diagonal, info.to(torch.float64)]).cpu().numpy()
    factor_squares, diagonal, info = host
    passed = (info == 0) & np.isfinite(factor_squares)
    with np.errstate(invalid="ignore"):  # NaN factors are rejected by ``passed``
        delta = cholesky_rounding_bound(factor_squares, diagonal, levels, grams.formation_error,
                                        dimension=d, inner=grams.inner)
    return np.where(passed, (levels + delta) * (1.0 + 4 * UNIT_ROUNDOFF), np.inf)


def certify_levels(grams: GramStack, levels: np.ndarray) -> np.ndarray:
    """Test ``sigma_max(W_i) <= levels[i]`` for every matrix of the stack, one factorization each.

    Parameters
    ----------
    grams : GramStack
        From :func:`gram_stack`.
    levels : numpy.ndarray, float64, shape (batch,)
        Positive sigma levels.

    Returns
    -------
    numpy.ndarray, float64, shape (batch,)
        A certified upper bound of ``sigma_max(W_i)`` that is at most ``levels[i]`` where
        the test passed, ``inf`` where it did not (sigma is above the level, or within
        about ``1e-9`` relative of it).
    """
    target = (np.asarray(levels, dtype=np.float64) - grams.slack) * grams.scale
    squared = np.square(np.maximum(target, 0.0)) / (1.0 + 2 * _margin(grams))
    upper = grams.unscaled_upper(_cholesky_bounds(grams, squared))
    return np.where(upper <= levels, upper, np.inf)


def _top_eigenvalues(gram: torch.Tensor) -> np.ndarray:
    """Estimates of the largest eigenvalue of each Gram matrix (dense or Lanczos, by size)."""
    if gram.shape[-1] <= _DENSE_EIGENVALUE_LIMIT:
        values = torch.linalg.eigvalsh(gram)[..., -1]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # only a starting threshold
            values = estimate_sigma(gram, batched=True, rtol=1e-12)
    return np.maximum(values.cpu().numpy().astype(np.float64), 0.0)


def certified_upper(grams: GramStack) -> np.ndarray:
    """A tight certified upper bound of ``sigma_max`` of every matrix of the stack.

    The threshold starts a little above an estimate of each Gram matrix's top eigenvalue
    and grows 16-fold in margin on each failed factorization (only the failed matrices are
    factored again), as in :func:`lipnorm.certificates.certify_gram_chunks`; a matrix still
    failing at a margin of 1 gets the Frobenius bound of its Gram matrix.

    Parameters
    ----------
    grams : GramStack

    Returns
    -------
    numpy.ndarray, float64, shape (batch,)
        ``sigma_max(W_i) <= result[i]``, typically within ``1e-9`` relative.
    """
    estimates = _top_eigenvalues(grams.gram)
    bounds = np.full(len(grams), np.inf)
    pending = np.arange(len(grams))
    margin = _margin(grams)
    while pending.size and margin < 1.0:
        subset = grams if pending.size == len(grams) else grams.subset(pending)
        levels = np.maximum(estimates[pending], np.finfo(np.float64).tiny) * (1.0 + margin)
        upper = subset.unscaled_upper(_cholesky_bounds(subset, levels))
        passed = np.isfinite(upper)
        bounds[pending[passed]] = upper[passed]
        pending = pending[~passed]
        margin *= 16.0
    if pending.size:
        subset = grams.subset(pending)
        d = subset.gram.shape[-1]
        with torch.no_grad():
            frobenius = torch.linalg.vector_norm(subset.gram, dim=(-2, -1)).cpu().numpy()
        squared = frobenius * (1.0 + gamma(d * d + 2)) + subset.formation_error
        bounds[pending] = subset.unscaled_upper(squared)
    return bounds
