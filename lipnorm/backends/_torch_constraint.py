"""Spectral constraints for PyTorch: after each optimizer step, every constrained matrix has a
certified ``sigma_max <= max_sigma * (1 + rtol)``.

A constraint does not change the forward pass (unlike spectral normalization): it projects the
weights themselves, after the optimizer has updated them. Each step, for every constrained
matrix ``W`` (same-shaped matrices batched together):

1. ``||W||_F`` (float64, rounding included) is at most the cap: ``W`` is left untouched, with
   no further work. It is also where a NaN or Inf weight is found, and named.
2. A warm-started estimate ``s = ||W v||`` (``v`` kept from the last step, refined by
   :func:`lipnorm.estimate_sigma`) is above ``max_sigma``: ``W`` is projected, ``"scale"``:
   ``W <- W * max_sigma / s``; ``"hammer"``: ``W <- W + (max_sigma - s) u v^T`` with
   ``u = W v / s``, which sets the top singular value to ``max_sigma`` and leaves the others.
3. The stored ``W`` is *certified*: one float64 Cholesky factorization of its Gram matrix
   proves ``sigma_max <= cap`` (:mod:`._torch_stack_certificate`; for a convolution in
   operator mode, :func:`lipnorm.sigma_bounds` of the convolution). An estimate can only be
   low (power iteration approaches sigma from below), so where the proof fails, ``W`` is
   scaled by ``max_sigma / upper`` with ``upper`` a tight certified bound, and the rounding
   of that product is bounded too (float32 and float64 weights) or the stored result is
   certified again (bfloat16 and float16, whose projections aim at
   ``max_sigma * (1 - u)``, ``u`` their unit roundoff).

A matrix whose estimate is at most ``max_sigma`` and whose certificate passes is not written
to: it stays bit-for-bit what the optimizer left.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from typing import Any

import numpy as np
import torch

from lipnorm.certify.rounding import UNIT_ROUNDOFF, gamma
from lipnorm.sigma import ConvergenceWarning, estimate_sigma, sigma_bounds

from ._torch_constraint_state import split_group_state, validated_vectors
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
    certified together."""

    targets: list[Target]
    state: Any = None  # the batched SigmaState of the stacked matrices, or None before the first step

    @property
    def counts(self) -> list[int]:
        return [target.count for target in self.targets]

    def gather(self) -> torch.Tensor:
        """A copy of every matrix of the group, stacked: ``(batch, m, n)`` in the weights' dtype."""
        return torch.cat([target.matrices() for target in self.targets])

    def owner(self, row: int) -> str:
        """The name of the parameter (and index in a stack) that holds matrix ``row``."""
        for target in self.targets:
            if row < target.count:
                if target.kind != "stack":
                    return target.name
                return f"{target.name}[{', '.join(map(str, np.unravel_index(row, target.index_shape)))}]"
            row -= target.count
        raise IndexError(row)

    def scatter(self, stack: torch.Tensor, changed: np.ndarray) -> None:
        """Write back the targets of which at least one matrix changed."""
        start = 0
        for target in self.targets:
            stop = start + target.count
            if changed[start:stop].any():
                target.store(stack[start:stop])
            start = stop


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
        with torch.no_grad():
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
        stack = group.gather()
        frobenius = self._frobenius_upper(stack, group.owner)
        active = frobenius > self.cap
        if not active.any():
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # the certificate decides
            _, group.state = estimate_sigma(stack, batched=True, method="lanczos", state=group.state,
                                            return_state=True, rtol=self.rtol / 4, max_iter=ESTIMATE_MAX_ITER)
        right = group.state.v
        image = torch.linalg.matmul(_opmath(stack), right.to(_opmath_dtype(stack.dtype)).unsqueeze(-1))[..., 0]
        estimates = torch.linalg.vector_norm(image, dim=-1).double().cpu().numpy()
        aim = self.max_sigma * (1.0 - _low_precision_roundoff(stack.dtype))
        over = np.flatnonzero(active & (estimates > self.max_sigma))
        changed = np.zeros(len(stack), dtype=bool)
        if over.size:
            rows = torch.as_tensor(over, device=stack.device)
            matrices = _opmath(stack[rows])
            if self.projection == "hammer":
                coefficients = torch.as_tensor((aim - estimates[over]) / estimates[over], device=stack.device)
                update = (image[rows] * coefficients.to(image.dtype)[:, None]).unsqueeze(-1) @ \
                    right[rows].to(image.dtype).unsqueeze(-2)
                projected = matrices + update
            else:
                factors = torch.as_tensor(aim / estimates[over], device=stack.device)
                projected = matrices * factors.to(matrices.dtype)[:, None, None]
            stack[rows] = projected.to(stack.dtype)
            changed[over] = True
        self._certify_rows(stack, np.flatnonzero(active), aim, changed, group.owner)
        group.scatter(stack, changed)

    def _certify_rows(self, stack, pending, aim, changed, owner) -> None:
        """Certify ``stack[pending] <= cap``; scale what fails by ``aim / upper``, in place."""
        for round_ in range(MAX_ROUNDS):
            failed, uppers = [], []
            for chunk in _chunks(pending, stack[0].numel()):
                grams = gram_stack(stack[torch.as_tensor(chunk, device=stack.device)])
                rejected = np.flatnonzero(~np.isfinite(certify_levels(grams, np.full(chunk.size, self.cap))))
                if rejected.size:
                    failed.append(chunk[rejected])
                    uppers.append(certified_upper(grams.subset(rejected)))
            if not failed:
                return
            pending, upper = np.concatenate(failed), np.concatenate(uppers)
            rows = torch.as_tensor(pending, device=stack.device)
            frobenius = self._frobenius_upper(stack[rows], owner)
            bounds = _scale_rows_(stack, rows, aim / upper, upper, frobenius)
            changed[pending] = True
            pending = pending[bounds > self.cap]
            if not pending.size:
                return
            aim *= 1.0 - 2.0**round_ * max(_low_precision_roundoff(stack.dtype), self.rtol / 16)
        names = ", ".join(owner(row) for row in pending)
        raise RuntimeError(f"could not certify sigma <= {self.cap:g} for {names} in {MAX_ROUNDS} rounds; "
                           "please report this with the weights")

    def _step_operator(self, target: Target) -> None:
        kernel = target.param.detach()
        frobenius = self._tap_frobenius_upper(kernel, target.name)
        if frobenius <= self.cap:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            estimate, self._operator_states[target.name] = estimate_sigma(
                target.operator(), method="lanczos", state=self._operator_states[target.name],
                return_state=True, rtol=self.rtol / 4, max_iter=ESTIMATE_MAX_ITER)
        estimate = float(estimate)
        aim = self.max_sigma * (1.0 - _low_precision_roundoff(kernel.dtype))
        if estimate > self.max_sigma:
            kernel.copy_((_opmath(kernel) * (aim / estimate)).to(kernel.dtype))
        for round_ in range(MAX_ROUNDS):
            upper = sigma_bounds(target.operator()).upper
            if upper <= self.cap:
                return
            frobenius = self._tap_frobenius_upper(kernel, target.name)
            factor = np.array([aim / upper])
            scaled = kernel.unsqueeze(0)
            bound = _scale_rows_(scaled, torch.zeros(1, dtype=torch.long, device=kernel.device), factor,
                                 np.array([upper]), np.array([frobenius]))
            if bound[0] <= self.cap:
                return
            aim *= 1.0 - 2.0**round_ * max(_low_precision_roundoff(kernel.dtype), self.rtol / 16)
        raise RuntimeError(f"could not certify sigma <= {self.cap:g} for {target.name!r} in {MAX_ROUNDS} "
                           "rounds; please report this with the weights")

    # ------------------------------------------------------------------ bounds

    def _frobenius_upper(self, stack: torch.Tensor, owner) -> np.ndarray:
        """Certified ``||W_i||_F`` of every matrix (float64); NaN or Inf entries are named."""
        squares = torch.linalg.vector_norm(stack, dim=(-2, -1), dtype=torch.float64).cpu().numpy()
        if not np.all(np.isfinite(squares)):
            finite = torch.isfinite(stack).flatten(1).all(dim=1).cpu().numpy()
            if not finite.all():
                names = ", ".join(owner(row) for row in np.flatnonzero(~finite))
                raise ValueError(f"{names} holds NaN or Inf after the optimizer step; the constraint "
                                 "keeps no such weight (lower the learning rate, clip gradients, or "
                                 "restore a checkpoint)")
        m, n = stack.shape[-2:]
        return squares * (1.0 + gamma(m * n + 1)) * (1.0 + 4 * UNIT_ROUNDOFF)

    def _tap_frobenius_upper(self, kernel: torch.Tensor, name: str) -> float:
        """Certified ``sum over spatial taps of ||K[:, :, tap]||_F``, a bound on the norm of
        the convolution with any stride, padding, dilation and groups."""
        taps = kernel.flatten(2).movedim(-1, 0)
        norms = self._frobenius_upper(taps, lambda _: name)
        return float(np.sum(norms)) * (1.0 + gamma(len(norms))) * (1.0 + 4 * UNIT_ROUNDOFF)

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
            "v": Tensor}}}``; names whose vectors do not exist yet (before their first
            estimate) are absent.
        """
        vectors = {}
        for group in self._groups:
            if group.state is not None:
                for target, pair in zip(group.targets, split_group_state(group.state, group.counts)):
                    vectors[target.name] = pair
        for name, state in self._operator_states.items():
            if state is not None:
                vectors[name] = {"u": state.u, "v": state.v}
        return {"max_sigma": self.max_sigma, "rtol": self.rtol, "projection": self.projection,
                "mode": self.mode, "vectors": vectors}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the warm-start vectors of :meth:`state_dict`, so a resumed run continues exactly.

        Raises
        ------
        ValueError
            Settings other than this constraint's, a name it does not constrain, or vectors
            of the wrong shape.
        """
        settings = {"max_sigma": self.max_sigma, "rtol": self.rtol, "projection": self.projection,
                    "mode": self.mode}
        for key, value in settings.items():
            if state_dict.get(key) != value:
                raise ValueError(f"the state was saved with {key}={state_dict.get(key)!r}, this constraint "
                                 f"has {key}={value!r}")
        vectors = dict(state_dict.get("vectors", {}))
        unknown = sorted(set(vectors) - set(self.names))
        if unknown:
            raise ValueError(f"the state holds vectors of {unknown}, which this constraint does not constrain")
        for group in self._groups:
            group.state = validated_vectors(group.targets, vectors)
        for target in self._targets:
            if target.kind == "operator":
                self._operator_states[target.name] = validated_vectors([target], vectors)


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


