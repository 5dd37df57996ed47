"""Lower bounds of a model's Lipschitz constant by search for a steep secant.

Any pair gives a valid lower bound L ≥ ‖f(x) − f(y)‖/‖x − y‖. The search keeps pairs
y = x + h·v close together and climbs the local Jacobian norm ‖J(x)‖₂: v follows power
iteration (v ← J(y)ᵀu / ‖·‖, u the unit output difference), and x moves along the gradient
of ‖f(x + h v) − f(x)‖ (J(y)ᵀu − J(x)ᵀu), projected onto the box spanned by the inputs.
Given more inputs than starts, it first screens them all (two power steps each) and starts
from the steepest. Several starts run in one batch. A torch model is searched in float32
(3–4 times faster than float64 on a CPU) and each start's best pair is then measured
again in float64. The reported value is that secant of the model evaluated in float64
(torch) or the model's own precision (Keras, float64 where the model allows), so it is a
ratio for a pair of inputs, not an estimate of a derivative. The inputs are
representable in the evaluation's dtype, so the distance is that of the points the model
saw, and the ratio is exact up to the rounding of the evaluation (relative ~1e-12 in
float64; ~1e-5 in float32, where pairs are 100 times farther apart),
which is why a certified upper bound, itself exact for the stored weights, may sit that
little below it on a network whose bound is tight.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from lipnorm.certify.formats import model_format
from lipnorm.certify.inputs import check_input_shape

__all__ = ["LowerBound", "lipschitz_lower_bound"]


@dataclass(frozen=True)
class LowerBound:
    """A lower bound of the Lipschitz constant and the inputs that witness it.

    Attributes
    ----------
    value : float
        ‖f(x) − f(y)‖ / ‖x − y‖ for the witness pair.
    x, y : ndarray, shape input_shape
        The witness pair.
    """

    value: float
    x: np.ndarray
    y: np.ndarray


#: Power-iteration steps that rank a screened input (on trained CNNs two steps find the
#: data's best point where one step misses it by 5 %).
SCREEN_STEPS = 2


def lipschitz_lower_bound(model, inputs=None, *, input_shape=None, starts: int = 64,
                          steps: int = 100, seed: int = 0, time_budget: float | None = None) -> LowerBound:
    """Multi-start projected ascent on the local Lipschitz constant of a model.

    Parameters
    ----------
    model : torch.nn.Module or keras.Model
        In inference mode.
    inputs : array_like, shape (batch, *input_shape), optional
        Candidate starting points; their elementwise range is the box the search stays in.
        With more than ``starts`` of them, each is screened (its local norm estimated by
        two power-iteration steps on its Jacobian, in batches of ``starts``) and the
        ``starts`` steepest start the ascent. Default: ``starts`` standard Gaussian inputs
        (no box).
    input_shape : tuple of int, optional
        Needed when ``inputs`` is not given.
    starts : int
        Number of starting points, moved together in one batch.
    steps : int
        Ascent steps per start.
    seed : int
        Seed of the random directions, of the screening order and of the default inputs.
    time_budget : float, optional
        Stop after this many seconds: the screening takes at most a third (the inputs it
        did not reach, in a seeded random order, are left out) and the ascent the rest (at
        least one step is taken). Many starts matter more than long ascents: on a
        trained digits MLP, 256 starts from the data find a secant within 0.6 % of the
        certified SDP bound where 8 starts stop 6 % below it.

    Returns
    -------
    LowerBound

    Raises
    ------
    TypeError
        For a model that is neither torch nor Keras.
    ValueError
        For inputs without a batch axis, neither inputs nor ``input_shape``, or inputs (or
        ``input_shape``) of a shape the model does not take, naming both.

    Example
    -------
    >>> lb = lipnorm.lipschitz_lower_bound(net, input_shape=(4,))      # doctest: +SKIP
    >>> lb.value <= lipnorm.certify(net, (4,)).upper                    # doctest: +SKIP
    True
    """
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    if inputs is None:
        if input_shape is None:
            raise ValueError("lipschitz_lower_bound needs inputs or input_shape")
        x = rng.standard_normal((starts, *input_shape))
        low = high = None
    else:
        x = np.asarray(_to_numpy(inputs), dtype=np.float64)
        if x.ndim < 2 or x.shape[0] == 0:
            raise ValueError("inputs must have shape (batch, *input_shape) with batch >= 1")
        low, high = x.min(axis=0), x.max(axis=0)
        if np.all(low == high):
            low = high = None
    kind = model_format(model)
    if kind in ("torch", "keras"):
        check_input_shape(model, x.shape[1:], "input_shape is" if inputs is None else "inputs has samples of shape")
    if kind == "torch":
        exact, fast = _torch_models(model)
    elif kind == "keras":
        exact = fast = _keras_model(model)
    else:
        raise TypeError("lipschitz_lower_bound needs a torch or Keras model (autodiff)")
    search = _Search(fast, low, high)
    deadline = None if time_budget is None else started + float(time_budget)
    directions = None
    if len(x) > starts:
        screen_deadline = None if time_budget is None else started + float(time_budget) / 3
        x, directions = search.screen(x, starts, rng, screen_deadline)
    points, directions = search.ascend(fast.representable(x[:starts]), directions, steps, rng, deadline)
    return _Search(exact, low, high).verify(points, directions)


@dataclass(frozen=True)
class _Evaluation:
    """A model evaluated in one precision: outputs, vector-Jacobian products, pair distance.

    ``evaluate(x)`` and ``vjp(x, u)`` take float64 arrays of points exactly representable
    in ``precision`` (see :meth:`representable`) and return float64 arrays. Secant pairs
    are ``separation · max(‖x‖, 1)`` apart: ``1e-4`` in float64, farther in lower
    precision, where the rounding of f(y) − f(x) relative to it (about eps / 1e-4 = 6e-4
    in float32) would otherwise dominate.
    """

    evaluate: Callable
    vjp: Callable
    precision: np.dtype
    separation: float

    def representable(self, a):
        return a.astype(self.precision).astype(np.float64)


class _Search:
    """Secants of one :class:`_Evaluation` of the model, screened, climbed and checked."""

    def __init__(self, model: _Evaluation, low, high):
        self.model, self.low, self.high = model, low, high

    @staticmethod
    def norms(a):
        return np.sqrt(np.sum(a.reshape(a.shape[0], -1) ** 2, axis=1)).reshape((a.shape[0],) + (1,) * (a.ndim - 1))

    def unit(self, a, fallback):
        """``a`` scaled to unit norm per point; ``fallback`` where it is zero."""
        size = self.norms(a)
        return np.where(size > 0, a / np.maximum(size, 1e-300), fallback)

    def random_unit(self, rng, shape):
        random = rng.standard_normal(shape)
        return random / self.norms(random)

    def secant(self, points, directions, fx=None):
        """(‖f(y) − f(x)‖/‖y − x‖, y, the unit output difference, f(x)) for y = x + h·direction.

        ``fx``, f at ``points``, is computed unless given.
        """
        batch = points.shape[0]
        gap = self.model.separation * np.maximum(self.norms(points), 1.0)
        partners = self.model.representable(points + gap * directions)
        fx = self.model.evaluate(points) if fx is None else fx
        fy = self.model.evaluate(partners)
        difference = (fy - fx).reshape(batch, -1)
        distance = np.sqrt(np.sum((partners - points).reshape(batch, -1) ** 2, axis=1))
        ratio = np.sqrt(np.sum(difference**2, axis=1)) / np.maximum(distance, 1e-300)
        unit = difference / np.maximum(np.linalg.norm(difference, axis=1, keepdims=True), 1e-300)
        return ratio, partners, unit.reshape(fx.shape), fx

    def screen(self, x, starts: int, rng, deadline=None):
        """The ``starts`` inputs of steepest secant after SCREEN_STEPS power steps each.

        Returns
        -------
        x : ndarray, shape (starts, *input_shape)
            The steepest inputs, steepest first, representable in the model's precision.
        directions : ndarray, shape like x
            Their power-iteration directions.
        """
        scores = np.full(len(x), -np.inf)
        directions = np.zeros_like(x)
        order = rng.permutation(len(x))
        output_shape = self.model.evaluate(self.model.representable(x[:1])).shape[1:]
        for begin in range(0, len(x), starts):
            if deadline is not None and begin > 0 and time.perf_counter() > deadline:
                break
            chunk = order[begin:begin + starts]
            points = self.model.representable(x[chunk])
            u = rng.standard_normal((len(chunk), *output_shape))
            v = self.unit(self.model.vjp(points, u), self.random_unit(rng, points.shape))
            fx = self.model.evaluate(points)
            for step in range(SCREEN_STEPS):
                ratio, partners, u, _ = self.secant(points, v, fx)
                if step + 1 < SCREEN_STEPS:
                    v = self.unit(self.model.vjp(partners, u), v)
            scores[chunk], directions[chunk] = ratio, v
        chosen = np.argsort(-scores, kind="stable")[:starts]
        return self.model.representable(x[chosen]), directions[chosen]

    def ascend(self, x, v, steps, rng, deadline=None):
        """The ascent from ``x`` (directions ``v``, random where None): each start's best
        point and direction.

        Every step refines the direction ``v`` at the point by one power-iteration step on
        the local Jacobian (``v ← J(x + ℓv)ᵀu``), and proposes a move of length ℓ along
        the gradient of ⟨u, f(x + ℓv) − f(x)⟩ (a random direction where it vanishes): the
        secant's slope smoothed over the step's own length ℓ, which sees the kinks of a
        ReLU network within reach (at the pair's tiny separation it is zero almost
        everywhere) and is the gradient of the local norm as ℓ shrinks. The move is kept
        only if the secant from the new point is steeper; ℓ shrinks after each refusal
        and grows after each success. After each quarter of the steps (or of the time
        left, if that comes first) the less steep half of the starts stops (down to an
        eighth of them), so the steepest climb longest for the same work. The last steps'
        time is kept for the check.
        """
        v = self.random_unit(rng, x.shape) if v is None else v
        fx = self.model.evaluate(x)
        ratio, _, u, _ = self.secant(x, v, fx)
        scale = np.maximum(self.norms(x), 1.0)
        floor = self.model.separation * scale
        starts = {"x": x, "v": v, "fx": fx, "u": u, "ratio": ratio, "floor": floor,
                  "length": np.maximum(0.1 * scale / np.sqrt(x[0].size), floor),
                  "best_ratio": ratio.copy(), "best_x": x.copy(), "best_v": v.copy()}
        stopped_x, stopped_v = [], []
        fewest, next_halving = max(1, len(x) // 8), 0.25
        began = time.perf_counter()
        available = None if deadline is None else max(deadline - began, 1e-9)
        first = last = 0.0
        for step in range(steps):
            now = time.perf_counter()
            elapsed = now - began
            # keep time for this step and the float64 check of every start after the ascent
            # (about four steps of all starts in float32)
            if available is not None and step > 0 and elapsed + last + 4 * first > available:
                break
            done = max(step / steps, 0.0 if available is None else elapsed / available)
            if done >= next_halving and len(starts["x"]) > fewest:
                next_halving += 0.25
                order = np.argsort(-starts["best_ratio"], kind="stable")
                kept, stopped = order[:max(fewest, len(order) // 2)], order[max(fewest, len(order) // 2):]
                stopped_x.append(starts["best_x"][stopped])
                stopped_v.append(starts["best_v"][stopped])
                starts = {name: value[kept] for name, value in starts.items()}
            self._step(starts, rng)
            last = time.perf_counter() - now
            first = first or last
        return (np.concatenate([starts["best_x"], *stopped_x]), np.concatenate([starts["best_v"], *stopped_v]))

    def _step(self, starts: dict, rng) -> None:
        """One step of :meth:`ascend` for every start, in place."""
        x, v, u, fx, length = starts["x"], starts["v"], starts["u"], starts["fx"], starts["length"]
        batch = x.shape[0]

        def per_start(flags, like):
            return flags.reshape((batch,) + (1,) * (like.ndim - 1))

        probe = self.model.representable(x + length * v)
        g_probe, g_x = self.model.vjp(probe, u), self.model.vjp(x, u)
        v = self.unit(g_probe, v)
        direction = self.unit(g_probe - g_x, self.random_unit(rng, x.shape))
        proposal = x + length * direction
        if self.low is not None:
            proposal = np.clip(proposal, self.low, self.high)
        proposal = self.model.representable(proposal)
        new_ratio, _, new_u, new_fx = self.secant(proposal, v)
        old_ratio, _, old_u, _ = self.secant(x, v, fx)  # the refined direction at the kept point
        better = new_ratio > old_ratio
        x = np.where(per_start(better, x), proposal, x)
        ratio = np.where(better, new_ratio, old_ratio)
        improved = ratio > starts["best_ratio"]
        starts.update(
            x=x, v=v, ratio=ratio, fx=np.where(per_start(better, fx), new_fx, fx),
            u=np.where(per_start(better, u), new_u, old_u),
            length=np.where(per_start(better, x), length * 1.5, np.maximum(length * 0.6, starts["floor"])),
            best_ratio=np.where(improved, ratio, starts["best_ratio"]),
            best_x=np.where(per_start(improved, x), x, starts["best_x"]),
            best_v=np.where(per_start(improved, x), v, starts["best_v"]))

    def verify(self, x, v) -> LowerBound:
        """The steepest secant at ``x`` along ``v`` and along one more power step, in this
        evaluation's precision: the value reported."""
        x = self.model.representable(x)
        fx = self.model.evaluate(x)
        ratio, partners, u, _ = self.secant(x, v, fx)
        refined = self.unit(self.model.vjp(partners, u), v)
        again, again_partners, _, _ = self.secant(x, refined, fx)
        use = again > ratio
        ratio = np.where(use, again, ratio)
        partners = np.where(use.reshape((len(x),) + (1,) * (x.ndim - 1)), again_partners, partners)
        i = int(np.argmax(ratio))
        return LowerBound(float(ratio[i]), x[i].copy(), partners[i].copy())


