r"""Per-channel scalings of the loop transformation on the torus view.

Any positive diagonal :math:`\Lambda_j` on unit :math:`j`'s space commutes with the unit's
:math:`\Delta_j` (diagonal too), and one that is constant over positions — a factor per
channel — commutes with every circular convolution's frequency structure. Multiplying the
expansion of :mod:`lipnorm.certify.loop` by :math:`\Lambda_t` gives, with
:math:`\tilde L_j \ge \|\Lambda_j J_{z_j}\|`,

.. math::

    \tilde L_t \le \|\Lambda_t P_{t\leftarrow a}\Lambda_a^{-1}\|\,\tilde L(a)
        + \sum_j \|\Lambda_t P_{t\leftarrow w_j}\Lambda_j^{-1}\|\, r_j \tilde L_j,

the input and the output unscaled: a valid bound for *every* choice of scalings, and the
plain loop transformation for :math:`\Lambda = I`. A trained network is far from balanced
across channels (ReLU networks are invariant under such rescalings; BatchNorm gives its
channels very different gains), and the scaled chains' norms can be much smaller.

The scalings are *proposed*: every chain block is held (:class:`HeldChains`), the scaled
norms estimated by warm-started power iterations on each frequency's block
(:class:`ScaledNorms`, lower estimates, with their gradients in :math:`\log\Lambda` from
the singular vectors), and :math:`\log \Lambda` moved by Adam on the logarithm of the
bound (:func:`lipnorm.certify.loop.loop_bound_gradient`). Nothing rests on them:
the bound reported is certified afterwards with the scalings fixed
(:class:`lipnorm.certify.fibers.FiberAlgebra` with ``scalings``), every rounding bounded,
and the proof recomputes it from the network and the scalings.

An opaque unit (max pooling, a rule) is not diagonal, so its scaling stays 1.
"""

from __future__ import annotations

import math

import numpy as np

from lipnorm.certify.fibers import FiberAlgebra, FiberBlock, _coarse
from lipnorm.certify.loop import ChainPlan, chain_norms, loop_bound_gradient
from lipnorm.certify.torus import TorusNetwork

__all__ = ["HeldChains", "ScaledNorms", "certified_norms", "held_chains", "optimise_scalings"]

#: Adam's step on log Λ.
_LEARNING_RATE = 0.05
#: Power-iteration steps for the first estimate, and per optimisation step after it.
_FIRST_POWER_STEPS = 8
_POWER_STEPS = 3
#: Sharpness of the soft maximum over frequencies that weighs the gradients.
_SHARPNESS = 40.0


class HeldChains(FiberAlgebra):
    """The torus view's blocks on every fiber at once, kept (not certified) as recorded.

    Parameters
    ----------
    network : TorusNetwork
    """

    def __init__(self, network: TorusNetwork):
        super().__init__(network, max_entries=2**62)
        self.held: dict = {}

    def record(self, key, block: FiberBlock, part) -> None:
        self.held[key] = block

    @property
    def chunk(self):
        return self.chunks[0]


