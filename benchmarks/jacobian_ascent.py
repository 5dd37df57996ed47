"""The reference lower bound: exact-Jacobian ascent from the data's best points (torch).

For a torch model with few outputs (the Jacobian is formed whole): every data point's
‖J(x)‖₂ is computed exactly (full Jacobian in float64, one backward pass per output, then its
largest singular value), the ``starts`` points where it is largest start an ascent of
``steps`` steps, and the largest ‖J(x)‖₂ met is the result. One step, at every start at
once: with (u, v) the top singular pair of J(x), propose x' = x + η·g/‖g‖ along the
gradient g of ⟨u, f(x + h v) − f(x)⟩ (h = 1e-3·max(‖x‖, 1): the gradient of σ(x) for a
smooth net, and it sees the activation changes near x of a ReLU net, where σ is piecewise
constant; a random direction where g = 0), clipped to the box of the data; keep x' if
‖J(x')‖₂ is larger and then grow η by 1.5, else shrink it by 0.6 (η starts at 0.1·‖x‖/√n).

‖J(x)‖₂ is the norm of the model's derivative at x as evaluated in float64 (a lower bound
of the Lipschitz constant where f is differentiable, which for a ReLU net is everywhere
but on a null set; to the evaluation's rounding, ~1e-12 relative).

Used by ``benchmarks/bench_tight.py`` as the yardstick of :func:`lipnorm.lipschitz_lower_bound`.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np

__all__ = ["JacobianAscent", "jacobian_ascent", "jacobian_norms"]


@dataclass(frozen=True)
class JacobianAscent:
    """The reference's result.

    Attributes
    ----------
    value : float
        The largest ‖J(x)‖₂ found.
    x : ndarray
        Where.
    data_best : float
        The largest ‖J(x)‖₂ over the data points themselves.
    seconds : float
    """

    value: float
    x: np.ndarray
    data_best: float
    seconds: float


def _float64(model):
    return copy.deepcopy(model).double().eval()


def jacobian_norms(model, x, chunk: int = 64):
    """‖J(x_i)‖₂ and the top singular pairs, exactly (full Jacobian + SVD, float64).

    Parameters
    ----------
    model : torch.nn.Module
        A float64 model in eval mode.
    x : torch.Tensor, float64, shape (batch, *input_shape)
    chunk : int
        Points per Jacobian evaluation.

    Returns
    -------
    sigma : torch.Tensor, shape (batch,)
    u : torch.Tensor, shape (batch, outputs)
    v : torch.Tensor, shape (batch, *input_shape)
    """
    import torch

    sigmas, us, vs = [], [], []
    for start in range(0, len(x), chunk):
        points = x[start:start + chunk].clone().requires_grad_(True)
        out = model(points).reshape(len(points), -1)
        rows = [torch.autograd.grad(out[:, k].sum(), points, retain_graph=k + 1 < out.shape[1])[0]
                for k in range(out.shape[1])]  # one forward pass, a backward pass per output
        jac = torch.stack(rows, 1).reshape(len(points), out.shape[1], -1)
        u, s, vh = torch.linalg.svd(jac, full_matrices=False)
        sigmas.append(s[:, 0])
        us.append(u[:, :, 0])
        vs.append(vh[:, 0, :].reshape(points.shape))
    return torch.cat(sigmas), torch.cat(us), torch.cat(vs)


def jacobian_ascent(model, inputs, starts: int = 64, steps: int = 60, seed: int = 0) -> JacobianAscent:
    """Exact-Jacobian ascent from the ``starts`` data points of largest ‖J(x)‖₂ (module docstring).

    Parameters
    ----------
    model : torch.nn.Module
        In eval mode; evaluated in a float64 copy.
    inputs : array_like, shape (batch, *input_shape)
        The data.
    starts, steps : int
    seed : int
        Seed of the random directions.

    Returns
    -------
    JacobianAscent
    """
    import torch

    began = time.perf_counter()
    model = _float64(model)
    data = torch.as_tensor(np.asarray(inputs), dtype=torch.float64)
    low, high = data.min(0).values, data.max(0).values
    sigma, _, _ = jacobian_norms(model, data)
    order = torch.argsort(sigma, descending=True)[:starts]
    data_best = float(sigma[order[0]])
    x = data[order].clone()
    generator = torch.Generator().manual_seed(seed)
    shape = (len(x),) + (1,) * (x.dim() - 1)

    def norms(a):
        return a.reshape(len(a), -1).norm(dim=1).reshape(shape)

    sigma, u, v = jacobian_norms(model, x)
    best, best_x = float(sigma.max()), x[int(sigma.argmax())].clone()
    step = torch.full(shape, 0.1) * norms(x).clamp(min=1.0) / np.sqrt(x[0].numel())
    for _ in range(steps):
        h = 1e-3 * norms(x).clamp(min=1.0)
        xr = x.clone().requires_grad_(True)
        secant = (u * (model(xr + h * v) - model(xr)).reshape(len(x), -1)).sum()
        (gradient,) = torch.autograd.grad(secant, xr)
        random = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        size = norms(gradient)
        direction = torch.where(size > 0, gradient / size.clamp(min=1e-300), random / norms(random))
        proposal = torch.minimum(torch.maximum(x + step * direction, low), high)
        new_sigma, new_u, new_v = jacobian_norms(model, proposal)
        better = new_sigma > sigma
        x = torch.where(better.reshape(shape), proposal, x)
        u = torch.where(better[:, None], new_u, u)
        v = torch.where(better.reshape(shape), new_v, v)
        sigma = torch.where(better, new_sigma, sigma)
        step = torch.where(better.reshape(shape), step * 1.5, step * 0.6)
        if float(sigma.max()) > best:
            best, best_x = float(sigma.max()), x[int(sigma.argmax())].clone()
    return JacobianAscent(best, best_x.numpy(), data_best, time.perf_counter() - began)
