"""The convolutional SDP method: LipSDP-Neuron on the torus, one multiplier per channel.

The torus view of the graph (:meth:`~lipnorm.certify.methods.MethodContext.torus_network`)
holds a convolutional network (residual sums, projection shortcuts, BatchNorm, average
pooling, a dense head) as units on tori; with spatially invariant multipliers its SDP
splits over frequencies (:class:`~lipnorm.certify.frequency_sdp.FrequencySdp`): its blocks
are a few hundred channels, whatever the image size, where the dense SDP's size is the
number of hidden neurons (61,696 on a 4-conv CNN at 32×32). The masked activations keep
their slope constraints everywhere on the torus, so any multipliers give a sound bound of
the zero-padded model on its window.

For fixed multipliers λ, ρ(λ) = λ_max(Bᴴ G⁻¹ B) (G the hidden part, B its coupling to
the input) is found by Lanczos with G factored frequency by frequency; its gradient comes
from the top eigenvectors (as in :mod:`.sdp`), and Adam on log λ proposes multipliers.
The reported bound is √ρ for a ρ at which the whole matrix M(ρ, λ) is shown positive
semidefinite by the block Cholesky factorization in float64, with the rounding of the
Fourier blocks, of the scalings and of the factorization bounded
(:func:`lipnorm.certificates.certify_shifted_cholesky`); :meth:`ConvSdpProof.verify`
repeats that check.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse.linalg

from lipnorm.bounds import compose
from lipnorm.certify.frequency_sdp import FrequencySdp, NotHeld
from lipnorm.certify.methods import NotApplicable, TooLarge
from lipnorm.certify.methods.sdp import certified_proposal, optimise_multipliers
from lipnorm.certify.rounding import sqrt_upper, vector_norm_upper
from lipnorm.certify.torus import TorusNetwork

__all__ = ["ConvSdpProof", "check_frequency_multipliers", "conv_sdp_bound", "dominant_multipliers", "frequency_sdp",
           "minimum_seconds", "run", "seconds_per_step", "start_multipliers"]

#: Floating-point rate assumed when judging whether the method fits a time budget (measured
#: on the 2-core CPU at load 8: a step of the 4-conv CNN took 0.35–0.42 s at 16×16 against
#: 0.45 s estimated, 0.7–1.5 s at 32×32 against 1.4 s).
_FLOPS_PER_SECOND = 2.0e9
#: Memory the method may hold (bytes).
_MAX_BYTES = 2.5 * 2**30
#: Fewest optimisation steps worth starting (on the 4-conv CNN at 16×16, four steps take the
#: product's 0.81× to 0.55×).
_MIN_STEPS = 4
#: Steps' worth of time kept for the exact check (a factorization at a shift, twice at most).
_CHECK_STEPS = 2
#: Eigenvalues whose soft maximum the optimisation descends (see :mod:`.sdp`).
_EIGENVALUES = 4
_SHARPNESS = 200.0
#: Most restarts of the Lanczos iteration in one step.
_LANCZOS_RESTARTS = 300
#: The warm block iteration: residual tolerance relative to ρ, and its most iterations.
_BLOCK_TOLERANCE = 1e-6
_BLOCK_ITERATIONS = 40
#: Below this many input entries the Schur complement is formed and diagonalized.
_DENSE_INPUT = 96
#: Relative margins added to ρ before the exact check.
_SLACKS = (1e-6, 1e-4, 1e-2)


@dataclass
class ConvSdpProof:
    """Multipliers that certify ``rho`` for a torus network.

    Attributes
    ----------
    network : TorusNetwork
    multipliers : list of ndarray
        One per unit of the network, one value per channel.
    rho : float
        The certified squared bound: M(rho, multipliers) ⪰ 0 was checked exactly.
    rows : ndarray or None
        Output rows whose functionals are bounded by ‖row‖·√rho.
    """

    network: TorusNetwork
    multipliers: list[np.ndarray]
    rho: float
    rows: np.ndarray | None = None

    def verify(self):
        """Check M(rho, multipliers) ⪰ 0 again; return the bound (per row with ``rows``).

        Raises
        ------
        ValueError
            If the check fails.
        """
        if not check_frequency_multipliers(FrequencySdp(self.network), self.multipliers, self.rho):
            raise ValueError("the stored multipliers do not certify the stored bound")
        return _bounds(sqrt_upper(self.rho), self.rows)


def run(context):
    """The convolutional SDP bound of the context's graph (see :mod:`lipnorm.certify.methods`):
    as many steps as the cost model fits in the method's share of the budget."""
    bound, proof = conv_sdp_bound(_view(context), time_budget=context.share(), deadline=context.deadline)
    proof.rows = context.rows
    return _bounds(bound, context.rows), proof


