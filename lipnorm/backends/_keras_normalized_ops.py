"""Normalized linear maps whose gradient through sigma is folded into one custom gradient.

With ``sigma = <u, v @ M>`` for the matrix view ``M`` of a weight (``u``, ``v`` held
constant, Miyato et al. 2018), ``d sigma / dM = v u^T``. Differentiating ``W / sigma`` by
automatic differentiation forms that rank-one matrix and adds it to the weight gradient,
passes over the weight that cost as much as the layer's own weight gradient. Here the
sigma term is part of a hand-written gradient instead (``keras.ops.custom_gradient``, so
every Keras backend runs the same code):

``scaled_matmul``
    ``y = (x / sigma) @ K`` for a Dense kernel ``K``. With ``g = dL/dy`` and
    ``c = <g, y> / sigma``::

        dL/dx = (g @ K^T) / sigma
        dL/dK = [x / sigma; v]^T @ [g; -c u]

    one matrix product over ``N + 1`` rows, the rank-one term being the extra row.
``normalized_weight``
    ``W_s = W / sigma`` for a layer that runs with a substituted weight (convolutions and
    the rest). With ``G = dL/dW_s`` and ``D = d sigma / dW`` (``v u^T`` in ``W``'s layout)::

        dL/dW = (G - <G, W_s> D) / sigma

``sigma``, ``u`` and ``v`` are constants of both functions (their gradients are zero).

References
----------
Miyato, T., Kataoka, T., Koyama, M., Yoshida, Y. "Spectral Normalization for
Generative Adversarial Networks", ICLR 2018, eq. (12).
"""

from __future__ import annotations

from keras import ops

from lipnorm.backends._keras_kernel_views import kernel_from_matrix


def _upstream(args, upstream):
    """The output gradient, passed positionally (TensorFlow, JAX) or as ``upstream`` (torch)."""
    return args[0] if upstream is None else upstream


def _constants(*tensors):
    """Zero gradients for the inputs that are held constant."""
    return tuple(ops.zeros_like(t) for t in tensors)


@ops.custom_gradient
def scaled_matmul(x, kernel, sigma, u, v):
    """``(x / sigma) @ kernel`` with the gradient of ``sigma = <u, v @ kernel>`` folded in.

    Parameters
    ----------
    x : tensor, shape (N, n_in)
        Inputs, in the layer's compute dtype.
    kernel : tensor, shape (n_in, n_out)
        The unnormalized kernel, in the compute dtype.
    sigma : tensor, shape ()
        ``<u, v @ kernel>`` (positive), float32 or wider; a constant.
    u : tensor, shape (n_out,)
    v : tensor, shape (n_in,)
        The vectors ``sigma`` was computed from; constants.

    Returns
    -------
    tensor, shape (N, n_out)
    """
    dtype = x.dtype
    scaled = x / ops.cast(sigma, dtype)
    outputs = ops.matmul(scaled, kernel)
    # Eager torch computes every gradient returned; an input that needs none says so (a
    # model's input). TensorFlow and JAX tensors have no such flag and prune unused ones.
    input_needs_grad = getattr(x, "requires_grad", True)

    def grad(*args, upstream=None):
        g = _upstream(args, upstream)
        wide = sigma.dtype
        c = ops.sum(ops.cast(g, wide) * ops.cast(outputs, wide)) / sigma
        rows_in = ops.concatenate([scaled, ops.cast(v, dtype)[None, :]], axis=0)
        rows_grad = ops.concatenate([g, ops.cast(-c * u, dtype)[None, :]], axis=0)
        grad_x = ops.matmul(g, ops.transpose(kernel)) / ops.cast(sigma, dtype) if input_needs_grad else None
        grad_kernel = ops.matmul(ops.transpose(rows_in), rows_grad)
        return (grad_x, grad_kernel) + _constants(sigma, u, v)

    return outputs, grad


def normalized_weight(weight, sigma, u, v, view):
    """``weight / sigma`` with the gradient of ``sigma = <u, v @ M>`` (``M`` the matrix view).

    Parameters
    ----------
    weight : tensor
        The unnormalized weight, float32 or wider.
    sigma : tensor, shape ()
        ``<u, v @ M>`` (positive), in ``weight``'s dtype; a constant.
    u, v : tensor, shape (n_out,), (n_in,)
        The vectors ``sigma`` was computed from; constants.
    view : KernelView
        Which axes of ``weight`` are the matrix view's columns.

    Returns
    -------
    tensor, shape of ``weight``
    """

    @ops.custom_gradient
    def divide(weight, sigma, u, v):
        scaled = weight / sigma

        def grad(*args, upstream=None):
            g = _upstream(args, upstream)
            direction = kernel_from_matrix(ops.outer(v, u), tuple(weight.shape), view)
            grad_weight = (g - ops.sum(g * scaled) * direction) / sigma
            return (grad_weight,) + _constants(sigma, u, v)

        return scaled, grad

    return divide(weight, sigma, u, v)
