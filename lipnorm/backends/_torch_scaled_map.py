"""``y = A_W(x) / sigma + b`` as one autograd Function: spectral normalization by output scaling.

``A_W(x/sigma)``-style normalization (torch's) forms ``W / sigma`` and differentiates through
it, a handful of elementwise passes over the weight per step. Since ``A_{W/s} = A_W / s``, the
same values and gradients come from scaling the output. With ``sigma = <u, A v>`` and ``u``,
``v`` held constant, ``d sigma/dW = D`` (``u v^T`` for a matrix), and with ``g = dL/dy``,
``g_s = g / sigma``, ``t = <g_s, A_W(x)> = <A_W^T(g_s), x>`` (the first form when the
input needs no gradient, from the kept unscaled output; else the second, from the input
gradient)::

    dL/dx = A_W^T(g_s)
    dL/dW = weight_grad(x, g_s) - (t / sigma) D
    dL/db = sum(g)

For a Linear layer with torch's matrix view, ``D = u v^T`` is one more "sample" (input ``v``,
output gradient ``-(t/sigma) u``), so the whole weight gradient is a single GEMM over
``N + 1`` rows. Otherwise ``D`` is added in place. No weight-sized temporary is formed.

Where the weight is smaller than the activations (most convolutions), scaling the output
costs more (several passes over activations) than scaling the weight. ``WeightScaledMap``
then computes ``A_{W_s}(x) + b`` with ``W_s = W / sigma`` in one native call, and with
``G`` the native weight gradient at ``W_s``::

    dL/dW = (G - <G, W_s> D) / sigma

with a weight-sized temporary ``W_s`` but no extra pass over activations.
``normalized_layer`` picks the cheaper of the two.

These formulas treat ``sigma`` as a number, so their results cannot be differentiated
again. When the backward is itself recorded (``create_graph=True``, as gradient penalties
do), both Functions instead differentiate the layer recomputed with ``sigma`` as a
function of ``W`` (``recorded_gradients``), which autograd can differentiate once more.
"""

from __future__ import annotations

import torch

from ._torch_layer_maps import ConvMap, LinearMap
from ._torch_sigma import MatrixView, SigmaView, inner