def minimum_seconds(context) -> float:
    """Estimated seconds of the fewest steps worth running and the exact check.

    Raises
    ------
    NotApplicable
        Where the torus view or its frequency SDP cannot hold the graph, or the factors
        would not fit in memory (:class:`TooLarge`).
    """
    seconds, held = seconds_per_step(_view(context))
    _check_memory(_view(context), held)
    return seconds * (_MIN_STEPS + _CHECK_STEPS)


def _view(context) -> FrequencySdp:
    return context.view("frequency_sdp", lambda c: frequency_sdp(c.torus_network()))


def _check_memory(sdp: FrequencySdp, held: float) -> None:
    if held > _MAX_BYTES:
        raise TooLarge(f"the frequency SDP ({sdp.hidden()} hidden neurons) would hold about {held / 2**30:.1f} GiB, "
                       f"more than the {_MAX_BYTES / 2**30:.1f} GiB allowed")


def frequency_sdp(network: TorusNetwork) -> FrequencySdp:
    """The frequency SDP of a torus network.

    Raises
    ------
    NotApplicable
        Naming the layer the SDP cannot hold.
    """
    try:
        return FrequencySdp(network)
    except NotHeld as error:
        raise NotApplicable(str(error)) from error


def _bounds(bound: float, rows):
    if rows is None:
        return bound
    return np.array([compose([vector_norm_upper(row), bound]) for row in rows])


def conv_sdp_bound(sdp: FrequencySdp, *, time_budget: float, max_steps: int = 300, learning_rate: float = 0.2,
                   start: list[np.ndarray] | None = None, deadline: float | None = None
                   ) -> tuple[float, ConvSdpProof]:
    """The certified LipSDP-Neuron bound of a torus network with per-channel multipliers.

    The number of optimisation steps is fixed up front: as many as the cost model
    (:func:`seconds_per_step`) fits in ``time_budget`` with the exact check, at most
    ``max_steps`` (fewer where ρ stalls). The clock only stops the optimisation early where
    ``deadline`` passes (a machine slower than the cost model assumes).

    Parameters
    ----------
    sdp : FrequencySdp
    time_budget : float
        Seconds for the optimisation and the check, as the cost model counts them.
    max_steps : int
    learning_rate : float
        Adam's step on log λ.
    start : list of ndarray, optional
        Starting multipliers (default: :func:`start_multipliers`).
    deadline : float, optional
        ``time.perf_counter()`` value after which no step starts (default: ``time_budget``
        seconds from now).

    Returns
    -------
    (float, ConvSdpProof)

    Raises
    ------
    TooLarge
        If ``_MIN_STEPS`` steps would not fit the budget, or the factors would not fit in memory.
    ValueError
        If no multipliers could be certified.
    """
    seconds, held = seconds_per_step(sdp)
    _check_memory(sdp, held)
    steps = min(max_steps, math.floor(time_budget / seconds) - _CHECK_STEPS)
    if steps < _MIN_STEPS:
        raise TooLarge(f"the frequency SDP ({sdp.hidden()} hidden neurons, {sdp.fibers} fibers) would take about "
                       f"{seconds * (_MIN_STEPS + _CHECK_STEPS):.0f} s for {_MIN_STEPS} steps and the check, more "
                       f"than the {time_budget:.0f} s allowed")
    if deadline is None:
        deadline = time.perf_counter() + time_budget
    problem = _Rho(sdp)
    first = start_multipliers(sdp) if start is None else [np.asarray(m, dtype=np.float64) for m in start]
    if sdp.factor(first) is None:
        raise ValueError("no feasible starting multipliers were found for the frequency SDP")
    multipliers = optimise_multipliers(problem, first, deadline, steps, learning_rate=learning_rate,
                                       check_steps=_CHECK_STEPS)
    certified = certified_proposal(lambda m: problem.rho(m, warm=False)[0],
                                   lambda m, rho: check_frequency_multipliers(sdp, m, rho), multipliers, first,
                                   _SLACKS)
    if certified is None:
        raise ValueError("the frequency SDP's multipliers could not be certified in float64")
    rho, multipliers = certified
    return sqrt_upper(rho), ConvSdpProof(sdp.network, multipliers, rho)


