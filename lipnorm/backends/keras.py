"""Spectral normalization for Keras 3, on every Keras backend (TensorFlow, JAX, PyTorch).

``SpectralNormalization`` is a drop-in for ``keras.layers.SpectralNormalization``
that never overwrites the wrapped layer's weights: the layer runs with ``W / sigma``
(for Dense the input is scaled by ``1 / sigma`` instead: the same map), the gradient
flows through sigma, and inference uses sigma from the stored power-iteration vectors.
The gradient through sigma is part of one custom gradient per layer
(``_keras_normalized_ops``), so it costs no extra pass over the weight.
"""

from __future__ import annotations

import numbers

import keras
from keras import ops

from lipnorm.backends._keras_constraint import SpectralConstraint
from lipnorm.backends._keras_conv_operator import conv_operator_map, operator_shapes
from lipnorm.backends._keras_kernel_views import (
    CONV_LAYERS,
    CONV_TRANSPOSE_LAYERS,
    kernel_matrix,
    kernel_views,
    matrix_shape,
)
from lipnorm.backends._keras_normalized_ops import normalized_weight, scaled_matmul
from lipnorm.backends._keras_power_iteration import (
    matrix_map,
    power_iteration,
    safe_divisor,
    sigma_from_vectors,
)

__all__ = ["SpectralConstraint", "SpectralNormalization"]

_MODES = ("matrix", "operator")
_WARM_UP_ITERATIONS = 15
_LOW_PRECISION = ("float16", "bfloat16")


def _iteration_dtype(variable_dtype):
    """Power iteration runs in float32 at least, whatever the layer's precision."""
    return "float32" if variable_dtype in _LOW_PRECISION else variable_dtype


def _normalized_dense(layer, inputs, sigma, u, v):
    """A Dense layer's ``call`` with its kernel divided by ``sigma``, as ``(x / sigma) K + b``.

    Dividing the input keeps every intermediate at the size of the normalized output, so
    float16 cannot overflow on ``x K`` when ``sigma`` is large, and no kernel-sized
    temporary is formed; ``scaled_matmul`` folds the gradient through ``sigma`` into the
    kernel's gradient.
    """
    dtype = layer.compute_dtype
    inputs = ops.cast(inputs, dtype)
    kernel = ops.cast(layer.kernel, dtype)
    n_in, n_out = kernel.shape
    flat = ops.reshape(inputs, (-1, n_in))
    outputs = ops.reshape(scaled_matmul(flat, kernel, sigma, u, v), (*ops.shape(inputs)[:-1], n_out))
    if layer.bias is not None:
        outputs = ops.add(outputs, ops.cast(layer.bias, dtype))
    if layer.activation is not None:
        outputs = layer.activation(outputs)
    return outputs


