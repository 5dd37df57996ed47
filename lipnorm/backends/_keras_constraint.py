"""A certified spectral cap as a Keras 3 ``kernel_constraint``, written with ``keras.ops`` only.

Keras applies a layer's ``kernel_constraint`` after each optimizer update, inside the compiled
train step, as a pure function of the new kernel: no state survives between calls and
nothing may leave the device. So the bound here is the one that needs neither: Gram
iteration (Delattre et al., ICML 2023), ``sigma(W) <= ||G_k||_F^(1/2^k)`` with
``G_0 = W``, ``G_{j+1} = G_j^T G_j`` rescaled, which converges to sigma from above; its
overestimate is at most ``rank^(1/2^(k+1))``, and ``k`` is chosen so that this is within
``rtol / 2``. Every product's rounding is carried back through the recursion, as in
:func:`lipnorm.certificates.gram_iteration_block_bounds` but for the unit roundoff of the
dtype the backend computes in: float64 on TensorFlow, PyTorch and JAX with
``jax_enable_x64``, float32 on JAX without it (looser: the first Gram product's rounding is
``gamma_n ||W||_F^2``).

With ``W = m A`` (``m`` the largest entry, ``A = fl(W / m)``), ``P_j = fl(H_j^T H_j)`` and
``H_{j+1} = fl(P_j / s_j)`` (``H_0 = A``, ``s_j`` the largest entry of ``P_j``)::

    sigma(H_j)^2 <= s_j (sigma(H_{j+1}) + u ||P_j||_F / s_j) + gamma_{n_j} ||H_j||_F^2
    sigma(H_k)   <= ||H_k||_F,     sigma(W) <= m (sigma(A) + u ||A||_F)

(``n_j`` the inner length of product ``j``), every step rounded up.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings

import keras
from keras import ops

__all__ = ["SpectralConstraint"]

_SMALLEST_SUBNORMAL = {"float32": 2.0**-149, "float64": 2.0**-1074}
_UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}
#: Most Gram steps (the overestimate is then at most rank^(1/131072)).
_MAX_STEPS = 16


def working_dtype() -> str:
    """``"float64"`` where the Keras backend computes in it, else ``"float32"`` (JAX without x64)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # JAX warns that it truncates float64
        probe = ops.cast(ops.zeros(()), "float64")
    return keras.backend.standardize_dtype(probe.dtype)


def _gamma(count: int, u: float) -> float:
    """Higham's gamma_count for unit roundoff ``u``, doubled for safety; ``inf`` where undefined."""
    if 2 * count * u >= 0.5:
        return math.inf
    return 2 * count * u / (1 - 2 * count * u)


def gram_steps(rank: int, rtol: float) -> int:
    """Gram steps ``k`` with ``rank^(1/2^(k+1)) <= 1 + rtol / 2`` (at most :data:`_MAX_STEPS`)."""
    if rank <= 1:
        return 1
    needed = math.log2(math.log(rank) / math.log1p(rtol / 2))
    return int(min(max(math.ceil(needed) - 1, 1), _MAX_STEPS))