def check_frequency_multipliers(sdp: FrequencySdp, multipliers: list[np.ndarray], rho: float) -> bool:
    """Whether M(rho, multipliers) ⪰ 0 for the exact torus network, rounding included.

    Parameters
    ----------
    sdp : FrequencySdp
    multipliers : list of ndarray
        Positive, of the sizes ``sdp.multiplier_sizes()``.
    rho : float

    Returns
    -------
    bool
    """
    sizes = sdp.multiplier_sizes()
    if len(multipliers) != len(sizes) or any(np.shape(m) != (n,) for m, n in zip(multipliers, sizes)):
        return False
    if any(not np.all(np.isfinite(m)) or np.any(m <= 0) for m in multipliers) or not (rho >= 0 and
                                                                                       math.isfinite(rho)):
        return False
    return sdp.certify([np.asarray(m, dtype=np.float64) for m in multipliers], float(rho))


class _Rho:
    """ρ(λ) and the gradient of log ρ with respect to log λ, for :func:`optimise_multipliers`.

    The top eigenvectors of one step start the next: a block iteration (LOBPCG) from them
    converges in a few products where multipliers move little; Lanczos (ARPACK) starts cold
    and takes over where the block iteration does not converge.
    """

    def __init__(self, sdp: FrequencySdp):
        self.sdp = sdp
        self.vectors = None
        self.value = None

    def rho(self, multipliers, warm: bool = True):
        factor = self.sdp.factor(multipliers)
        if factor is None:
            return math.inf, None
        values, vectors = self._top(factor, warm)
        if values is None:
            return math.inf, None
        rho = float(values[0])
        if not rho > 0:
            return max(rho, 0.0), [np.zeros_like(m) for m in multipliers]
        self.vectors, self.value = vectors, rho
        weights = np.exp(_SHARPNESS * (values - rho) / rho)
        weights /= weights.sum()
        derivatives = self.sdp.form_derivative(factor, vectors, weights, multipliers)
        return rho, [-m * d / rho for m, d in zip(multipliers, derivatives)]

    def _top(self, factor, warm: bool):
        """The largest eigenvalues (descending) of the Schur complement and their vectors."""
        size = factor.input_size
        count = min(_EIGENVALUES, size)
        if size <= _DENSE_INPUT:
            matrix = factor.schur(np.eye(size, dtype=np.complex128))
            values, vectors = np.linalg.eigh((matrix + np.conj(matrix.T)) / 2)
            return values[::-1][:count], vectors[:, ::-1][:, :count]

        def apply(u):
            u = np.asarray(u, dtype=np.complex128)
            return factor.schur(u.reshape(size, -1)).reshape(u.shape)

        operator = scipy.sparse.linalg.LinearOperator((size, size), matvec=apply, matmat=apply, dtype=np.complex128)
        if warm and self.vectors is not None:
            tolerance = _BLOCK_TOLERANCE * self.value
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    values, vectors = scipy.sparse.linalg.lobpcg(operator, self.vectors, largest=True,
                                                                 tol=tolerance, maxiter=_BLOCK_ITERATIONS)
                except (np.linalg.LinAlgError, ValueError):
                    values = None
            if values is not None:
                residual = np.linalg.norm(apply(vectors) - vectors * values, axis=0)
                if np.all(residual <= 10 * tolerance):
                    rank = np.argsort(values)[::-1]
                    return values[rank], vectors[:, rank]
        count = min(count, size - 2)
        # a fixed start where there is no previous vector (ARPACK's own random start changes
        # from call to call): the same multipliers give the same ρ
        start = np.random.default_rng(0).standard_normal(size) if self.vectors is None else self.vectors[:, 0]
        try:
            values, vectors = scipy.sparse.linalg.eigsh(operator, k=count, which="LA", v0=start, tol=1e-7,
                                                        ncv=min(size, max(2 * count + 1, 16)),
                                                        maxiter=_LANCZOS_RESTARTS)
        except scipy.sparse.linalg.ArpackNoConvergence as error:  # a clustered top: use what converged
            values, vectors = error.eigenvalues, error.eigenvectors
            if len(values) == 0:
                return None, None
        rank = np.argsort(values)[::-1]
        return values[rank], vectors[:, rank]