def _torch_models(model) -> tuple[_Evaluation, _Evaluation]:
    """A torch model evaluated in float64 (the reported secants) and in float32 (the search:
    3–4 times faster on a CPU for convolutions)."""
    import torch

    if model.training and not isinstance(model, torch.fx.GraphModule):  # exported graphs are fixed
        raise ValueError("the model is in training mode; call model.eval() first")
    return (_Evaluation(*_torch_functions(model, torch.float64), np.dtype(np.float64), 1e-4),
            _Evaluation(*_torch_functions(model, torch.float32), np.dtype(np.float32), 1e-3))


def _torch_functions(model, dtype):
    """``evaluate`` and ``vjp`` of a copy of the model in ``dtype``."""
    import torch

    copied = copy.deepcopy(model).to(dtype)

    # an exported program may be specialized to batch size 1: feed it one sample at a time
    one_at_a_time = isinstance(model, torch.fx.GraphModule)

    def one_output(x):
        out = copied(x)
        if isinstance(out, (tuple, list)):
            out = torch.cat([o.reshape(o.shape[0], -1) for o in out], dim=1)
        return out.reshape(out.shape[0], -1)

    def flat_output(x):
        if one_at_a_time:
            return torch.cat([one_output(x[i:i + 1]) for i in range(x.shape[0])])
        return one_output(x)

    def evaluate(x):
        with torch.no_grad():
            return flat_output(torch.from_numpy(x).to(dtype)).double().numpy()

    def vjp(x, u):
        xt = torch.from_numpy(x).to(dtype).requires_grad_(True)
        out = flat_output(xt)
        (grad,) = torch.autograd.grad(out, xt, torch.from_numpy(u).to(out.dtype).reshape(out.shape))
        return grad.double().numpy()

    return evaluate, vjp


