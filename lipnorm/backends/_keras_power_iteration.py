"""Power iteration for spectral normalization, written with ``keras.ops`` only.

A linear map is given as a pair of functions of the weight: ``forward(v, w)``
maps an input-space vector ``v`` to the output space and ``adjoint(u, w)`` maps
back. For a matrix view ``M`` of shape (n_in, n_out) these are ``v @ M`` and
``M @ u``; for a convolution they are the convolution and its transpose.

The estimate ``sigma = <u, forward(v, w)>`` is differentiable in ``w`` with
``u`` and ``v`` held constant, as in Miyato et al. (2018), eq. (12).

References
----------
Miyato, T., Kataoka, T., Koyama, M., Yoshida, Y. "Spectral Normalization for
Generative Adversarial Networks", ICLR 2018, Algorithm 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from keras import ops


@dataclass(frozen=True)
class LinearMap:
    """A linear map of a weight ``w``: ``forward(v, w)`` and its adjoint ``adjoint(u, w)``."""

    forward: Callable
    adjoint: Callable


def matrix_map():
    """The map ``v -> v @ M`` of a matrix ``M`` of shape (n_in, n_out), and its adjoint."""
    return LinearMap(
        forward=lambda v, matrix: ops.matmul(v, matrix),
        adjoint=lambda u, matrix: ops.matmul(matrix, u),
    )


def normalize_or_keep(x, previous, eps):
    """``x / ||x||``, or ``previous`` where ``||x|| <= eps`` (a zero weight keeps its vectors).

    Parameters
    ----------
    x, previous : tensor, same shape
    eps : float

    Returns
    -------
    tensor, same shape as ``x``
    """
    norm = ops.sqrt(ops.sum(ops.square(x)))
    return ops.where(norm > eps, x / ops.maximum(norm, eps), previous)


def power_iteration(linear_map, weight, u, v, iterations, eps):
    """Run power iteration from ``(u, v)`` and return a differentiable sigma estimate.

    Parameters
    ----------
    linear_map : LinearMap
    weight : tensor
        The weight, in the dtype the iteration runs in (float32 or wider).
    u : tensor, shape of one output
        Output-space vector, unit norm.
    v : tensor, shape of one input
        Input-space vector, unit norm.
    iterations : int
        Number of power iterations, at least 1.
    eps : float
        Norms at or below ``eps`` count as zero.

    Returns
    -------
    sigma : tensor, shape ()
        ``<u_new, forward(v_new, weight)>``, differentiable in ``weight`` only.
    u_new, v_new : tensor
        The updated vectors, with gradients stopped.
    """
    frozen = ops.stop_gradient(weight)
    u = ops.stop_gradient(u)
    v = ops.stop_gradient(v)
    for _ in range(iterations - 1):
        v = normalize_or_keep(linear_map.adjoint(u, frozen), v, eps)
        u = normalize_or_keep(linear_map.forward(v, frozen), u, eps)
    v = ops.stop_gradient(normalize_or_keep(linear_map.adjoint(u, frozen), v, eps))
    image = linear_map.forward(v, weight)
    u = ops.stop_gradient(normalize_or_keep(image, u, eps))
    return ops.sum(image * u), u, v


def sigma_from_vectors(linear_map, weight, u, v):
    """``<u, forward(v, weight)>`` with ``u`` and ``v`` held constant (no update).

    Parameters
    ----------
    linear_map : LinearMap
    weight : tensor
    u, v : tensor
        Stored output-space and input-space vectors.

    Returns
    -------
    tensor, shape ()
    """
    image = linear_map.forward(ops.stop_gradient(v), weight)
    return ops.sum(image * ops.stop_gradient(u))


def safe_divisor(sigma, eps):
    """``sigma`` where it exceeds ``eps``, else 1: a zero weight is left unscaled, never NaN."""
    return ops.where(sigma > eps, sigma, ops.ones_like(sigma))