class ScaledNorms:
    """Estimates of ``‖Λ_t P Λ_s⁻¹‖`` for every held block, and their gradients in ``log Λ``.

    A block into a grid with whole fibers: power iteration on each frequency's row matrix,
    the largest estimate its norm, the gradients weighed over rows by a soft maximum. A
    block into the one-point grid: power iteration on the sum of the fibers' Gram matrices.
    Vectors are kept between calls (warm starts). Lower estimates, never bounds.

    Parameters
    ----------
    network : TorusNetwork
    held : HeldChains
    seed : int
    """

    def __init__(self, network: TorusNetwork, held: HeldChains, seed: int = 0):
        self.network = network
        self.chunk = held.chunk
        self.count = len(network.units)
        self.blocks: dict = {}
        self.keys: dict = {}
        for key, block in held.held.items():
            self.keys[key] = id(block)
            self.blocks.setdefault(id(block), (key, block))
        self.vectors: dict = {}
        self.rng = np.random.default_rng(seed)
        self.started = False

    def estimate(self, logs: list[np.ndarray]):
        """Estimated norms and gradients at scalings ``exp(logs)``.

        Returns
        -------
        norms : dict
            Key to estimated norm.
        gradients : dict
            Key to ``(∂norm/∂log Λ_target, ∂norm/∂log Λ_source)`` (None where unscaled).
        """
        steps = _POWER_STEPS if self.started else _FIRST_POWER_STEPS
        self.started = True
        by_block = {}
        for identity, (key, block) in self.blocks.items():
            _, target, source = key
            left = np.exp(logs[target]) if target < self.count else None
            right = np.exp(logs[source - 1]) if source > 0 else None
            by_block[identity] = self._one(identity, block, left, right, steps)
        norms, gradients = {}, {}
        for key, identity in self.keys.items():
            norms[key], gradients[key] = by_block[identity]
        return norms, gradients

    def _one(self, identity, block: FiberBlock, left, right, steps: int):
        if block.data is None:
            return self._identity(block, left, right)
        if _coarse(block.target, block.fiber_grid):
            return self._gram_power(identity, block, left, right, steps)
        return self._row_power(identity, block, left, right, steps)

    @staticmethod
    def _identity(block: FiberBlock, left, right):
        ratio = (left if left is not None else 1.0) / (right if right is not None else 1.0)
        ratio = np.broadcast_to(ratio, (block.source.channels,))
        best = int(np.argmax(ratio))
        value = abs(block.scale) * float(ratio[best])
        grad_left = grad_right = None
        if left is not None:
            grad_left = np.zeros(left.size)
            grad_left[best] = value
        if right is not None:
            grad_right = np.zeros(right.size)
            grad_right[best] = -value
        return value, (grad_left, grad_right)

    def _start(self, identity, shape, dtype) -> np.ndarray:
        """The kept vectors of a block, or seeded random unit ones (per last axis)."""
        vector = self.vectors.get(identity)
        if vector is None:
            vector = self.rng.standard_normal(shape).astype(dtype)
            vector /= np.linalg.norm(vector, axis=-1, keepdims=True)
        return vector

    def _row_power(self, identity, block: FiberBlock, left, right, steps: int):
        data = block.data  # (Z, T, c_t, R c_s)
        cs = block.source.channels
        columns, inverse, gain = _factors(data.shape[3], cs, left, right)
        vector = self._start(identity, data.shape[:2] + (data.shape[3],), complex)
        for _ in range(steps):
            image = (data @ (vector * inverse)[..., None])[..., 0] * gain  # (Z, T, c_t)
            back = np.conj((np.conj(image * gain)[..., None, :] @ data)[..., 0, :]) * inverse  # Aᴴ A v
            vector = back / np.maximum(np.linalg.norm(back, axis=-1, keepdims=True), 1e-300)
        self.vectors[identity] = vector
        image = (data @ (vector * inverse)[..., None])[..., 0] * gain
        sigma = np.linalg.norm(image, axis=-1)  # (Z, T)
        top = float(sigma.max())
        if top == 0.0:
            return 0.0, (None, None)
        weights = np.exp(_SHARPNESS * (sigma / top - 1.0))
        weights /= weights.sum()
        unit_left = image / np.maximum(sigma[..., None], 1e-300)
        grad_left = None if left is None else np.einsum("zt,ztc->c", weights * sigma, np.abs(unit_left) ** 2)
        grad_right = None
        if right is not None:
            mass = (np.abs(vector) ** 2).reshape(vector.shape[:2] + (columns, cs)).sum(axis=2)
            grad_right = -np.einsum("zt,ztc->c", weights * sigma, mass)
        return top, (grad_left, grad_right)

    def _gram_power(self, identity, block: FiberBlock, left, right, steps: int):
        data = block.data[:, 0]  # (Z, c_t, R c_s), one target frequency per fiber
        weights = self.chunk.weight().astype(np.float64)
        if all(n == 1 for n in block.source.grid):  # the same in every fiber: counted once
            data, weights = data[:1], np.ones(1)
        cs = block.source.channels
        columns, inverse, gain = _factors(data.shape[2], cs, left, right)
        vector = self._start(identity, (data.shape[1],), float)

        def apply(u):  # (Σ_z w_z A_z A_zᴴ) u, A = Λ_t data Λ_s⁻¹ (real parts: the fibers' conjugates)
            back = np.conj((gain * u) @ data) * inverse**2  # A_zᴴ... (Z, R c_s), u real
            forward = np.real((data @ back[..., None])[..., 0])  # (Z, c_t)
            return gain * (weights @ forward), back

        for _ in range(steps):
            image, _ = apply(vector)
            vector = image / max(float(np.linalg.norm(image)), 1e-300)
        self.vectors[identity] = vector
        image, back = apply(vector)
        squared = float(vector @ image)
        if squared <= 0.0:
            return 0.0, (None, None)
        sigma = math.sqrt(squared)
        grad_left = None if left is None else sigma * vector**2
        grad_right = None
        if right is not None:
            adjoint = back / inverse  # Aᴴ u with A = Λ_t data Λ_s⁻¹: (data^H Λ_t u) Λ_s⁻¹
            mass = np.einsum("z,zk->k", weights, np.abs(adjoint) ** 2).reshape(columns, cs).sum(axis=0)
            grad_right = -mass / sigma
        return sigma, (grad_left, grad_right)


