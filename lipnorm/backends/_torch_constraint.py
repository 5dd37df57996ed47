"""Spectral constraints for PyTorch: after each optimizer step, every constrained matrix has a
certified ``sigma_max <= max_sigma * (1 + rtol)``.

A constraint does not change the forward pass (unlike spectral normalization): it projects the
weights themselves, after the optimizer has updated them. Each step, for every constrained
matrix ``W`` (same-shaped matrices batched together):

1. A bound of ``||W||_F`` (a float32 norm, its rounding included) at most the cap leaves ``W``
   untouched with no further work. The same norm finds a NaN or Inf weight, which is named.
2. ``"scale"``: the Gram matrix of ``W``'s smaller side is formed in float64, its top
   eigenvalue estimated by Lanczos warm-started from the last step's eigenvector, and one
   Cholesky factorization proves either ``sigma <= cap`` (estimate at most ``max_sigma``:
   ``W`` is left as it is) or ``sigma <= upper``, ``upper`` within ``rtol / 4`` of the
   estimate; then ``W <- W * max_sigma / upper``, with the rounding of that product bounded.
   :mod:`._torch_stack_certificate` holds the proof and its rounding analysis.
3. ``"hammer"``: where the warm estimate ``s = ||W v||`` is above ``max_sigma``,
   ``W <- W + (max_sigma - s) u v^T`` (``u = W v / s``) sets the top singular value to
   ``max_sigma`` and leaves the others; the stored result is then certified.
4. Wherever a proof fails (an estimate is only ever low, and the hammer leaves a second
   singular value above the cap where there is one), ``W`` is scaled by ``max_sigma / upper``
   with ``upper`` a tight certified bound. bfloat16 and float16 results, whose rounding the
   bound of step 2 cannot absorb, are certified again as stored (their projections aim at
   ``max_sigma * (1 - u)``, ``u`` their unit roundoff). A convolution in operator mode is
   certified by :func:`lipnorm.sigma_bounds` of the convolution instead.

A matrix that is not projected is not written to: it stays bit-for-bit what the optimizer left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import warnings
from typing import Any

import numpy as np
import torch

from lipnorm.certify.rounding import UNIT_ROUNDOFF, gamma
from lipnorm.sigma import ConvergenceWarning, estimate_sigma, sigma_bounds

from ._torch_constraint_state import split_vectors, state_of_vectors, validated_vectors
from ._torch_constraint_targets import Target, discover_targets
from ._torch_stack_certificate import certified_upper, certify_levels, gram_stack

__all__ = ["SpectralConstraint"]

PROJECTIONS = ("scale", "hammer")
#: Certify-and-project rounds per step before a matrix is reported as not certifiable: one
#: suffices for float32 and float64 weights, low precision may need a second.
MAX_ROUNDS = 4
#: Iterations of the warm estimate per step (it only chooses the projection; the certificate
#: decides, so an estimate that stops early costs a second factorization, not soundness).
ESTIMATE_MAX_ITER = 50
#: Matrices of a group whose float64 copies are formed at once, in elements.
CHUNK_ELEMENTS = 2**25


@dataclasses.dataclass
class _Group:
    """Matrix and stack targets of one matrix shape, dtype and device, estimated and
    certified together.

    ``vectors`` holds the warm starts of every matrix of the group, ``(u, v)`` of shapes
    ``(batch, p)`` and ``(batch, q)``: the top singular vectors of the matrices (hammer) or
    the top eigenvector of their Gram matrices, twice (scale); None before the first estimate.
    A zero row (a matrix not estimated yet) starts from a random vector.
    """

    targets: list[Target]
    vectors: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def counts(self) -> list[int]:
        return [target.count for target in self.targets]

    def gather(self) -> torch.Tensor:
        """A copy of every matrix of the group, stacked: ``(batch, m, n)`` in the weights' dtype."""
        return torch.cat([target.matrices() for target in self.targets])

    def _locate(self, rows: np.ndarray):
        """``(target, local rows, positions in rows)`` for every target holding some of ``rows``."""
        start = 0
        for target in self.targets:
            inside = np.flatnonzero((rows >= start) & (rows < start + target.count))
            if inside.size:
                yield target, (rows[inside] - start).tolist(), inside
            start += target.count

    def owner(self, row: int) -> str:
        """The name of the parameter (and index in a stack) that holds matrix ``row``."""
        target, (local,), _ = next(self._locate(np.array([row])))
        if target.kind != "stack":
            return target.name
        return f"{target.name}[{', '.join(map(str, np.unravel_index(local, target.index_shape)))}]"

    def views(self, rows: np.ndarray) -> torch.Tensor | list[torch.Tensor]:
        """The matrices ``rows``: one ``(k, m, n)`` tensor where a single stack holds them all,
        else a list of ``(m, n)`` views of the parameters (for :func:`gram_stack`)."""
        located = list(self._locate(rows))
        if len(located) == 1 and located[0][0].kind == "stack":
            target, local, _ = located[0]
            matrices = target.matrices()
            return matrices[torch.as_tensor(local, device=matrices.device)]
        found: list[Any] = [None] * rows.size
        for target, local, positions in located:
            matrices = target.matrices()
            for row, position in zip(local, positions):
                found[position] = matrices[row]
        return found

    def write_(self, rows: np.ndarray, values: torch.Tensor) -> None:
        """Write ``values[i]`` into matrix ``rows[i]``, in place in the parameters."""
        for target, local, positions in self._locate(rows):
            target.write_(local, values[torch.as_tensor(positions, device=values.device)])

    def scale_(self, rows: np.ndarray, factors: np.ndarray) -> np.ndarray:
        """Multiply matrix ``rows[i]`` by ``factors[i]`` in place (the product rounded once in
        the arithmetic dtype, float32 at least, then to the weights'); return the factors
        as the arithmetic held them."""
        held = np.empty(rows.size)
        for target, local, positions in self._locate(rows):
            matrices = target.matrices()
            arithmetic = _opmath_dtype(matrices.dtype)
            factor = torch.as_tensor(factors[positions], dtype=arithmetic, device=matrices.device)
            held[positions] = factor.double().cpu().numpy()
            if len(local) == 1 and arithmetic == matrices.dtype and target.is_view(matrices):
                matrices[local[0]].mul_(factor[0])  # one pass, in place
                continue
            index = torch.as_tensor(local, device=matrices.device)
            target.write_(local, (matrices[index].to(arithmetic) * factor[:, None, None]).to(matrices.dtype))
        return held

    def frobenius_filter(self) -> np.ndarray:
        """An upper bound of ``||W_i||_F`` per matrix, from a norm in float32 (or wider); a
        NaN or Inf entry is named in a ValueError.

        ``fl(sum w^2)`` in a dtype of unit roundoff ``u`` is within ``gamma_{mn+1}`` of the
        exact sum (any summation order): the bound is ``inf`` where ``2 (mn + 2) u >= 1/2``.
        """
        norms = []
        for target in self.targets:
            matrices = target.matrices()
            arithmetic = _opmath_dtype(matrices.dtype)
            norms.append(torch.linalg.vector_norm(matrices, dim=(-2, -1), dtype=arithmetic))
        norms = torch.cat(norms)
        host = norms.double().cpu().numpy()
        if not np.all(np.isfinite(host)):
            finite = torch.cat([torch.isfinite(t.matrices()).flatten(1).all(dim=1) for t in self.targets])
            bad = np.flatnonzero(~finite.cpu().numpy())
            if bad.size:
                raise ValueError(f"{', '.join(self.owner(row) for row in bad)} holds NaN or Inf after the "
                                 "optimizer step; the constraint keeps no such weight (lower the learning "
                                 "rate, clip gradients, or restore a checkpoint)")
        m, n = self.targets[0].matrix_shape
        u = _unit_roundoff(norms.dtype)
        relative = 2 * (m * n + 2) * u
        if relative >= 0.5:
            return np.full(host.shape, np.inf)
        return host / math.sqrt(1.0 - relative) / (1.0 - 2 * u) * (1.0 + 4 * UNIT_ROUNDOFF)

    def estimate(self, matrices: torch.Tensor, rows: np.ndarray, rtol: float) -> tuple[np.ndarray, torch.Tensor]:
        """Warm-started Lanczos on ``matrices`` (the group's rows ``rows``, or their Gram
        matrices); store the new vectors.

        Returns
        -------
        sigma : numpy.ndarray, float64, shape (len(rows),)
        v : torch.Tensor, shape (len(rows), n)
            The right singular vector estimates.
        """
        total = sum(self.counts)
        index = torch.as_tensor(rows, device=matrices.device)
        state = None if self.vectors is None else state_of_vectors(*(vector[index] for vector in self.vectors))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # the certificate decides
            sigma, state = estimate_sigma(matrices, batched=True, method="lanczos", state=state,
                                          return_state=True, rtol=rtol, max_iter=ESTIMATE_MAX_ITER)
        if self.vectors is None:
            self.vectors = tuple(vector.new_zeros((total, vector.shape[-1])) for vector in (state.u, state.v))
        for stored, new in zip(self.vectors, (state.u, state.v)):
            stored[index] = new.to(stored.dtype)
        return sigma.double().cpu().numpy(), state.v


