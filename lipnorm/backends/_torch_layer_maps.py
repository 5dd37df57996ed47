"""The bias-free linear map of a Linear or convolution layer, with its adjoint and weight gradient.

A layer computes ``y = A_W(x) + b`` where ``A_W`` is linear in both the input ``x`` and the
weight ``W``. Spectral normalization by output scaling needs three things of ``A_W``: applying
it, applying its adjoint (the input gradient), and the weight gradient
``dW = d<g, A_W(x)>/dW``. This module gives them for ``nn.Linear`` (``LinearMap``) and for
``nn.Conv*d`` / ``nn.ConvTranspose*d`` (``ConvMap``), without materializing anything
weight-sized beyond the weight gradient itself.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class LinearMap(NamedTuple):
    """``A_W(x) = x W^T`` on the last axis; ``x`` has shape ``(..., in_features)``."""

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Return ``x W^T (+ bias)`` with shape ``(..., out_features)``."""
        return torch.nn.functional.linear(x, weight, bias)

    def backward(self, grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                 output_mask: tuple[bool, bool, bool]):
        """Return the gradients ``(input, weight, bias)`` of ``A_W(x) + b``; None where masked out."""
        needs_x, needs_w, needs_b = output_mask
        return (self.adjoint(grad_out, weight, x) if needs_x else None,
                self.weight_grad(x, grad_out, weight) if needs_w else None,
                self.bias_grad(grad_out) if needs_b else None)

    def adjoint(self, grad_out: torch.Tensor, weight: torch.Tensor, x_like: torch.Tensor) -> torch.Tensor:
        """Return ``grad_out W`` with shape ``(..., in_features)`` (``x_like`` is unused)."""
        return torch.matmul(grad_out, weight)

    def weight_grad(self, x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Return ``grad_out^T x`` summed over all leading axes, shape of ``weight``."""
        return torch.mm(grad_out.reshape(-1, weight.shape[0]).t(), x.reshape(-1, weight.shape[1]))

    def bias_view(self, bias: torch.Tensor) -> torch.Tensor:
        """Return ``bias`` shaped to broadcast against the output."""
        return bias

    def bias_grad(self, grad_out: torch.Tensor) -> torch.Tensor:
        """Return the gradient of the bias: ``grad_out`` summed over all leading axes."""
        return grad_out.reshape(-1, grad_out.shape[-1]).sum(0)


class ConvMap(NamedTuple):
    """A convolution (or transposed convolution) without bias, batched input ``(N, C, *spatial)``.

    The fields are the arguments of ``torch.convolution``; ``padding`` is integers per
    spatial axis (string paddings and non-zero padding modes are applied before, by the
    caller).
    """

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    transposed: bool
    output_padding: tuple[int, ...]
    groups: int

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Return the convolution of ``x`` with ``weight`` (``+ bias``)."""
        return torch.convolution(
            x, weight, bias, self.stride, self.padding, self.dilation,
            self.transposed, self.output_padding, self.groups,
        )

    def output_spatial_shape(self, input_spatial: tuple[int, ...], kernel_spatial: tuple[int, ...]
                             ) -> tuple[int, ...]:
        """Return the spatial shape of the output for an input of spatial shape ``input_spatial``."""
        shape = []
        for n, k, s, p, d, op in zip(input_spatial, kernel_spatial, self.stride, self.padding,
                                     self.dilation, self.output_padding):
            extent = d * (k - 1) + 1
            if self.transposed:
                shape.append((n - 1) * s - 2 * p + extent + op)
            else:
                shape.append((n + 2 * p - extent) // s + 1)
        return tuple(shape)

    def backward(self, grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                 output_mask: tuple[bool, bool, bool]):
        """Return the gradients ``(input, weight, bias)`` of the convolution plus bias, in one
        call; None where masked out."""
        grads = self._backward(grad_out, x, weight, output_mask, [grad_out.shape[1]] if output_mask[2] else None)
        return tuple(g if needed else None for g, needed in zip(grads, output_mask))

    def _backward(self, grad_out, x, weight, output_mask, bias_sizes=None):
        return torch.ops.aten.convolution_backward(
            grad_out, x, weight, bias_sizes, self.stride, self.padding, self.dilation,
            self.transposed, self.output_padding, self.groups, output_mask,
        )

    def adjoint(self, grad_out: torch.Tensor, weight: torch.Tensor, x_like: torch.Tensor) -> torch.Tensor:
        """Return the adjoint applied to ``grad_out``; the result has the shape of ``x_like``."""
        return self._backward(grad_out, x_like, weight, (True, False, False))[0]

    def weight_grad(self, x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Return ``d<grad_out, A_W(x)>/dW``, shape of ``weight``."""
        return self._backward(grad_out, x, weight, (False, True, False))[1]

    def bias_view(self, bias: torch.Tensor) -> torch.Tensor:
        """Return ``bias`` shaped ``(C_out, 1, ..., 1)`` to broadcast over spatial axes."""
        return bias.view(-1, *([1] * len(self.stride)))

    def bias_grad(self, grad_out: torch.Tensor) -> torch.Tensor:
        """Return the gradient of the bias: ``grad_out`` summed over batch and space."""
        return grad_out.sum([0, *range(2, grad_out.ndim)])