def _factors(width: int, channels: int, left, right):
    """(column groups, ``Λ_s⁻¹`` repeated over them, ``Λ_t``) of a block ``width`` columns wide
    (1.0 where a side is unscaled)."""
    columns = width // channels
    inverse = 1.0 if right is None else np.tile(1.0 / right, columns)
    return columns, inverse, 1.0 if left is None else left


def optimise_scalings(network: TorusNetwork, plan: ChainPlan, held: HeldChains, *,
                      steps: int) -> tuple[list[np.ndarray], float]:
    """Propose per-channel scalings that lower the loop transformation's bound.

    Parameters
    ----------
    network : TorusNetwork
    plan : ChainPlan
    held : HeldChains
        Every chain of ``plan``, recorded.
    steps : int
        Adam steps on ``log Λ`` (deterministic: seeded power iterations, no clock).

    Returns
    -------
    (list of ndarray, float, float)
        The scalings (a positive factor per channel of each unit's space) with the lowest
        estimated bound, that estimate, and the estimate without scalings (proposals:
        certify them).
    """
    units = network.units
    logs = [np.zeros(unit.input_space.channels) for unit in units]
    frozen = [unit.kind == "opaque" for unit in units]
    first, second = [np.zeros_like(v) for v in logs], [np.zeros_like(v) for v in logs]
    estimator = ScaledNorms(network, held)
    best_value, best_logs = math.inf, [v.copy() for v in logs]
    for step in range(1, steps + 2):  # the last estimate is of the last step's scalings
        norms, gradients = estimator.estimate(logs)
        value, sensitivity = loop_bound_gradient(network, plan, norms)
        if step == 1:
            unscaled = value
        if value < best_value:
            best_value, best_logs = value, [v.copy() for v in logs]
        if step > steps or value == 0.0:
            break
        grads = [np.zeros_like(v) for v in logs]
        for key, weight in sensitivity.items():
            grad_left, grad_right = gradients.get(key, (None, None))
            _, target, source = key
            if grad_left is not None and target < len(units):
                grads[target] += weight * grad_left
            if grad_right is not None and source > 0:
                grads[source - 1] += weight * grad_right
        for j in range(len(units)):
            if frozen[j]:
                continue
            g = grads[j] / value  # the logarithm of the bound
            first[j] = 0.9 * first[j] + 0.1 * g
            second[j] = 0.999 * second[j] + 0.001 * g * g
            corrected = first[j] / (1 - 0.9**step)
            logs[j] = logs[j] - _LEARNING_RATE * corrected / (np.sqrt(second[j] / (1 - 0.999**step)) + 1e-12)
    return [np.exp(v) for v in best_logs], best_value, unscaled


def held_chains(network: TorusNetwork, plan: ChainPlan) -> HeldChains:
    """Every chain of ``plan`` on every fiber, kept."""
    return chain_norms(network, HeldChains(network), plan)


def certified_norms(network: TorusNetwork, held: HeldChains, scalings=None) -> FiberAlgebra:
    """The held chains' norms certified (scaled by ``scalings`` where given)."""
    algebra = FiberAlgebra(network, scalings=scalings)
    for key, block in held.held.items():
        algebra.record(key, block, held.chunk)
    return algebra