def _full_precision():
    """A context in which matrix products are computed in their operands' full precision: JAX
    may otherwise use TF32 or bfloat16 passes for float32 products on accelerators."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.default_matmul_precision("highest")
    return contextlib.nullcontext()


def _checked(result, dtype: str):
    """``result``, after checking (while tracing) that the backend kept ``dtype``: a certificate
    computed in a narrower dtype than its rounding constants assume would not be one (Keras's
    PyTorch backend returns float32 from ``ops.matmul`` of float64 tensors, hence ``einsum``)."""
    found = keras.backend.standardize_dtype(result.dtype)
    if found != dtype:
        raise RuntimeError(f"the {keras.backend.backend()} backend computed a {dtype} result in {found}; "
                           "the certified bound cannot be computed here, please report this")
    return result


def _gram(matrix, left: bool, dtype: str):
    """``matrix matrix^T`` (``left``) or ``matrix^T matrix``, in ``dtype``."""
    equation = "ik,jk->ij" if left else "ki,kj->ij"
    return _checked(ops.einsum(equation, matrix, matrix), dtype)


def _finite_or_raise(w, name: str):
    """``w``; where it holds NaN or Inf, an error naming ``name`` is raised, inside the compiled
    step too: eagerly (PyTorch), by ``tf.debugging.check_numerics`` (TensorFlow), from a
    ``jax.debug.callback`` (JAX, which reports it when the step's results are read)."""
    message = (f"{name} holds NaN or Inf after the optimizer step; SpectralConstraint keeps no such "
               "weight (lower the learning rate, clip gradients, or restore a checkpoint)")
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.debugging.check_numerics(w, message)
    finite = ops.all(ops.isfinite(w))
    if backend == "jax":
        import jax

        def check(finite_value):
            if not bool(finite_value):
                raise ValueError(message)

        jax.debug.callback(check, finite)
        return w
    if not bool(ops.convert_to_numpy(finite)):
        raise ValueError(message)
    return w


def _frobenius_upper(matrix, u: float):
    """A certified ``||matrix||_F`` (the smaller of the rounded norm and sqrt(size) max|entry|)."""
    size = math.prod(matrix.shape)
    up = 1.0 + 4 * u
    by_entries = ops.max(ops.abs(matrix)) * math.sqrt(size) * up
    gamma = _gamma(size + 2, u)
    if not math.isfinite(gamma):
        return by_entries
    norm = ops.sqrt(ops.sum(ops.square(matrix))) * ((1.0 + gamma) * up)
    return ops.where(ops.less(norm, by_entries), norm, by_entries)


def certified_sigma_upper(matrix, steps: int):
    """A certified upper bound of ``sigma_max(matrix)`` by ``steps`` Gram steps (module docstring).

    Parameters
    ----------
    matrix : tensor, shape (p, q), finite
        In the working dtype.
    steps : int

    Returns
    -------
    tensor, shape ()
        In the working dtype; 0 for the zero matrix.
    """
    dtype = keras.backend.standardize_dtype(matrix.dtype)
    u = _UNIT_ROUNDOFF[dtype]
    up = 1.0 + 4 * u
    tiny = _SMALLEST_SUBNORMAL[dtype]
    largest = ops.max(ops.abs(matrix))
    zero = ops.equal(largest, 0.0)
    divisor = ops.where(zero, ops.ones_like(largest), largest)
    current = matrix / divisor
    p, q = matrix.shape
    # The rounding of matrix / largest (a subnormal quotient moves by at most one step).
    first_slack = u * _frobenius_upper(current, u) + math.sqrt(p * q) * tiny
    recursion = []
    for step in range(steps):
        left = step == 0 and p < q
        inner = current.shape[1] if left else current.shape[0]
        product = _gram(current, left, dtype)
        gamma = _gamma(inner + 2, u)
        if not math.isfinite(gamma):
            raise ValueError(f"a {p}x{q} kernel is too large for a certified bound in {dtype}; "
                             "use a backend that computes in float64")
        d = product.shape[0]
        formation = gamma * ops.square(_frobenius_upper(current, u)) + d * inner * tiny
        scale = ops.max(ops.abs(product))
        scale = ops.where(ops.equal(scale, 0.0), ops.ones_like(scale), scale)
        current = product / scale
        division = u * _frobenius_upper(current, u) * up + d * tiny
        recursion.append((scale, division, formation))
    bound = _frobenius_upper(current, u)
    for scale, division, formation in reversed(recursion):
        bound = ops.sqrt((scale * (bound + division) + formation) * up) * up
    bound = largest * (bound + first_slack) * (up * up)
    return _checked(ops.where(zero, ops.zeros_like(bound), bound), dtype)


@keras.saving.register_keras_serializable(package="lipnorm")
class SpectralConstraint(keras.constraints.Constraint):
    """Cap the largest singular value of a kernel after every update, certified (Keras 3).

    Use as ``kernel_constraint=`` of a layer: after each optimizer update (in ``model.fit``'s
    compiled step, on every backend) the kernel ``W`` gets a certified upper bound ``U`` of
    its sigma by Gram iteration (module docstring); a kernel with ``U <= max_sigma * (1 +
    rtol)`` is returned bit for bit, any other is scaled to ``W * max_sigma / (U + e)``, with
    ``e`` bounding the rounding of that product, so that the stored kernel has a certified
    ``sigma <= max_sigma``. The kernel is read as a matrix with the ``axis`` axis as columns
    and the other axes flattened into rows, as Keras's spectral normalization reads it.

    A constraint is stateless in Keras (no warm start), so only the ``"scale"`` projection of
    the PyTorch :class:`lipnorm.backends.torch.SpectralConstraint` exists here. A kernel
    holding NaN or Inf raises an error that names it, from inside the compiled step (a
    ``ValueError`` on PyTorch, TensorFlow's ``InvalidArgumentError``, JAX's runtime error).

    Parameters
    ----------
    max_sigma : float
        The cap ``R``, positive and finite.
    rtol : float
        Relative slack in (0, 1): a kernel whose certified bound is at most ``R (1 + rtol)``
        is left untouched, and the Gram iteration runs until its overestimate is at most
        ``rtol / 2`` (when the backend computes in float64).
    axis : int
        The kernel axis indexing the layer's outputs: -1 for Dense, Conv and EinsumDense
        kernels of shape ``(..., outputs)``; -2 for ``Conv*Transpose`` kernels ``(*k,
        filters, inputs)``.

    Raises
    ------
    ValueError
        ``max_sigma`` not positive and finite, ``rtol`` not in (0, 1), ``axis`` not an
        integer; at the first call, a kernel of fewer than two axes, or a kernel too large
        for a float32 certificate (on JAX without x64).

    Examples
    --------
    >>> import keras
    >>> from lipnorm.backends.keras import SpectralConstraint
    >>> layer = keras.layers.Dense(8, kernel_constraint=SpectralConstraint(max_sigma=1.0))

    References
    ----------
    Delattre, Barthelemy, Araujo, Allauzen, "Efficient Bound of Lipschitz Constant for
    Convolutional Layers by Gram Iteration", ICML 2023.
    """

    def __init__(self, max_sigma=1.0, rtol=1e-3, axis=-1):
        if (isinstance(max_sigma, bool) or not isinstance(max_sigma, numbers.Real)
                or not (math.isfinite(max_sigma) and max_sigma > 0)):
            raise ValueError(f"max_sigma must be a positive finite number, got {max_sigma!r}")
        if isinstance(rtol, bool) or not (isinstance(rtol, numbers.Real) and 0 < rtol < 1):
            raise ValueError(f"rtol must be a number in (0, 1), got {rtol!r}")
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise ValueError(f"axis must be an integer, got {axis!r}")
        self.max_sigma = float(max_sigma)
        self.rtol = float(rtol)
        self.axis = int(axis)

    def matrix(self, w):
        """The matrix view of kernel ``w``: ``axis`` moved last, the other axes flattened."""
        shape = tuple(w.shape)
        if len(shape) < 2:
            raise ValueError(f"SpectralConstraint needs a kernel of at least two axes, got shape {shape}; "
                             "use it as kernel_constraint=, not on biases or norms")
        if not -len(shape) <= self.axis < len(shape):
            raise ValueError(f"axis={self.axis} is out of range for a kernel of shape {shape}")
        moved = ops.moveaxis(w, self.axis, -1)
        return ops.reshape(moved, (-1, shape[self.axis]))

    def upper(self, w):
        """A certified upper bound of the sigma of kernel ``w``'s matrix view (a 0-d tensor,
        in the working dtype)."""
        return self._upper(ops.cast(self.matrix(w), working_dtype()))

    def _upper(self, matrix):
        with _full_precision():
            return certified_sigma_upper(matrix, gram_steps(min(matrix.shape), self.rtol))

    def __call__(self, w):
        name = getattr(w, "path", None) or "the kernel"
        w = _finite_or_raise(ops.convert_to_tensor(w), name)  # a variable's current value
        variable_dtype = keras.backend.standardize_dtype(w.dtype)
        working = working_dtype()
        matrix = ops.cast(self.matrix(w), working)
        upper = self._upper(matrix)
        # Rounding W * c to the kernel's dtype moves each entry by at most u |c w|, which moves
        # sigma by at most u c ||W||_F: dividing by upper + u ||W||_F keeps sigma <= R.
        u = _UNIT_ROUNDOFF[variable_dtype] + 2 * _UNIT_ROUNDOFF[working]
        factor = self.max_sigma / ((upper + u * _frobenius_upper(matrix, _UNIT_ROUNDOFF[working]))
                                   * (1.0 + 4 * _UNIT_ROUNDOFF[working]))
        scaled = ops.cast(ops.cast(w, working) * factor, variable_dtype)
        keep = ops.less_equal(upper, self.max_sigma * (1.0 + self.rtol))
        return ops.where(keep, w, scaled)

    def get_config(self):
        return {"max_sigma": self.max_sigma, "rtol": self.rtol, "axis": self.axis}