def _keras_model(model) -> _Evaluation:
    """A Keras model evaluated in float64 where its config allows, else in its own precision."""
    evaluate, vjp, precision = _keras_functions(model)
    return _Evaluation(evaluate, vjp, precision, 1e-4 if precision == np.float64 else 1e-2)


def _keras_functions(model):
    import keras

    model = _keras_float64(model)
    backend = keras.backend.backend()

    def call(x):
        out = model(x, training=False)
        if isinstance(out, (tuple, list)):
            out = keras.ops.concatenate([keras.ops.reshape(o, (o.shape[0], -1)) for o in out], axis=1)
        return out

    dtype = model.inputs[0].dtype if getattr(model, "inputs", None) else "float32"

    def evaluate(x):
        return np.asarray(keras.ops.convert_to_numpy(call(keras.ops.convert_to_tensor(x, dtype=dtype))),
                          dtype=np.float64)

    if backend == "tensorflow":
        import tensorflow as tf

        def vjp(x, u):
            xt = tf.convert_to_tensor(x, dtype=dtype)
            with tf.GradientTape() as tape:
                tape.watch(xt)
                out = call(xt)
            grad = tape.gradient(out, xt, output_gradients=tf.cast(tf.reshape(u, out.shape), out.dtype))
            return np.asarray(grad, dtype=np.float64)
    elif backend == "jax":
        import jax

        def vjp(x, u):
            out, pullback = jax.vjp(call, jax.numpy.asarray(x, dtype=dtype))
            return np.asarray(pullback(jax.numpy.asarray(u, dtype=out.dtype).reshape(out.shape))[0],
                              dtype=np.float64)
    elif backend == "torch":
        import torch

        def vjp(x, u):
            xt = torch.tensor(x, dtype=getattr(torch, str(dtype))).requires_grad_(True)
            out = call(xt)
            (grad,) = torch.autograd.grad(out, xt, torch.tensor(u, dtype=out.dtype).reshape(out.shape))
            return grad.detach().cpu().double().numpy()
    else:
        raise NotImplementedError(f"lipschitz_lower_bound has no gradient for Keras backend {backend!r}")
    return evaluate, vjp, np.dtype(keras.backend.standardize_dtype(dtype))


def _keras_float64(model):
    """A float64 copy of a Keras model when its config allows, else the model itself."""
    import keras

    try:
        config = model.get_config()
        clone = model.__class__.from_config(_float64_config(config))
        clone.set_weights([np.asarray(w, dtype=np.float64) for w in model.get_weights()])
        return clone
    except Exception:  # custom layers without a config: fall back to the model's precision
        return model


def _float64_config(config):
    if isinstance(config, dict):
        return {key: ("float64" if key == "dtype" and _is_float_dtype(value) else _float64_config(value))
                for key, value in config.items()}
    if isinstance(config, list):
        return [_float64_config(item) for item in config]
    return config


def _is_float_dtype(value) -> bool:
    if isinstance(value, str):
        return value.startswith(("float", "mixed"))
    if isinstance(value, dict):
        return str(value.get("config", {}).get("name", "")).startswith(("float", "mixed"))
    return False


def _to_numpy(inputs):
    if hasattr(inputs, "detach"):
        return inputs.detach().cpu().numpy()
    return np.asarray(inputs)