@keras.saving.register_keras_serializable(package="lipnorm")
class SpectralNormalization(keras.layers.Wrapper):
    """Divide a layer's weight by its largest singular value, functionally.

    Drop-in for ``keras.layers.SpectralNormalization``. Unlike it, the wrapped
    layer's weight is never overwritten: in training, one or more power iterations
    update the stored vectors ``u``, ``v`` and the layer runs with ``W / sigma``
    where ``sigma = u^T W v`` is differentiated in ``W`` (``u``, ``v`` held
    constant, as in Miyato et al. 2018); in inference ``sigma`` comes from the
    stored ``u``, ``v`` without an update, so training and inference agree.
    Dense scales its input by ``1 / sigma`` (``(x / sigma) W + b``, the same values and
    gradients as using ``W / sigma``, without a weight-sized temporary); every other
    layer (Conv*, Conv*Transpose, EinsumDense, DepthwiseConv, SeparableConv, each of
    its two kernels, Embedding, any layer with a ``kernel``) runs its own ``call`` with
    ``W / sigma`` substituted (in a ``keras.StatelessScope``). In ``"matrix"`` mode the
    gradient through sigma is folded into a custom gradient (for Dense, one more row of
    the kernel-gradient product); in ``"operator"`` mode it is differentiated.

    Masks pass through as the wrapped layer passes them (``supports_masking``,
    ``compute_mask``), and the output has the wrapper's own compute dtype, as with
    ``keras.layers.SpectralNormalization``.

    The power iteration always runs in float32 or wider (also under the
    ``mixed_float16`` / ``mixed_bfloat16`` policies). ``u`` and ``v`` are
    non-trainable weights, saved with the model, aggregated across replicas as
    ``"only_first_replica"`` (they are never averaged). At build, 15 warm-up
    iterations start ``u``, ``v`` near the top singular pair (sigma within 10%, from below, in the tests), so a model that is
    evaluated before it is trained is already normalized.

    Parameters
    ----------
    layer : keras.layers.Layer
        The layer to normalize: Dense, EinsumDense, Conv1D/2D/3D,
        Conv1D/2D/3DTranspose, DepthwiseConv1D/2D, SeparableConv1D/2D, Embedding,
        or any layer with a ``kernel`` (or ``embeddings``) weight.
    power_iterations : int, default 1
        Power iterations per training step, at least 1.
    mode : {"matrix", "operator"}, default "matrix"
        ``"matrix"``: sigma of the kernel reshaped to (inputs, outputs), as
        ``keras.layers.SpectralNormalization`` and the SN-GAN paper do; for
        Conv*Transpose the output axis is the filters axis (-2).
        ``"operator"`` (Conv1D/2D/3D and Conv*Transpose with ``groups=1`` only):
        sigma of the convolution itself on the input shape seen at build, with
        the layer's strides, padding and dilation; ``u``, ``v`` are shaped like
        one output and one input. This is the layer's actual Lipschitz constant
        (estimated from below by power iteration), which the matrix view is not.
    eps : float, default 1e-12
        Norms at or below ``eps`` count as zero: a zero weight keeps its
        vectors and is left unscaled, so no NaN appears.
    **kwargs
        Passed to ``keras.layers.Wrapper`` (``name``, ``dtype``, ...).

    Raises
    ------
    ValueError
        If ``power_iterations`` is not an integer >= 1, ``eps`` is not positive,
        ``mode`` is unknown, ``mode="operator"`` wraps a layer that is not a
        convolution, the layer is quantized, or (at build) the layer has no
        kernel or operator mode meets an unknown input size.

    Examples
    --------
    >>> import keras
    >>> from lipnorm.backends.keras import SpectralNormalization
    >>> dense = SpectralNormalization(keras.layers.Dense(16))
    >>> conv = SpectralNormalization(keras.layers.Conv2D(8, 3, padding="same"), mode="operator")
    >>> model = keras.Sequential([keras.Input((8, 8, 3)), conv, keras.layers.Flatten(), dense])
    >>> tuple(model(keras.ops.ones((2, 8, 8, 3))).shape)
    (2, 16)

    References
    ----------
    Miyato, T., Kataoka, T., Koyama, M., Yoshida, Y. "Spectral Normalization for
    Generative Adversarial Networks", ICLR 2018.
    """

    def __init__(self, layer, power_iterations=1, mode="matrix", eps=1e-12, **kwargs):
        if kwargs.pop("autocast", False):
            raise ValueError(
                "SpectralNormalization runs its power iteration in float32 and casts "
                "for the wrapped layer itself; do not pass autocast=True."
            )
        super().__init__(layer, autocast=False, **kwargs)
        if (
            isinstance(power_iterations, bool)
            or not isinstance(power_iterations, numbers.Integral)
            or power_iterations < 1
        ):
            raise ValueError(
                f"`power_iterations` must be an integer >= 1; got {power_iterations!r}."
            )
        if mode not in _MODES:
            raise ValueError(f"`mode` must be 'matrix' or 'operator'; got {mode!r}.")
        if mode == "operator" and not isinstance(
            layer, CONV_LAYERS + CONV_TRANSPOSE_LAYERS
        ):
            raise ValueError(
                "mode='operator' applies to Conv1D/2D/3D and Conv1D/2D/3DTranspose; "
                f"got {type(layer).__name__}. Use mode='matrix' for it."
            )
        if not (isinstance(eps, numbers.Real) and eps > 0):
            raise ValueError(f"`eps` must be a positive float; got {eps!r}.")
        if getattr(layer, "quantization_mode", None) is not None:
            raise ValueError(
                f"{type(layer).__name__} is quantized ({layer.quantization_mode}); "
                "normalize the float layer, then quantize the normalized model."
            )
        self.power_iterations = int(power_iterations)
        self.mode = mode
        self.eps = float(eps)
        # A Dense layer with its stock call scales its input; other layers run their own
        # call with the normalized weight substituted.
        self._scales_input = (
            mode == "matrix"
            and isinstance(layer, keras.layers.Dense)
            and type(layer).call is keras.layers.Dense.call
        )
        if layer.built:
            kernel_views(layer)

    def build(self, input_shape):
        super().build(input_shape)
        self._views = kernel_views(self.layer)
        self._maps = []
        self._vectors = []
        for view in self._views:
            weight = getattr(self.layer, view.attribute)
            dtype = _iteration_dtype(weight.dtype)
            if self.mode == "operator":
                v_shape, u_shape = operator_shapes(self.layer, input_shape)
                linear_map = conv_operator_map(self.layer, v_shape)
            else:
                n_in, n_out = matrix_shape(tuple(weight.shape), view)
                v_shape, u_shape = (n_in,), (n_out,)
                linear_map = matrix_map()
            u = self.add_weight(
                shape=u_shape,
                initializer=keras.initializers.RandomNormal(),
                trainable=False,
                name=f"{view.attribute}_u",
                dtype=dtype,
                aggregation="only_first_replica",
                autocast=False,
            )
            v = self.add_weight(
                shape=v_shape,
                initializer="zeros",
                trainable=False,
                name=f"{view.attribute}_v",
                dtype=dtype,
                aggregation="only_first_replica",
                autocast=False,
            )
            self._maps.append(linear_map)
            self._vectors.append((u, v))
        self.warm_up(_WARM_UP_ITERATIONS)

    def _operand(self, index):
        """The weight in the form its linear map takes, cast to the iteration dtype."""
        view = self._views[index]
        weight = getattr(self.layer, view.attribute)
        weight = ops.cast(weight, _iteration_dtype(weight.dtype))
        return weight if self.mode == "operator" else kernel_matrix(weight, view)

    def warm_up(self, iterations=_WARM_UP_ITERATIONS):
        """Run power iterations on the current weights and store ``u``, ``v``.

        Call this after replacing the wrapped layer's weights (``set_weights``,
        loading a checkpoint of the unwrapped layer) so that inference is
        normalized before the next training step. ``u`` is first normalized,
        so a fresh random ``u`` is a valid start.

        Parameters
        ----------
        iterations : int, default 15
            Number of power iterations.
        """
        for index, (u, v) in enumerate(self._vectors):
            start = u.value / ops.maximum(ops.sqrt(ops.sum(ops.square(u.value))), self.eps)
            _, new_u, new_v = power_iteration(
                self._maps[index], self._operand(index), start, v.value, iterations, self.eps
            )
            u.assign(new_u)
            v.assign(new_v)

    def sigmas(self, training=False):
        """The current sigma estimate of each normalized weight.

        Parameters
        ----------
        training : bool, default False
            If True, run ``power_iterations`` and store the updated ``u``, ``v``
            (as a training step does); if False, use the stored ones.

        Returns
        -------
        list of tensor, shape ()
            One per normalized weight, differentiable in the weight.
        """
        return [sigma for sigma, _, _ in self._estimates(training, differentiable=True)]

    def _estimates(self, training, differentiable):
        """``(sigma, u, v)`` per normalized weight, ``sigma`` computed from ``u`` and ``v``.

        In training the power iteration runs first and the updated ``u``, ``v`` are stored.
        ``sigma`` is differentiable in the weight only if ``differentiable``.
        """
        result = []
        for index, (u, v) in enumerate(self._vectors):
            operand = self._operand(index)
            if not differentiable:
                operand = ops.stop_gradient(operand)
            if training:
                sigma, new_u, new_v = power_iteration(
                    self._maps[index],
                    operand,
                    u.value,
                    v.value,
                    self.power_iterations,
                    self.eps,
                )
                u.assign(new_u)
                v.assign(new_v)
            else:
                new_u, new_v = ops.stop_gradient(u.value), ops.stop_gradient(v.value)
                sigma = sigma_from_vectors(self._maps[index], operand, new_u, new_v)
            result.append((safe_divisor(sigma, self.eps), new_u, new_v))
        return result

    def call(self, inputs, training=False):
        training = bool(training)
        if self.mode == "operator":
            # The operator's sigma has no closed-form weight gradient: differentiate it.
            sigmas = self.sigmas(training=training)
            weights = [ops.divide(w, s) for w, s in zip(self._weight_values(), sigmas)]
            outputs = self._call_substituted(inputs, weights)
        elif self._scales_input:
            sigma, u, v = self._estimates(training, differentiable=False)[0]
            outputs = _normalized_dense(self.layer, inputs, sigma, u, v)
        else:
            estimates = self._estimates(training, differentiable=False)
            weights = [
                normalized_weight(w, ops.cast(sigma, w.dtype), u, v, view)
                for w, (sigma, u, v), view in zip(self._weight_values(), estimates, self._views)
            ]
            outputs = self._call_substituted(inputs, weights)
        # The wrapped layer computes in its own dtype; the wrapper answers in its policy's,
        # as keras.layers.SpectralNormalization does.
        return ops.cast(outputs, self.compute_dtype)

    def _weight_values(self):
        """The current value of each normalized weight (a plain ``keras.Variable``)."""
        values = []
        for view in self._views:
            variable = getattr(self.layer, view.attribute)
            if not isinstance(variable, keras.Variable):
                raise ValueError(
                    f"{type(self.layer).__name__}.{view.attribute} is not a plain weight "
                    "(LoRA enabled?); SpectralNormalization cannot substitute it."
                )
            values.append(variable.value)
        return values

    def _call_substituted(self, inputs, weights):
        """Run the layer with each normalized weight replaced by the given value.

        The layer is called as usual (its own input casting and autocasting under a
        mixed precision policy, ``training`` from the call context) in a
        ``keras.StatelessScope`` that maps its weights to their current values.
        """
        replaced = {
            id(getattr(self.layer, view.attribute)): weight
            for view, weight in zip(self._views, weights)
        }
        state = [(w, replaced.get(id(w), w.value)) for w in self.layer.variables]
        with keras.StatelessScope(state_mapping=state):
            return self.layer(inputs)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    @property
    def supports_masking(self):
        """Whether masks pass through: exactly when the wrapped layer supports masking."""
        return self.layer.supports_masking

    def compute_mask(self, inputs, mask=None):
        return self.layer.compute_mask(inputs, mask) if self.layer.supports_masking else None

    def get_config(self):
        config = super().get_config()
        config.update(
            {"power_iterations": self.power_iterations, "mode": self.mode, "eps": self.eps}
        )
        return config