def start_multipliers(sdp: FrequencySdp, margin: float = 1.05) -> list[np.ndarray]:
    """One multiplier per unit from the product bound's recursion, else from a diagonal dominance.

    Going back from the output, ``K_j`` bounds the squared Lipschitz constant of the map
    from unit j's output to the network's output (a sum over the unit's readers of its
    coupling's norm times the reader's slope bound ``|m| + r`` and ``√K``). On a chain,
    ``λ_j = K_j (1 + |m_j| / r_j)`` eliminates unit j with ``−K_j‖v_j‖²`` left for the
    earlier ones and ρ(λ) is the product of the layers' torus norms: the product bound. On
    a graph with branches these multipliers may leave the hidden part indefinite; then
    :func:`dominant_multipliers` gives a feasible start.
    """
    readers: dict[int, list] = {}
    for c in sdp.couplings:
        if c.source != 0:
            readers.setdefault(c.source, []).append(c)
    values = [0.0] * len(sdp.network.units)
    lipschitz: dict[int, float] = {}
    for j in reversed(range(len(values))):
        unit = sdp.unit_variables[j]
        total, counted = 0.0, set()
        for c in readers.get(unit, []):
            reader = sdp.variables[c.reader]
            if reader.kind == "output":
                total += c.norm
            elif reader.unit not in counted:  # a unit's output variable and its auxiliary read alike
                counted.add(reader.unit)
                a, b = sdp.slopes[reader.unit]
                total += c.norm * max(abs(a), abs(b)) * lipschitz[reader.unit]
        lipschitz[j] = total
        a, b = sdp.slopes[j]
        middle, radius = abs(a + b) / 2, (b - a) / 2
        values[j] = margin * total**2 * (1 + middle / radius) if total > 0 else 1.0
    start = [np.full(n, v) for n, v in zip(sdp.multiplier_sizes(), values)]
    return start if sdp.factor(start) is not None else dominant_multipliers(sdp)


def dominant_multipliers(sdp: FrequencySdp, margin: float = 1.1) -> list[np.ndarray]:
    """One multiplier per unit, from the couplings' norms: the hidden part is positive definite.

    With ``2|⟨h_r, α E h_s⟩| ≤ |α|‖E‖(ε‖h_r‖² + ‖h_s‖²/ε)`` and ε chosen per coupling so
    that a reader with ``k`` couplings spends half its diagonal ``d_r``, a source is charged
    ``2k α² ‖E‖² / d_r`` by each reader; a unit whose diagonal λ exceeds twice its charges
    keeps ``G ≻ 0``. Units are set from the last (charged by the output's identity
    variables) to the first.
    """
    variables = sdp.variables
    readers: dict[int, int] = {}
    for c in sdp.couplings:
        if c.source != 0:
            readers[c.reader] = readers.get(c.reader, 0) + 1
    charge = np.zeros(len(variables))
    values = [0.0] * len(sdp.network.units)

    def spend(reader: int, kappa: float) -> None:
        for c in sdp.couplings:
            if c.reader == reader and c.source != 0:
                charge[c.source] += 2 * readers[reader] * c.norm**2 * kappa

    spend(len(variables) - 1, 1.0)
    for j in reversed(range(len(values))):
        unit = sdp.unit_variables[j]
        values[j] = 2 * margin * charge[unit] if charge[unit] > 0 else 1.0
        spend(unit, sdp.midpoint(j) ** 2 * values[j])
        if j in sdp.aux_constants:
            spend(unit + 1, sdp.aux_constants[j] * values[j] * 1.001)
    return [np.full(n, v) for n, v in zip(sdp.multiplier_sizes(), values)]


def seconds_per_step(sdp: FrequencySdp) -> tuple[float, float]:
    """Estimated seconds of one optimisation step (the factorization and a few dozen products
    with the Schur complement), and the bytes it holds."""
    flops, held = sdp.work()
    return flops / _FLOPS_PER_SECOND, held