class OutputScaledMap(torch.autograd.Function):
    """``y = A_W(x) / sigma + b`` with the gradient of ``sigma = <u, A_W v>`` through ``W``.

    Parameters of ``apply``
    -----------------------
    x : torch.Tensor
        Batched input: ``(..., in_features)`` for ``LinearMap``, ``(N, C, *spatial)`` for ``ConvMap``.
    weight : torch.Tensor
        The unnormalized weight ``W``.
    bias : torch.Tensor or None
        Bias added after scaling.
    sigma : torch.Tensor
        0-d, ``<u, A_W v>`` at this ``W`` (clamped below by eps), no gradient.
    u, v : torch.Tensor
        The singular-vector estimates used for ``sigma`` (clones; constants).
    layer_map : LinearMap or ConvMap
    view : MatrixView or OperatorView
        What ``sigma`` is the norm of.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, sigma, u, v, layer_map, view):
        inv_sigma = sigma.reciprocal()
        unscaled = layer_map.apply(x, weight)
        y = unscaled * inv_sigma
        if bias is not None:
            y.add_(layer_map.bias_view(bias))
        # t = <g_s, A_W(x)> needs A_W(x) when no input gradient A_W^T(g_s) is computed.
        kept_output = unscaled if not x.requires_grad else None
        ctx.save_for_backward(x, weight, bias, sigma, u, v, kept_output)
        ctx.layer_map = layer_map
        ctx.view = view
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, sigma, u, v, kept_output = ctx.saved_tensors
        if torch.is_grad_enabled():
            return recorded_gradients(ctx, grad_out, x, weight, bias, sigma, u, v)
        inv_sigma = sigma.reciprocal()
        layer_map, view = ctx.layer_map, ctx.view
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        grad_scaled = grad_out * inv_sigma.to(grad_out.dtype)
        grad_x = grad_w = grad_b = None
        if needs_x:
            grad_x = layer_map.adjoint(grad_scaled, weight, x)
        if needs_w:
            if kept_output is not None:
                alpha = -inner(grad_scaled, kept_output) * inv_sigma
            elif grad_x is not None:
                alpha = -inner(grad_x, x) * inv_sigma
            else:
                alpha = -inner(layer_map.adjoint(grad_scaled, weight, x), x) * inv_sigma
            grad_w = _weight_grad_with_sigma_term(layer_map, view, x, grad_scaled, weight, u, v, alpha)
        if needs_b and ctx.has_bias:
            grad_b = layer_map.bias_grad(grad_out)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _weight_grad_with_sigma_term(layer_map, view, x, grad_scaled, weight, u, v, alpha):
    """Return ``weight_grad(x, grad_scaled) + alpha * d sigma/dW``."""
    if isinstance(layer_map, LinearMap) and isinstance(view, MatrixView) and view.dim == 0:
        dtype = grad_scaled.dtype
        rows_in = torch.cat([x.reshape(-1, weight.shape[1]), v.to(dtype).unsqueeze(0)])
        rows_grad = torch.cat([grad_scaled.reshape(-1, weight.shape[0]), (u * alpha).to(dtype).unsqueeze(0)])
        return layer_map.weight_grad(rows_in, rows_grad, weight)
    grad_w = layer_map.weight_grad(x, grad_scaled, weight)
    view.add_sigma_grad_(grad_w, u, v, alpha)
    return grad_w


class WeightScaledMap(torch.autograd.Function):
    """``y = A_{W/sigma}(x) + b`` with the gradient of ``sigma = <u, A_W v>`` through ``W``.

    Same arguments as ``OutputScaledMap``; cheaper when ``W`` is smaller than ``x``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, sigma, u, v, layer_map, view):
        scaled_weight = weight * sigma.reciprocal().to(weight.dtype)
        ctx.save_for_backward(x, weight, bias, scaled_weight, sigma, u, v)
        ctx.layer_map = layer_map
        ctx.view = view
        return layer_map.apply(x, scaled_weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, scaled_weight, sigma, u, v = ctx.saved_tensors
        if torch.is_grad_enabled():
            return recorded_gradients(ctx, grad_out, x, weight, bias, sigma, u, v)
        inv_sigma = sigma.reciprocal()
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        grad_x, grad_w, grad_b = ctx.layer_map.backward(grad_out, x, scaled_weight, (needs_x, needs_w, needs_b))
        if needs_w:
            ctx.view.add_sigma_grad_(grad_w, u, v, -inner(grad_w, scaled_weight))
            grad_w.mul_(inv_sigma.to(grad_w.dtype))
        return grad_x, grad_w, grad_b, None, None, None, None, None


def recorded_gradients(ctx, grad_out, x, weight, bias, sigma, u, v):
    """Return the gradients of ``A_{W/sigma}(x) + b`` as a graph autograd can differentiate again.

    Used by the backward of ``OutputScaledMap`` and ``WeightScaledMap`` when it is recorded
    (``create_graph=True``). The layer is recomputed with ``sigma`` as a function of ``W``:
    ``sigma + (s - s.detach())`` with ``s = <u, A_W v>`` has the forward's value (eps clamp
    included) and the gradient ``d<u, A_W v>/dW`` (``u``, ``v`` held constant), to every
    order since ``s`` is linear in ``W``, so the result equals torch's ``W / sigma``.

    Parameters
    ----------
    ctx
        The Function's context (``layer_map``, ``view``, ``needs_input_grad``).
    grad_out : torch.Tensor
        Gradient of the loss with respect to the layer's output.
    x, weight, bias, sigma, u, v : torch.Tensor
        The forward's arguments (``bias`` may be None).

    Returns
    -------
    tuple
        One entry per argument of ``apply``: the gradients of ``x``, ``weight``, ``bias``
        where needed, None elsewhere.
    """
    estimate = inner(u, ctx.view.matvec(ctx.view.operand(weight.to(u.dtype)), v))
    differentiable_sigma = sigma + (estimate - estimate.detach())
    y = ctx.layer_map.apply(x, weight / differentiable_sigma.to(weight.dtype), bias)
    needs = ctx.needs_input_grad[:3]
    wanted = [tensor for tensor, needed in zip((x, weight, bias), needs) if needed]
    grads = iter(torch.autograd.grad(y, wanted, grad_out, create_graph=True))
    return tuple(next(grads) if needed else None for needed in needs) + (None,) * 5


def normalized_layer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     sigma: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                     layer_map: LinearMap | ConvMap, view: SigmaView) -> torch.Tensor:
    """Return ``A_W(x) / sigma + b``, scaling the weight or the output, whichever is smaller.

    Autocast is honoured like ``F.linear`` / ``F.conv*d`` do: the input, weight and bias are
    cast to the autocast dtype while ``sigma``, ``u``, ``v`` stay in float32.
    """
    function = WeightScaledMap if weight.numel() <= x.numel() else OutputScaledMap
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return function.apply(x, weight, bias, sigma, u, v, layer_map, view)
    return function.apply(x, weight, bias, sigma, u, v, layer_map, view)