class SpectralConstraint:
    """Cap the largest singular value of every weight matrix after each optimizer step, certified.

    After :meth:`step` (or each ``optimizer.step()`` once :meth:`attach` ed), every constrained
    matrix has ``sigma_max <= max_sigma * (1 + rtol)``, proven in float64 with its rounding
    accounted for; a matrix whose warm estimate is at most ``max_sigma`` and that passes the
    proof is left bit-for-bit untouched. See the module docstring for the algorithm and
    ``docs/constraints.md`` for when to prefer it to spectral normalization.

    Parameters
    ----------
    module_or_params : torch.nn.Module or iterable of Parameter or (name, Parameter)
        A module: every ``Linear`` weight, every convolution kernel (read as ``mode`` says),
        every other parameter of two axes (a matrix) or more (a stack of matrices over the
        leading axes, e.g. MoE experts ``(E, d, f)``). Embeddings and parameters of fewer than
        two axes (biases, norms' scales) are left out unless named in ``include``.
        Parameters given directly are each constrained (at least two axes each; three or more
        are stacks).
    max_sigma : float
        The cap ``R``, positive and finite.
    rtol : float
        Relative slack of the certified cap, ``sigma_max <= R (1 + rtol)``; in (0, 1).
    projection : {"scale", "hammer"}
        ``"scale"``: ``W <- W * min(1, R / sigma)``; ``"hammer"``: the top singular value is
        set to ``R`` by a rank-one update from the warm singular vectors (the other singular
        values stay; if one of them is also above the cap, or the vectors were not accurate
        enough, the certificate fails and the matrix is then scaled).
    mode : {"matrix", "operator"}
        How convolution kernels are read: ``"matrix"``, torch's reshaped view (as
        ``torch.nn.utils.spectral_norm``); ``"operator"``, the convolution itself on
        ``input_shape`` (its true Lipschitz constant; ``"scale"`` projection only).
    input_shape : sequence of int or mapping of str to sequence of int, optional
        ``mode="operator"``: one input without the batch axis, ``(C, *spatial)``, for every
        convolution, or a mapping from each convolution's module name to its own.
    include, exclude : sequence of str
        Qualified parameter names to add to, or leave out of, a module's targets.

    Raises
    ------
    ValueError
        ``max_sigma`` not positive and finite, ``rtol`` not in (0, 1), an unknown
        ``projection`` or ``mode``, ``"hammer"`` with ``mode="operator"``, a parameter named
        explicitly with fewer than two axes, an unknown name, or nothing to constrain (see
        :func:`._torch_constraint_targets.discover_targets`).
    TypeError
        Neither a module nor an iterable of parameters.

    Examples
    --------
    >>> import torch
    >>> from lipnorm.backends.torch import SpectralConstraint
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    >>> constraint = SpectralConstraint(model, max_sigma=1.0)
    >>> handle = constraint.attach(optimizer)
    >>> loss = model(torch.randn(16, 32)).square().mean()
    >>> loss.backward()
    >>> optimizer.step()
    >>> all(bound <= 1.0 * (1 + 1e-3) for bound in constraint.certify().values())
    True

    References
    ----------
    Newhouse, Hess, Cesista, Zahorodnii, Bernstein, Isola, "Training Transformers with
    Enforced Lipschitz Constants", arXiv:2507.13338, 2025 (the spectral hammer).
    Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., SIAM 2002, Thm 10.3.
    """

    def __init__(self, module_or_params, max_sigma: float = 1.0, *, rtol: float = 1e-3,
                 projection: str = "scale", mode: str = "matrix", input_shape=None,
                 include=(), exclude=()) -> None:
        self.max_sigma = _positive_finite(max_sigma, "max_sigma")
        if isinstance(rtol, bool) or not (isinstance(rtol, numbers.Real) and 0 < rtol < 1):
            raise ValueError(f"rtol must be a number in (0, 1), got {rtol!r}")
        self.rtol = float(rtol)
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be 'scale' or 'hammer', got {projection!r}")
        if projection == "hammer" and mode == "operator":
            raise ValueError("projection='hammer' is a rank-one update of a matrix; a convolution's "
                             "operator is not one: use projection='scale' with mode='operator'")
        self.projection = projection
        self.mode = mode
        self._targets = discover_targets(module_or_params, include=include, exclude=exclude,
                                         mode=mode, input_shape=input_shape)
        self._groups = _grouped(self._targets)
        self._operator_states: dict[str, Any] = {t.name: None for t in self._targets if t.kind == "operator"}

    @property
    def cap(self) -> float:
        """The certified cap ``max_sigma * (1 + rtol)``."""
        return self.max_sigma * (1.0 + self.rtol)

    @property
    def names(self) -> list[str]:
        """The qualified names of the constrained parameters, in order."""
        return [target.name for target in self._targets]

    def __repr__(self) -> str:
        lines = [f"  {target.describe()}" for target in self._targets]
        return (f"SpectralConstraint(max_sigma={self.max_sigma:g}, rtol={self.rtol:g}, "
                f"projection={self.projection!r}, mode={self.mode!r}) on {len(lines)} parameters:\n"
                + "\n".join(lines))

    # ------------------------------------------------------------------ stepping

    def step(self) -> None:
        """Project and certify every constrained matrix (call after ``optimizer.step()``).

        Raises
        ------
        ValueError
            A constrained parameter holds NaN or Inf (it is named; nothing is written).
        RuntimeError
            A matrix could not be certified under the cap in ``MAX_ROUNDS`` rounds (not
            expected; the message names it).
        """
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            for device_type in {target.param.device.type for target in self._targets}:
                stack.enter_context(torch.autocast(device_type, enabled=False))  # if called inside one
            for group in self._groups:
                self._step_group(group)
            for target in self._targets:
                if target.kind == "operator":
                    self._step_operator(target)

    def attach(self, optimizer: torch.optim.Optimizer):
        """Run :meth:`step` after every ``optimizer.step()`` (``register_step_post_hook``).

        Parameters
        ----------
        optimizer : torch.optim.Optimizer

        Returns
        -------
        torch.utils.hooks.RemovableHandle
            ``handle.remove()`` detaches the constraint.
        """
        return optimizer.register_step_post_hook(lambda optimizer, args, kwargs: self.step())

    def _step_group(self, group: _Group) -> None:
        active = np.flatnonzero(group.frobenius_filter() > self.cap)
        if not active.size:
            return
        if self.projection == "hammer":
            self._hammer_(group, active)
            self._certify_rows(group, active)
        else:
            self._certify_rows(group, self._scale_certified_(group, active))

    def _aim(self, dtype: torch.dtype) -> float:
        """Where projections put sigma: ``max_sigma``, less a unit roundoff of float16 and
        bfloat16 weights (so rounding the stored values seldom lands above the cap)."""
        return self.max_sigma * (1.0 - _low_precision_roundoff(dtype))

    def _scale_certified_(self, group: _Group, active: np.ndarray) -> np.ndarray:
        """Scale mode: certify each active matrix, then scale it by ``max_sigma / upper`` where
        ``upper > max_sigma``; return the rows whose stored result the rounding bound does
        not prove under the cap (low-precision weights), to be certified again.

        The top eigenvalue of each Gram matrix comes from Lanczos warm-started from the last
        step's eigenvector, to ``rtol / 2``; one factorization then proves either the cap
        (estimate at most ``max_sigma``) or ``sigma <= estimate * (1 + rtol / 4)``, the bound
        the scale factor uses (so the result lands at most about ``rtol / 4`` below
        ``max_sigma``). A failed proof gets a tight bound from :func:`certified_upper`.
        """
        dtype = group.targets[0].param.dtype
        m, n = group.targets[0].matrix_shape
        unproven = []
        for chunk in _chunks(active, m * n):
            grams = gram_stack(group.views(chunk))
            estimates, _ = group.estimate(grams.gram, chunk, self.rtol / 2)
            sigmas = np.sqrt(estimates) / grams.scale
            under = sigmas <= self.max_sigma
            upper = certify_levels(grams, np.where(under, self.cap, sigmas * (1.0 + self.rtol / 4)))
            failed = ~np.isfinite(upper)
            if failed.any():
                upper[failed] = certified_upper(grams.subset(np.flatnonzero(failed)))
            # Under the cap by the test: left alone. Otherwise scaled (the bound is above R).
            over = np.flatnonzero((~under | failed) & (upper > self.max_sigma))
            if over.size:
                held = group.scale_(chunk[over], self._aim(dtype) / upper[over])
                bounds = _scaled_bounds(held, upper[over], grams.frobenius_upper()[over], dtype, m * n)
                unproven.append(chunk[over][bounds > self.cap])
        return np.concatenate(unproven) if unproven else active[:0]

    def _hammer_(self, group: _Group, active: np.ndarray) -> None:
        """Hammer mode: set the top singular value of every active matrix whose warm estimate
        ``s = ||W v||`` is above ``max_sigma`` to ``max_sigma``, by ``W += (R - s) u v^T``,
        ``u = W v / s``."""
        views = group.views(active)
        matrices = views if isinstance(views, torch.Tensor) else torch.stack(views)
        _, right = group.estimate(matrices, active, self.rtol / 4)
        arithmetic = _opmath_dtype(matrices.dtype)
        matrices = matrices.to(arithmetic)
        right = right.to(arithmetic)
        image = torch.linalg.matmul(matrices, right.unsqueeze(-1))[..., 0]
        estimates = torch.linalg.vector_norm(image, dim=-1).double().cpu().numpy()
        over = np.flatnonzero(estimates > self.max_sigma)
        if not over.size:
            return
        coefficients = (self._aim(group.targets[0].param.dtype) - estimates[over]) / estimates[over]
        picked = torch.as_tensor(over, device=matrices.device)
        coefficients = torch.as_tensor(coefficients, dtype=arithmetic, device=matrices.device)
        update = (image[picked] * coefficients[:, None]).unsqueeze(-1) @ right[picked].unsqueeze(-2)
        group.write_(active[over], (matrices[picked] + update).to(group.targets[0].param.dtype))

    def _certify_rows(self, group: _Group, pending: np.ndarray) -> None:
        """Certify matrices ``pending`` under the cap as stored; scale those that fail by
        ``aim / upper`` in place, and certify again those the rounding bound does not prove."""
        dtype = group.targets[0].param.dtype
        m, n = group.targets[0].matrix_shape
        aim = self._aim(dtype)
        for round_ in range(MAX_ROUNDS):
            if not pending.size:
                return
            failed, uppers, frobenius = [], [], []
            for chunk in _chunks(pending, m * n):
                grams = gram_stack(group.views(chunk))
                rejected = np.flatnonzero(~np.isfinite(certify_levels(grams, np.full(chunk.size, self.cap))))
                if rejected.size:
                    subset = grams.subset(rejected)
                    failed.append(chunk[rejected])
                    uppers.append(certified_upper(subset))
                    frobenius.append(subset.frobenius_upper())
            if not failed:
                return
            pending, upper, frobenius = map(np.concatenate, (failed, uppers, frobenius))
            held = group.scale_(pending, aim / upper)
            pending = pending[_scaled_bounds(held, upper, frobenius, dtype, m * n) > self.cap]
            aim *= 1.0 - 2.0**round_ * max(_low_precision_roundoff(dtype), self.rtol / 16)
        if pending.size:
            raise RuntimeError(f"could not certify sigma <= {self.cap:g} for "
                               f"{', '.join(group.owner(row) for row in pending)} in {MAX_ROUNDS} rounds; "
                               "please report this with the weights")

    def _step_operator(self, target: Target) -> None:
        kernel = target.param.detach()
        if _tap_frobenius_upper(kernel, target.name) <= self.cap:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # the certificate decides
            estimate, self._operator_states[target.name] = estimate_sigma(
                target.operator(), method="lanczos", state=self._operator_states[target.name],
                return_state=True, rtol=self.rtol / 4, max_iter=ESTIMATE_MAX_ITER)
        aim = self._aim(kernel.dtype)
        if float(estimate) > self.max_sigma:
            _scale_kernel_(kernel, aim / float(estimate))
        for round_ in range(MAX_ROUNDS):
            upper = sigma_bounds(target.operator()).upper
            if upper <= self.cap:
                return
            frobenius = _tap_frobenius_upper(kernel, target.name)
            held = _scale_kernel_(kernel, aim / upper)
            if _scaled_bounds(np.array([held]), np.array([upper]), np.array([frobenius]), kernel.dtype,
                              kernel.numel())[0] <= self.cap:
                return
            aim *= 1.0 - 2.0**round_ * max(_low_precision_roundoff(kernel.dtype), self.rtol / 16)
        raise RuntimeError(f"could not certify sigma <= {self.cap:g} for {target.name!r} in {MAX_ROUNDS} "
                           "rounds; please report this with the weights")

    # ------------------------------------------------------------------ certify, state

    def certify(self) -> dict[str, float | np.ndarray]:
        """Certified upper bounds of every constrained parameter's sigma, by :func:`lipnorm.sigma_bounds`.

        Returns
        -------
        dict
            ``name -> upper`` (a float; for a stack, a float64 array of the stack's leading
            shape). A bound above the cap is named in a ``UserWarning``.
        """
        result: dict[str, float | np.ndarray] = {}
        for group in self._groups:
            _, upper = sigma_bounds(group.gather(), batched=True)
            start = 0
            for target in group.targets:
                values = np.asarray(upper, dtype=np.float64).reshape(-1)[start:start + target.count]
                result[target.name] = values.reshape(target.index_shape) if target.kind == "stack" \
                    else float(values[0])
                start += target.count
        for target in self._targets:
            if target.kind == "operator":
                result[target.name] = sigma_bounds(target.operator()).upper
        result = {target.name: result[target.name] for target in self._targets}
        above = [name for name, upper in result.items() if np.max(upper) > self.cap]
        if above:
            warnings.warn(f"certified sigma above the cap {self.cap:g}: {', '.join(above)}", UserWarning,
                          stacklevel=2)
        return result

    def state_dict(self) -> dict[str, Any]:
        """The warm-start vectors, by parameter name, and the settings they belong to.

        Returns
        -------
        dict
            ``{"max_sigma", "rtol", "projection", "mode", "vectors": {name: {"u": Tensor,
            "v": Tensor}}}`` (see :mod:`._torch_constraint_state` for the shapes); the names
            whose vectors do not exist yet (nothing estimated) are absent. Plain tensors and
            numbers: ``torch.save`` and ``torch.load(weights_only=True)`` take it.
        """
        vectors = {}
        for group in self._groups:
            if group.vectors is not None:
                vectors.update(zip((t.name for t in group.targets), split_vectors(group.vectors, group.counts)))
        for name, state in self._operator_states.items():
            if state is not None:
                vectors[name] = {"u": state.u.clone(), "v": state.v.clone()}
        return {**self._settings(), "vectors": vectors}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the warm-start vectors of :meth:`state_dict`, so a resumed run continues exactly.

        Raises
        ------
        ValueError
            Settings other than this constraint's, a name it does not constrain, or vectors
            of the wrong shape.
        """
        for key, value in self._settings().items():
            if state_dict.get(key) != value:
                raise ValueError(f"the state was saved with {key}={state_dict.get(key)!r}, this constraint "
                                 f"has {key}={value!r}")
        vectors = dict(state_dict.get("vectors", {}))
        unknown = sorted(set(vectors) - set(self.names))
        if unknown:
            raise ValueError(f"the state holds vectors of {unknown}, which this constraint does not constrain")
        for group in self._groups:
            group.vectors = validated_vectors(group.targets, vectors, self._vector_shapes)
        for target in self._targets:
            if target.kind == "operator":
                pair = validated_vectors([target], vectors, self._vector_shapes)
                self._operator_states[target.name] = None if pair is None else state_of_vectors(*pair)

    def _settings(self) -> dict[str, Any]:
        return {"max_sigma": self.max_sigma, "rtol": self.rtol, "projection": self.projection, "mode": self.mode}

    def _vector_shapes(self, target: Target) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of a target's saved ``u`` and ``v``."""
        if target.kind == "operator":
            m, n = target.operator().shape
            return (m,), (n,)
        m, n = target.matrix_shape
        if self.projection == "scale":
            m = n = min(m, n)
        return (target.count, m), (target.count, n)


