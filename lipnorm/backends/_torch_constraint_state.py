"""A spectral constraint's warm starts: between :class:`lipnorm.SigmaState` and its ``state_dict``.

The constraint keeps one :class:`lipnorm.SigmaState` per group of same-shaped matrices (from
``estimate_sigma(stack, batched=True)``) and one per convolution in operator mode. Only the
vectors ``u`` and ``v`` start the next estimate, so only they are saved, by parameter name:
``(count, m)`` and ``(count, n)`` for a matrix or a stack of ``count`` matrices, the
operator's flattened output and input sizes for a convolution.
"""

from __future__ import annotations

import numpy as np
import torch

from lipnorm.sigma import SigmaState

from ._torch_constraint_targets import Target

__all__ = ["split_group_state", "validated_vectors"]


def split_group_state(state: SigmaState, counts: list[int]) -> list[dict[str, torch.Tensor]]:
    """The vectors of a group's batched state, one ``{"u", "v"}`` pair per target (copies)."""
    return [{"u": u.clone(), "v": v.clone()}
            for u, v in zip(torch.split(state.u, counts), torch.split(state.v, counts))]


def _expected_shapes(target: Target) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if target.kind == "operator":
        m, n = target.operator().shape
        return (m,), (n,)
    m, n = target.matrix_shape
    return (target.count, m), (target.count, n)


def validated_vectors(targets: list[Target], vectors: dict) -> SigmaState | None:
    """The state of ``targets`` (a group, or one convolution) rebuilt from saved vectors.

    Returns
    -------
    SigmaState or None
        None where no target of the group has saved vectors (the next step starts cold).

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
        for role, expected in zip(("u", "v"), _expected_shapes(target)):
            vector = pair.get(role) if isinstance(pair, dict) else None
            if not isinstance(vector, torch.Tensor) or tuple(vector.shape) != expected:
                shape = tuple(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__
                raise ValueError(f"the state's {role} of {target.name!r} has shape {shape}, expected {expected}")
        device = target.param.device
        us.append(pair["u"].to(device))
        vs.append(pair["v"].to(device))
    if targets[0].kind == "operator":
        return SigmaState(us[0], vs[0], float("nan"), float("nan"), float("nan"), False, 0, 0, "lanczos")
    count = sum(target.count for target in targets)
    unknown = np.full(count, np.nan)
    return SigmaState(torch.cat(us), torch.cat(vs), unknown, unknown, unknown, np.zeros(count, dtype=bool),
                      np.zeros(count, dtype=np.int64), np.zeros(count, dtype=np.int64), "lanczos")