def _opmath(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(_opmath_dtype(tensor.dtype))


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _low_precision_roundoff(dtype: torch.dtype) -> float:
    """The unit roundoff of float16 and bfloat16 (projections aim that far below the cap), else 0."""
    return _unit_roundoff(dtype) if torch.finfo(dtype).bits < 32 else 0.0


def _scale_rows_(stack: torch.Tensor, rows: torch.Tensor, factors: np.ndarray, uppers: np.ndarray,
                 frobenius: np.ndarray) -> np.ndarray:
    """Scale ``stack[rows]`` by ``factors`` in place; return certified sigma bounds of the result.

    With ``c`` the factor as the arithmetic holds it, every stored entry is ``c w (1 + e)``,
    ``|e| <= u_op + u + u_op u`` (the product rounded in the arithmetic's dtype, then to the
    weights'), and a subnormal result moves by at most one subnormal step, so

        sigma(stored) <= c * upper + (u_op + u + u_op u) * c * ||W||_F + (entries) * step.

    Parameters
    ----------
    stack : torch.Tensor, shape (batch, ...)
        Matrices, or kernels (each row is one weight).
    rows : torch.Tensor of int, shape (k,)
    factors, uppers, frobenius : numpy.ndarray, float64, shape (k,)
        The factors, certified sigma bounds and certified ``||W||_F`` (or any certified
        bound of the map's norm by the entries' sizes, e.g. summed over a kernel's taps)
        of the matrices before scaling.
    """
    arithmetic = _opmath_dtype(stack.dtype)
    held = torch.as_tensor(factors, dtype=arithmetic, device=stack.device)
    stack[rows] = (stack[rows].to(arithmetic) * held[:, None, None]).to(stack.dtype)
    exact = held.double().cpu().numpy()
    u, u_op = _unit_roundoff(stack.dtype), _unit_roundoff(arithmetic)
    info = torch.finfo(stack.dtype)
    subnormal_step = info.smallest_normal * info.eps
    relative = u_op + u + u_op * u
    bound = exact * uppers + relative * exact * frobenius + stack[0].numel() * subnormal_step
    return bound * (1.0 + 8 * UNIT_ROUNDOFF)
