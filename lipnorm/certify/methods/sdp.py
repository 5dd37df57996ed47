"""The SDP method: LipSDP-Neuron with slope ranges, solved on the multipliers, checked exactly.

Every unit of a :class:`~lipnorm.certify.network.DenseNetwork` gives quadratic
constraints on the increments of its input z and output w, for any two inputs of the model:

* an activation with slopes in [a, b], per neuron i: ``(Δw_i − aΔz_i)(bΔz_i − Δw_i) ≥ 0``;
* an opaque unit with bound L: ``L²‖Δz‖² − ‖Δw‖² ≥ 0``.

With multipliers λ ≥ 0 and v = (Δx, Δw_1, …, Δw_K), if

    M(ρ, λ) = ρ·J − F'F − Σ_i λ_i Q_i ⪰ 0       (J selects Δx; F v = Δf; Q_i the constraints)

then ‖Δf‖² ≤ ρ‖Δx‖² − Σ λ_i (constraint_i) ≤ ρ‖Δx‖²: the network is √ρ-Lipschitz. For
fixed λ whose w-block is negative definite (G = −H_ww ≻ 0, H = F'F + Σλ_i Q_i), the
smallest feasible ρ is ρ(λ) = λ_max(H_xx + H_xw G⁻¹ H_wx) (Schur complement), and
∂ρ/∂λ_i is the i-th constraint at the maximising v (envelope theorem). The multipliers are
optimised by Adam on log λ from a feasible start; whatever they end at is only a
proposal: the reported bound is √ρ for a ρ at which M(ρ, λ) is shown positive semidefinite
by a Cholesky factorization in float64 with every rounding error — of forming M, of the
network's blocks and of the factorization — bounded
(:func:`lipnorm.certificates.certify_positive_semidefinite`).

References
----------
.. [1] Fazlyab, Robey, Hassani, Morari, Pappas, "Efficient and accurate estimation of
   Lipschitz constants for deep neural networks", NeurIPS 2019 (LipSDP-Neuron, theorem 2).
.. [2] Wang, Chen, Ding, Li, Ma, "On the scalability and memory efficiency of semidefinite
   programs for Lipschitz constant estimation of neural networks", ICLR 2024 (the SDP as
   an eigenvalue problem solved by first-order steps).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from lipnorm.bounds import compose, round_up
from lipnorm.certificates import certify_positive_semidefinite
from lipnorm.certify.methods import TooLarge
from lipnorm.certify.network import DenseNetwork
from lipnorm.certify.rounding import UNIT_ROUNDOFF, frobenius_upper, gamma, sqrt_upper, vector_norm_upper

__all__ = ["PULL_BACK", "SdpProof", "SdpTooLarge", "certified_proposal", "check_multipliers", "minimum_seconds",
           "optimise_multipliers", "run", "sdp_bound"]

#: Floating-point rate assumed when judging whether the SDP fits a time budget (measured on a
#: busy 2-core CPU: a Cholesky factorization of order 2000 took 0.33 s).
_FLOPS_PER_SECOND = 3.0e9
#: Fewest optimisation steps worth starting.
_MIN_STEPS = 20
#: The optimisation stops when ρ has not dropped by this fraction in ``_STALL_STEPS`` steps.
_STALL_TOLERANCE = 3e-5
_STALL_STEPS = 25
#: Optimisation steps' worth of time kept for the exact check at the end.
_CHECK_STEPS = 8
#: Relative margins added to ρ before the exact check.
_SLACKS = (1e-7, 1e-5, 1e-3, 1e-2)
#: How far the multipliers are pulled back toward the feasible start where the check fails.
PULL_BACK = (0.0, 0.05, 0.25, 0.5)
#: The optimisation's soft maximum weighs eigenvalue μ by exp(SHARPNESS·(μ − λ_max)/λ_max).
_SHARPNESS = 200.0


class SdpTooLarge(TooLarge):
    """The SDP of this network cannot be solved within the time budget."""


@dataclass
class SdpProof:
    """Multipliers that certify ``rho``, and the network they certify it for.

    Attributes
    ----------
    network : DenseNetwork
    multipliers : list of ndarray
        λ (one per neuron) for each activation unit, μ (one) for each opaque unit.
    rho : float
        The certified squared bound: M(rho, multipliers) ⪰ 0 was checked exactly.
    row : ndarray or None
        The output row whose functional was bounded, if one was.
    """

    network: DenseNetwork
    multipliers: list[np.ndarray]
    rho: float
    row: np.ndarray | None = None

    def verify(self) -> float:
        """Check M(rho, multipliers) ⪰ 0 again from the stored data; return √rho.

        Raises
        ------
        ValueError
            If the check fails (the stored multipliers do not certify ``rho``).
        """
        problem = _Problem(self.network, self.row)
        if not check_multipliers(problem, self.multipliers, self.rho):
            raise ValueError("the stored multipliers do not certify the stored bound")
        return sqrt_upper(self.rho)


def run(context):
    """The SDP bound of the context's graph, through its dense view (see :mod:`lipnorm.certify.methods`).

    Its size is judged against the method's share of the budget before the dense view is
    built (from the torus view's windows where there is one). For output rows: each row's
    bound is ‖row‖ times the whole output's SDP bound (half the share), then one SDP per
    row (an equal part of the other half each, warm-started from the previous one); the
    smaller bound counts.
    """
    budget = context.share()
    hidden, inputs = _size(context)
    _check_fits(hidden, inputs, _step_seconds(hidden, inputs), budget)
    network = context.dense_network()
    if context.rows is None:
        return sdp_bound(network, time_budget=budget, deadline=context.deadline)
    rows = context.rows
    whole, whole_proof = sdp_bound(network, time_budget=budget / 2, deadline=context.deadline)
    proofs: list = [None] * len(rows)
    values = [compose([vector_norm_upper(row), whole]) for row in rows]
    start = whole_proof.multipliers
    for index, row in enumerate(rows):
        try:
            value, proof = sdp_bound(network, time_budget=budget / 2 / len(rows), row=row, start=start,
                                     deadline=context.deadline)
        except SdpTooLarge:
            break
        except ValueError:  # this row's multipliers failed the check: its cap stands
            continue
        if value < values[index]:
            values[index], proofs[index] = value, proof
        start = proof.multipliers
    return np.array(values), RowProofs(whole_proof, proofs, rows)


def minimum_seconds(context) -> float:
    """Estimated seconds of the fewest optimisation steps worth running (``_MIN_STEPS``).

    Raises
    ------
    NotApplicable
        Where the graph has no dense view.
    """
    hidden, inputs = _size(context)
    return _step_seconds(hidden, inputs) * _MIN_STEPS


def _size(context) -> tuple[int, int]:
    """(hidden neurons, input size) of the dense view: from the dense view where it was built,
    else from the torus view's windows (without building the dense view), else the dense view."""
    from lipnorm.certify.methods import NotApplicable

    built = context.views.get("dense")
    if not isinstance(built, DenseNetwork):
        try:
            torus = context.torus_network()
        except NotApplicable:
            torus = None
        if torus is not None:
            hidden = sum(unit.output_space.channels * math.prod(unit.output_space.window)
                         for unit in torus.units if unit.kind != "mask")
            space = torus.input_space
            return hidden, space.channels * math.prod(space.window)
        built = context.dense_network()
    return sum(unit.size_out for unit in built.units), built.input_size


def _check_fits(hidden: int, inputs: int, step_seconds: float, budget: float) -> None:
    estimate = step_seconds * _MIN_STEPS
    if estimate > budget:
        raise SdpTooLarge(
            f"the SDP has {inputs + hidden} variables ({hidden} hidden); {_MIN_STEPS} steps would take about "
            f"{estimate:.0f} s, more than its share of the time budget ({budget:.0f} s)")


@dataclass
class RowProofs:
    """SDP proofs of output rows: the whole output's, and a row's own where it was tighter."""

    whole: SdpProof
    proofs: list
    rows: np.ndarray

    def verify(self) -> np.ndarray:
        """Each row's bound computed again from the stored proofs."""
        whole = self.whole.verify()
        return np.array([compose([vector_norm_upper(row), whole]) if proof is None else proof.verify()
                         for row, proof in zip(self.rows, self.proofs)])


def sdp_bound(network: DenseNetwork, *, time_budget: float, row: np.ndarray | None = None,
              start: list[np.ndarray] | None = None, max_steps: int = 400, deadline: float | None = None):
    """LipSDP-Neuron bound of a dense network, certified.

    The number of optimisation steps is fixed up front: as many as the cost model fits in
    ``time_budget`` less the exact check (at least ``_MIN_STEPS``, at most ``max_steps``;
    fewer where ρ stalls). The clock only stops the optimisation early where ``deadline``
    passes (a machine slower than the cost model assumes).

    Parameters
    ----------
    network : DenseNetwork
    time_budget : float
        Seconds for the optimisation and the check, as the cost model counts them.
    row : ndarray, shape (output size,), optional
        Bound the functional ``x ↦ row · f(x)`` instead of ``f``.
    start : list of ndarray, optional
        Multipliers to start from (e.g. another row's), used when feasible.
    max_steps : int
        Most optimisation steps.
    deadline : float, optional
        ``time.perf_counter()`` value after which no step starts (default: ``time_budget``
        seconds from now).

    Returns
    -------
    (float, SdpProof)
        The certified bound and its proof.

    Raises
    ------
    SdpTooLarge
        If the estimated time of ``_MIN_STEPS`` steps exceeds the budget.
    ValueError
        If no multipliers could be certified (no bound is reported then).
    """
    step_seconds = _seconds_per_step(network)
    _check_fits(sum(unit.size_out for unit in network.units), network.input_size, step_seconds, time_budget)
    steps = min(max_steps, max(_MIN_STEPS, math.floor(time_budget / step_seconds) - _CHECK_STEPS))
    if deadline is None:
        deadline = time.perf_counter() + time_budget
    problem = _Problem(network, row)
    first = _feasible_start(problem, start)
    multipliers = optimise_multipliers(problem, first, deadline, steps)
    certified = certified_proposal(lambda m: problem.rho(m)[0], lambda m, rho: check_multipliers(problem, m, rho),
                                   multipliers, first, _SLACKS)
    if certified is None:
        raise ValueError("the SDP multipliers found could not be certified in float64")
    rho, multipliers = certified
    return sqrt_upper(rho), SdpProof(network, multipliers, rho, row)


def certified_proposal(rho_of, check, proposal: list[np.ndarray], start: list[np.ndarray], slacks
                       ) -> tuple[float, list[np.ndarray]] | None:
    """The first ρ and multipliers that pass the exact check: the optimiser's proposal, else
    the proposal pulled back toward the feasible start.

    The optimiser can end at the edge of feasibility (the hidden part nearly singular, e.g.
    where an opaque unit reads the input alone), where rounding defeats the check. The set
    of (ρ, λ) with M(ρ, λ) ⪰ 0 is convex (M is affine in both), so on the segment
    ``(1 − t) λ + t λ_start`` the hidden part stays positive definite, moves away from the
    edge, and ρ(λ) is at most ``(1 − t) ρ(λ) + t ρ(λ_start)``: each ``t`` of
    :data:`PULL_BACK` is tried in turn, with each relative ``slack`` added to ρ.

    Parameters
    ----------
    rho_of : callable
        ``rho_of(multipliers)`` → ρ(λ) (inf where the hidden part is not positive definite).
    check : callable
        ``check(multipliers, rho)`` → whether M(rho, multipliers) ⪰ 0 is proven.
    proposal, start : list of ndarray
        The optimiser's multipliers and the feasible start.
    slacks : sequence of float

    Returns
    -------
    (float, list of ndarray) or None
    """
    for pull in PULL_BACK:
        multipliers = proposal if pull == 0 else [(1 - pull) * m + pull * s for m, s in zip(proposal, start)]
        rho = rho_of(multipliers)
        if not math.isfinite(rho):
            continue
        for slack in slacks:
            candidate = rho * (1 + slack) + slack * 1e-300
            if check(multipliers, candidate):
                return candidate, multipliers
    return None


def check_multipliers(problem, multipliers: list[np.ndarray], rho: float) -> bool:
    """Whether M(rho, multipliers) ⪰ 0 for the exact network, rounding included.

    Parameters
    ----------
    problem : _Problem or DenseNetwork
    multipliers : list of ndarray
        Non-negative; one array per unit.
    rho : float

    Returns
    -------
    bool
    """
    if isinstance(problem, DenseNetwork):
        problem = _Problem(problem, None)
    if any(np.any(~np.isfinite(m)) or np.any(m < 0) for m in multipliers) or not rho >= 0:
        return False
    h, error = problem.assemble(multipliers, with_error=True)
    matrix = -h
    xs = np.arange(problem.input_size)
    matrix[xs, xs] += rho
    error = round_up(error + 2 * UNIT_ROUNDOFF * float(np.max(np.abs(np.diag(matrix)))) * math.sqrt(problem.size))
    return certify_positive_semidefinite(matrix, error)


class _Problem:
    """The matrices of the SDP of one network (and output row)."""

    def __init__(self, network: DenseNetwork, row: np.ndarray | None):
        self.network = network
        offsets = [network.input_size]
        for unit in network.units:
            offsets.append(offsets[-1] + unit.size_out)
        self.input_size = network.input_size
        self.size = offsets[-1]
        self.hidden = self.size - self.input_size
        self.ranges = [np.arange(0, network.input_size)] + [
            np.arange(offsets[j], offsets[j + 1]) for j in range(len(network.units))]
        self.unit_columns, self.unit_matrices, self.unit_errors = [], [], []
        for unit in network.units:
            columns, matrix, error = self._stack(unit.inputs)
            self.unit_columns.append(columns)
            self.unit_matrices.append(matrix)
            self.unit_errors.append(error)
        columns, output, output_error = self._stack(network.output)
        if row is not None:
            row = np.asarray(row, dtype=np.float64).reshape(1, -1)
            output_error = round_up(float(np.linalg.norm(row)) * output_error
                                    + gamma(output.shape[0] + 1) * float(np.linalg.norm(np.abs(row) @ np.abs(output))))
            output = row @ output
        self.output_columns, self.output, self.output_error = columns, output, output_error
        self.constant = np.zeros((self.size, self.size))
        self.constant[np.ix_(columns, columns)] = output.T @ output
        self.opaque_grams = [None if unit.slope is not None else matrix.T @ matrix
                             for unit, matrix in zip(network.units, self.unit_matrices)]

    def _stack(self, blocks):
        sources = sorted(blocks)
        columns = np.concatenate([self.ranges[s] for s in sources])
        matrix = np.hstack([blocks[s].dense() for s in sources])
        error = round_up(math.sqrt(sum(blocks[s].error ** 2 for s in sources)) * (1 + 1e-12))
        return columns, matrix, error

    def assemble(self, multipliers, with_error: bool = False):
        """H(λ) (and, with ``with_error``, a bound of the spectral error of forming it exactly)."""
        h = self.constant.copy()
        absolute = None
        if with_error:
            absolute = np.zeros_like(h)
            absolute[np.ix_(self.output_columns, self.output_columns)] = np.abs(self.output).T @ np.abs(self.output)
        perturbation = 2 * frobenius_upper(self.output) * self.output_error + self.output_error**2
        inner = self.output.shape[0]
        for unit, columns, z, z_error, gram, lam, own in zip(
                self.network.units, self.unit_columns, self.unit_matrices, self.unit_errors,
                self.opaque_grams, multipliers, self.ranges[1:]):
            inner = max(inner, z.shape[0])
            z_norm = frobenius_upper(z)
            if unit.slope is None:
                mu = float(lam[0])
                h[own, own] -= mu
                coefficient = mu * unit.bound**2
                h[np.ix_(columns, columns)] += coefficient * gram
                if with_error:
                    absolute[own, own] += mu
                    absolute[np.ix_(columns, columns)] += coefficient * (np.abs(z).T @ np.abs(z))
                perturbation += coefficient * (2 * z_norm * z_error + z_error**2)
                continue
            a, b = unit.slope
            h[own, own] -= lam
            cross = ((a + b) / 2) * (lam[:, None] * z)
            h[np.ix_(own, columns)] += cross
            h[np.ix_(columns, own)] += cross.T
            largest = float(np.max(lam)) if lam.size else 0.0
            if a * b != 0:
                h[np.ix_(columns, columns)] -= (a * b) * (z.T @ (lam[:, None] * z))
            if with_error:
                absolute[own, own] += lam
                absolute[np.ix_(own, columns)] += np.abs(cross)
                absolute[np.ix_(columns, own)] += np.abs(cross).T
                if a * b != 0:
                    absolute[np.ix_(columns, columns)] += abs(a * b) * (np.abs(z).T @ (lam[:, None] * np.abs(z)))
            perturbation += largest * (abs(a + b) * z_error + abs(a * b) * (2 * z_norm * z_error + z_error**2))
        if not with_error:
            return h
        count = inner + len(self.network.units) + 4
        error = gamma(count) * frobenius_upper(absolute) * 2 + perturbation
        return h, round_up(error * (1 + 1e-10))

    def rho(self, multipliers):
        """(ρ(λ), gradient of log ρ with respect to log λ), or (inf, None) where G is not ≻ 0."""
        h = self.assemble(multipliers)
        n = self.input_size
        g = -h[n:, n:]
        coupling = h[n:, :n]
        try:
            factor = np.linalg.cholesky(g)
        except np.linalg.LinAlgError:
            return math.inf, None
        import scipy.linalg

        solved = scipy.linalg.cho_solve((factor, True), coupling, check_finite=False)
        schur = h[:n, :n] + coupling.T @ solved
        values, vectors = np.linalg.eigh((schur + schur.T) / 2)
        rho = float(values[-1])
        if not rho > 0:
            return max(rho, 0.0), [np.zeros_like(m) for m in multipliers]
        # λ_max is not smooth where the top eigenvalues meet, as they do near the optimum:
        # descend on a soft maximum of the eigenvalues within ~1/SHARPNESS of the top instead
        weights = np.exp(_SHARPNESS * (values - rho) / rho)
        keep = weights > 1e-8
        weights = weights[keep] / np.sum(weights[keep])
        u = vectors[:, keep]
        v = np.concatenate([u, solved @ u])
        gradient = []
        for unit, columns, z_matrix, own, lam in zip(self.network.units, self.unit_columns,
                                                     self.unit_matrices, self.ranges[1:], multipliers):
            z, w = z_matrix @ v[columns], v[own]
            if unit.slope is None:
                value = unit.bound**2 * np.sum(z * z, axis=0) - np.sum(w * w, axis=0)
                gradient.append(lam * float(value @ weights) / rho)
            else:
                a, b = unit.slope
                gradient.append(lam * (((w - a * z) * (b * z - w)) @ weights) / rho)
        return rho, gradient


def _seconds_per_step(network: DenseNetwork) -> float:
    """Estimated time of one optimisation step: the Cholesky factorization and products."""
    hidden = sum(unit.size_out for unit in network.units)
    flops = 0.0
    for unit in network.units:
        columns = sum(block.size for block in unit.inputs.values())
        if unit.slope is not None and unit.slope[0] * unit.slope[1] != 0:
            flops += 2 * unit.size_in * columns**2
    return _step_seconds(hidden, network.input_size) + flops / _FLOPS_PER_SECOND


def _step_seconds(hidden: int, inputs: int) -> float:
    """Estimated seconds of a step's factorization and products for these sizes."""
    return (hidden**3 / 3 + 4 * hidden**2 * inputs + 10.0 * (inputs + hidden) ** 2) / _FLOPS_PER_SECOND


def _feasible_start(problem: _Problem, start) -> list[np.ndarray]:
    """Multipliers with G ≻ 0, chosen unit by unit from the last one back.

    A unit's multiplier enters G only on its own diagonal block; its off-diagonal blocks
    with later units are fixed by their multipliers. So with the trailing block D (later
    units) positive definite, the block of unit k is made so by λ_k = 2·λ_max(B D⁻¹ Bᵀ − A₀)
    (A₀ its own block at λ_k = 0, B its coupling to D): twice what the Schur complement
    needs, which for one hidden layer is the product bound's multiplier.
    """
    if start is not None and problem.rho(start)[1] is not None:
        return [m.copy() for m in start]
    units = problem.network.units
    multipliers = [np.zeros(unit.size_out if unit.slope is not None else 1) for unit in units]
    n = problem.input_size
    for k in reversed(range(len(units))):
        g = -problem.assemble(multipliers)[n:, n:]
        own = problem.ranges[k + 1] - n
        trailing = np.arange(own[-1] + 1, g.shape[0])
        a0 = g[np.ix_(own, own)]
        if trailing.size:
            coupling = g[np.ix_(own, trailing)]
            import scipy.linalg

            try:
                factor = scipy.linalg.cho_factor(g[np.ix_(trailing, trailing)], lower=True, check_finite=False)
            except np.linalg.LinAlgError:
                raise ValueError("no feasible starting multipliers were found for the SDP") from None
            need = coupling @ scipy.linalg.cho_solve(factor, coupling.T, check_finite=False) - a0
        else:
            need = -a0
        required = float(np.linalg.eigvalsh((need + need.T) / 2)[-1])
        scale = abs(float(np.max(np.abs(a0)))) + 1e-300
        multipliers[k][:] = 2 * max(required, 1e-9 * scale) + 1e-300
    if problem.rho(multipliers)[1] is None:
        raise ValueError("no feasible starting multipliers were found for the SDP")
    return multipliers


def optimise_multipliers(problem, multipliers, deadline: float, max_steps: int,
                         learning_rate: float = 0.05, check_steps: int = _CHECK_STEPS) -> list[np.ndarray]:
    """Adam on log λ for ``max_steps`` steps (fewer where ρ stalls), keeping the best feasible
    multipliers.

    ``problem.rho(multipliers)`` gives (ρ, gradient of log ρ with respect to log λ), or
    (inf, None) where the multipliers are infeasible. The deadline is a guard: no step
    starts once the time of ``check_steps`` more steps (for the exact check) would pass it.
    """
    logs = [np.log(np.maximum(m, 1e-300)) for m in multipliers]
    rho, gradient = problem.rho(multipliers)
    if gradient is None:  # ρ could not be evaluated at the start: nothing to descend
        return [m.copy() for m in multipliers]
    best, best_rho, reference = [m.copy() for m in multipliers], rho, rho
    first = [np.zeros_like(x) for x in logs]
    second = [np.zeros_like(x) for x in logs]
    beta1, beta2 = 0.9, 0.999
    stalled, began = 0, time.perf_counter()
    for step in range(1, max_steps + 1):
        # the exact check after the optimisation costs a few steps: keep it inside the budget
        if time.perf_counter() + check_steps * (time.perf_counter() - began) / step > deadline:
            break
        trial = []
        for i, (x, g) in enumerate(zip(logs, gradient)):
            first[i] = beta1 * first[i] + (1 - beta1) * g
            second[i] = beta2 * second[i] + (1 - beta2) * g * g
            corrected = first[i] / (1 - beta1**step) / (np.sqrt(second[i] / (1 - beta2**step)) + 1e-12)
            trial.append(x - learning_rate * corrected)
        candidate = [np.exp(x) for x in trial]
        new_rho, new_gradient = problem.rho(candidate)
        if new_gradient is None:  # left the feasible set: smaller steps
            learning_rate /= 2
            continue
        logs, rho, gradient = trial, new_rho, new_gradient
        if rho < best_rho:
            best = candidate
        if rho < reference * (1 - _STALL_TOLERANCE):  # progress: measure the next stretch from here
            reference, stalled = rho, 0
        else:
            stalled += 1
            if stalled >= _STALL_STEPS:
                break
        best_rho = min(best_rho, rho)
    return best
