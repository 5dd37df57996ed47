"""A spectral constraint's warm starts: between :class:`lipnorm.SigmaState` and its ``state_dict``.

The constraint keeps, per group of same-shaped matrices, the vectors that start the next
batched :func:`lipnorm.estimate_sigma`, and one :class:`lipnorm.SigmaState` per convolution
in operator mode. Only the vectors ``u`` and ``v`` start an estimate, so only they are saved,
by parameter name: ``(count, p)`` and ``(count, q)`` for a matrix or a stack of ``count``
matrices (``p = m``, ``q = n`` with the hammer projection, which estimates the matrices;
``p = q = min(m, n)`` with scaling, which estimates their Gram matrices), the operator's
flattened output and input sizes for a convolution.
"""

from __future__ import annotations

import numpy as np
import torch

from lipnorm.sigma import SigmaState

from ._torch_constraint_targets import Target

__all__ = ["split_vectors", "state_of_vectors", "validated_vectors"]


def state_of_vectors(u: torch.Tensor, v: torch.Tensor) -> SigmaState:
    """A :class:`lipnorm.SigmaState` that starts the next estimate from ``u`` and ``v``
    (1-D: one operator; 2-D: a stack). Its numbers are unknown (NaN): only the vectors are kept."""
    if u.ndim == 1:
        return SigmaState(u, v, float("nan"), float("nan"), float("nan"), False, 0, 0, "lanczos")
    count = u.shape[0]
    unknown = np.full(count, np.nan)
    zeros = np.zeros(count, dtype=np.int64)
    return SigmaState(u, v, unknown, unknown, unknown, np.zeros(count, dtype=bool), zeros, zeros, "lanczos")


def split_vectors(vectors: tuple[torch.Tensor, torch.Tensor], counts: list[int]) -> list[dict[str, torch.Tensor]]:
    """A group's vectors as one ``{"u", "v"}`` pair (copies) per target."""
    u, v = vectors
    return [{"u": a.clone(), "v": b.clone()} for a, b in zip(torch.split(u, counts), torch.split(v, counts))]


def validated_vectors(targets: list[Target], vectors: dict, shapes) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The vectors of ``targets`` (a group, or one convolution) from a saved ``vectors`` dict.

    Parameters
    ----------
    targets : list of Target
    vectors : dict
        ``name -> {"u": Tensor, "v": Tensor}``.
    shapes : callable
        ``shapes(target)`` gives the expected shapes of its ``u`` and ``v``.

    Returns
    -------
    (u, v) or None
        The targets' vectors concatenated, on the parameters' device; None where no target
        of the group has saved vectors (the next step starts cold).

    Raises
    ------
    ValueError
        Some targets of the group have vectors and others not, or a vector has the wrong shape.
    """
    present = [target.name in vectors for target in targets]
    if not any(present):
        return None
    if not all(present):
        missing = [target.name for target, found in zip(targets, present) if not found]
        raise ValueError(f"the state has no vectors for {missing}, estimated together with "
                         f"{[t.name for t, found in zip(targets, present) if found]}")
    us, vs = [], []
    for target in targets:
        pair = vectors[target.name]
        for role, expected in zip(("u", "v"), shapes(target)):
            vector = pair.get(role) if isinstance(pair, dict) else None
            if not isinstance(vector, torch.Tensor) or tuple(vector.shape) != tuple(expected):
                shape = tuple(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__
                raise ValueError(f"the state's {role} of {target.name!r} has shape {shape}, expected "
                                 f"{tuple(expected)}; was it saved with another projection or model?")
        us.append(pair["u"].to(target.param.device))
        vs.append(pair["v"].to(target.param.device))
    return torch.cat(us), torch.cat(vs)