# ---------------------------------------------------------------------- helpers


def _positive_finite(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _grouped(targets: list[Target]) -> list[_Group]:
    groups: dict[tuple, _Group] = {}
    for target in targets:
        if target.kind == "operator":
            continue
        key = (target.matrix_shape, target.param.dtype, target.param.device)
        groups.setdefault(key, _Group([])).targets.append(target)
    return list(groups.values())


def _chunks(rows: np.ndarray, matrix_elements: int):
    size = max(1, CHUNK_ELEMENTS // max(matrix_elements, 1))
    for start in range(0, rows.size, size):
        yield rows[start:start + size]


def _opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic on ``dtype`` weights runs in: float32 at least."""
    return torch.promote_types(dtype, torch.float32)


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _low_precision_roundoff(dtype: torch.dtype) -> float:
    """The unit roundoff of float16 and bfloat16 (projections aim that far below the cap), else 0."""
    return _unit_roundoff(dtype) if torch.finfo(dtype).bits < 32 else 0.0


def _scale_kernel_(kernel: torch.Tensor, factor: float) -> float:
    """Multiply ``kernel`` by ``factor`` in place (rounded once in float32 or wider, then to the
    kernel's dtype); return the factor as the arithmetic held it."""
    arithmetic = _opmath_dtype(kernel.dtype)
    held = torch.tensor(factor, dtype=arithmetic, device=kernel.device)
    kernel.copy_((kernel.to(arithmetic) * held).to(kernel.dtype))
    return float(held)


def _scaled_bounds(held: np.ndarray, uppers: np.ndarray, frobenius: np.ndarray, dtype: torch.dtype,
                   entries: int) -> np.ndarray:
    """Certified sigma bounds of weights after scaling by ``held`` (as the arithmetic held it).

    Each stored entry is ``c w (1 + e)`` with ``|e| <= u_op + u + u_op u`` (the product
    rounded in the arithmetic's dtype, unit roundoff ``u_op``, then to the weights', ``u``),
    or, in the subnormal range, within one subnormal step of it, so

        sigma(stored) <= c * upper + (u_op + u + u_op u) * c * frobenius + entries * step.

    Parameters
    ----------
    held, uppers, frobenius : numpy.ndarray, float64, shape (k,)
        The factors, and certified bounds of sigma and of ``||W||_F`` (or of any norm of the
        entries that bounds the map's norm, such as a kernel's norms summed over its taps)
        before scaling.
    dtype : torch.dtype
        The weights' dtype.
    entries : int
        Entries of each weight.
    """
    u, u_op = _unit_roundoff(dtype), _unit_roundoff(_opmath_dtype(dtype))
    info = torch.finfo(dtype)
    relative = u_op + u + u_op * u
    bound = held * uppers + relative * held * frobenius + entries * info.smallest_normal * info.eps
    return bound * (1.0 + 8 * UNIT_ROUNDOFF)


def _tap_frobenius_upper(kernel: torch.Tensor, name: str) -> float:
    """Certified ``sum over spatial taps of ||K[:, :, tap]||_F``: a bound on the norm of the
    convolution with any stride, padding, dilation and groups (a sum over taps of a shift,
    of norm at most 1, times the tap's channel matrix). NaN or Inf entries are named."""
    taps = kernel.flatten(2)
    norms = torch.linalg.vector_norm(taps, dim=(0, 1), dtype=torch.float64).cpu().numpy()
    if not np.all(np.isfinite(norms)):
        raise ValueError(f"{name} holds NaN or Inf after the optimizer step; the constraint keeps no such "
                         "weight (lower the learning rate, clip gradients, or restore a checkpoint)")
    norms = norms * (1.0 + gamma(taps.shape[0] * taps.shape[1] + 1))
    return float(np.sum(norms)) * (1.0 + gamma(norms.size + 1)) * (1.0 + 4 * UNIT_ROUNDOFF)
