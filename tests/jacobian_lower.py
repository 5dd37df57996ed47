"""A float64 lower bound on a torch model's Lipschitz constant for the soundness tests: the
largest ‖J(x)‖₂ found at seeded random inputs and by Adam ascent on it."""

from __future__ import annotations

import torch


def largest_jacobian_norm(model, shape, *, starts: int, steps: int, lr: float, seed: int = 0) -> float:
    """The largest ‖J(x)‖₂ over ``starts`` Gaussian inputs (scale 2) and ``steps`` Adam steps
    of learning rate ``lr`` on each: every value is the norm of a Jacobian, a lower bound."""
    generator = torch.Generator().manual_seed(seed)
    best = 0.0
    for _ in range(starts):
        x = (2 * torch.randn(shape, dtype=torch.float64, generator=generator)).requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=lr)
        for _ in range(steps):
            jacobian = torch.autograd.functional.jacobian(lambda t: model(t[None])[0], x, create_graph=True)
            norm = torch.linalg.matrix_norm(jacobian.reshape(jacobian.shape[0], -1), ord=2)
            best = max(best, float(norm.detach()))
            optimizer.zero_grad()
            (-norm).backward()
            optimizer.step()
    return best
