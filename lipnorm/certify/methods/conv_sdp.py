"""The convolutional SDP method: LipSDP-Neuron on the torus, one multiplier per channel.

For a plain convolutional chain with a dense head (:func:`lipnorm.certify.frequency_sdp.conv_chain`)
the SDP of the torus network with spatially invariant multipliers splits over frequencies
(:class:`~lipnorm.certify.frequency_sdp.FrequencySdp`): its size is that of a few
hundred channels, whatever the image size, where the dense SDP's is the number of hidden
neurons (61,696 on a 4-conv CNN at 32×32). The masked activations keep their slope
constraints everywhere on the torus, so any multipliers give a sound bound of the
zero-padded model on its window.

For fixed multipliers λ, ρ(λ) = λ_max(Bᴴ G⁻¹ B) (G the hidden part, B its coupling to
the input) is found by Lanczos with G factored frequency by frequency; its gradient comes
from the top eigenvectors (as in :mod:`.sdp`), and Adam on log λ proposes multipliers.
The reported bound is √ρ for a ρ at which the whole matrix M(ρ, λ) is shown positive
semidefinite by a block Cholesky factorization in float64, with the rounding of the
Fourier blocks, of the scalings and of the factorization bounded
(:func:`lipnorm.certificates.certify_shifted_cholesky`); :meth:`ConvSdpProof.verify`
repeats that check.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse.linalg
from threadpoolctl import threadpool_limits

from lipnorm.bounds import compose
from lipnorm.certificates import certify_shifted_cholesky
from lipnorm.certify.frequency_sdp import ConvChain, FrequencySdp, NotConvChain, conv_chain, tree_cholesky
from lipnorm.certify.methods import NotApplicable, TooLarge
from lipnorm.certify.methods.sdp import optimise_multipliers
from lipnorm.certify.rounding import sqrt_upper, vector_norm_upper

__all__ = ["ConvSdpProof", "check_frequency_multipliers", "conv_sdp_bound", "run"]

#: Floating-point rate assumed when judging whether the method fits a time budget.
_FLOPS_PER_SECOND = 3.0e9
#: Fewest optimisation steps worth starting.
_MIN_STEPS = 5
#: Steps' worth of time kept for the exact check (one assembly and factorization, twice at most).
_CHECK_STEPS = 3
#: Eigenvalues whose soft maximum the optimisation descends (see :mod:`.sdp`).
_EIGENVALUES = 4
_SHARPNESS = 200.0
#: Most restarts of the Lanczos iteration in one step.
_LANCZOS_RESTARTS = 300


@dataclass
class ConvSdpProof:
    """Multipliers that certify ``rho`` for a convolutional chain.

    Attributes
    ----------
    chain : ConvChain
    multipliers : list of ndarray
        One per convolutional unit (per channel), then one per dense unit (per neuron).
    rho : float
        The certified squared bound: M(rho, multipliers) ⪰ 0 was checked exactly.
    rows : ndarray or None
        Output rows whose functionals are bounded by ‖row‖·√rho.
    """

    chain: ConvChain
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
        if not check_frequency_multipliers(FrequencySdp(self.chain), self.multipliers, self.rho):
            raise ValueError("the stored multipliers do not certify the stored bound")
        return _bounds(sqrt_upper(self.rho), self.rows)


def run(context):
    """The convolutional SDP bound of the context's graph (see :mod:`lipnorm.certify.methods`)."""
    chain = context.view("conv_chain", _build_chain)
    bound, proof = conv_sdp_bound(FrequencySdp(chain), time_budget=context.remaining())
    proof.rows = context.rows
    return _bounds(bound, context.rows), proof


def _build_chain(context) -> ConvChain:
    try:
        return conv_chain(context.graph)
    except NotConvChain as error:
        raise NotApplicable(str(error)) from error


def _bounds(bound: float, rows):
    if rows is None:
        return bound
    return np.array([compose([vector_norm_upper(row), bound]) for row in rows])


def conv_sdp_bound(sdp: FrequencySdp, *, time_budget: float, max_steps: int = 300,
                   learning_rate: float = 0.2) -> tuple[float, ConvSdpProof]:
    """The certified LipSDP-Neuron bound of a convolutional chain with per-channel multipliers.

    Parameters
    ----------
    sdp : FrequencySdp
    time_budget : float
        Seconds for the optimisation and the check.
    max_steps : int
    learning_rate : float
        Adam's step on log λ.

    Returns
    -------
    (float, ConvSdpProof)

    Raises
    ------
    TooLarge
        If ``_MIN_STEPS`` steps would not fit the budget.
    ValueError
        If no multipliers could be certified.
    """
    with threadpool_limits(limits=1, user_api="blas"):  # many small products: BLAS threads only compete
        return _conv_sdp_bound(sdp, time_budget, max_steps, learning_rate)


def _conv_sdp_bound(sdp: FrequencySdp, time_budget: float, max_steps: int, learning_rate: float):
    estimate = _seconds_per_step(sdp) * (_MIN_STEPS + _CHECK_STEPS)
    if estimate > time_budget:
        raise TooLarge(f"the frequency SDP ({sdp.chain.hidden} hidden neurons, {len(sdp.freqs[-1])} frequency "
                       f"groups) would take about {estimate:.0f} s for {_MIN_STEPS} steps, more than "
                       f"the {time_budget:.0f} s left of the time budget")
    began = time.perf_counter()
    problem = _Rho(sdp)
    start = _uniform_start(sdp)
    if problem.rho(start)[1] is None:
        raise ValueError("no feasible starting multipliers were found for the frequency SDP")
    multipliers = optimise_multipliers(problem, start, began + time_budget, max_steps,
                                       learning_rate=learning_rate, check_steps=_CHECK_STEPS)
    rho = problem.rho(multipliers)[0]
    for slack in (1e-6, 1e-4, 1e-2):
        candidate = rho * (1 + slack) + slack * 1e-300
        if check_frequency_multipliers(sdp, multipliers, candidate):
            return sqrt_upper(candidate), ConvSdpProof(sdp.chain, multipliers, candidate)
    raise ValueError("the frequency SDP's multipliers could not be certified in float64")


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
    if any(not np.all(np.isfinite(m)) or np.any(m <= 0) for m in multipliers) or not rho >= 0:
        return False
    with threadpool_limits(limits=1, user_api="blas"):
        return _certified(sdp.assemble([np.asarray(m, dtype=np.float64) for m in multipliers], float(rho),
                                       with_error=True))


def _certified(blocks) -> bool:
    def factor_square(shift: float):
        factor = tree_cholesky(blocks, shift)
        return None if factor is None else factor.square

    return certify_shifted_cholesky(factor_square, dimension=blocks.dimension, estimate=blocks.row_estimate(),
                                    largest_diagonal=blocks.largest_diagonal(), formation_error=blocks.error,
                                    complex_dtype=True)


class _Rho:
    """ρ(λ) and the gradient of log ρ with respect to log λ, for :func:`optimise_multipliers`."""

    def __init__(self, sdp: FrequencySdp):
        self.sdp = sdp
        self.shape = (sdp.freqs[0].shape[0], sdp.chain.input_channels)
        self.start_vector = None

    def rho(self, multipliers):
        sdp = self.sdp
        factor = tree_cholesky(sdp.assemble(multipliers))
        if factor is None:
            return math.inf, None
        blocks, border, order = sdp.input_schur(factor, multipliers)
        groups, width = blocks.shape[0], blocks.shape[1]
        size = groups * width

        adjoint = np.ascontiguousarray(np.conj(border.T))

        def schur(u):
            u = np.asarray(u, dtype=np.complex128).reshape(size, -1)
            image = np.einsum("gij,gjk->gik", blocks, u.reshape(groups, width, -1)).reshape(size, -1)
            return image + adjoint @ (border @ u)

        operator = scipy.sparse.linalg.LinearOperator((size, size), matvec=schur, matmat=schur, dtype=np.complex128)
        count = min(_EIGENVALUES, size - 2)
        try:
            values, vectors = scipy.sparse.linalg.eigsh(operator, k=count, which="LA", v0=self.start_vector,
                                                        tol=1e-7, ncv=min(size, max(2 * count + 1, 16)),
                                                        maxiter=_LANCZOS_RESTARTS)
        except scipy.sparse.linalg.ArpackNoConvergence as error:  # a clustered top: use what converged
            values, vectors = error.eigenvalues, error.eigenvectors
            if len(values) == 0:
                return math.inf, None
            count = len(values)
        rank = np.argsort(values)[::-1]
        values, vectors = values[rank], vectors[:, rank]
        rho = float(values[0])
        if not rho > 0:
            return max(rho, 0.0), [np.zeros_like(m) for m in multipliers]
        self.start_vector = vectors[:, 0]
        weights = np.exp(_SHARPNESS * (values - rho) / rho)
        weights /= weights.sum()
        inputs = np.empty_like(vectors)
        inputs[order] = vectors  # from the Schur complement's order to the input's
        inputs = inputs.reshape(self.shape + (-1,))
        levels, border_part = factor.solve(sdp.input_coupling(multipliers, inputs),
                                           np.zeros((sdp.border_size, count), dtype=np.complex128))
        levels = [-level for level in levels]  # the maximiser of the form is −G⁻¹B u
        values_per_unit = sdp.constraint_values(multipliers, inputs, levels, -border_part)
        return rho, [m * (v @ weights) / rho for m, v in zip(multipliers, values_per_unit)]


def _uniform_start(sdp: FrequencySdp) -> list[np.ndarray]:
    """One multiplier per unit, from the layers' norms: feasible with a margin.

    With ``2m⟨w, z⟩ ≤ ‖w‖²/2 + 2m²‖z‖²`` every unit's term is at least
    ``λ(‖w‖²/2 − 2m²σ²‖w_prev‖²)``, so ``λ_last = 2μσ_out²`` and
    ``λ_{j−1} = 4μ m_j² σ_j² λ_j`` (μ > 1) make the hidden part positive definite.
    """
    margin = 1.1
    chain = sdp.chain
    units = [(c.midpoint, _torus_norm(s, c)) for s, c in zip(sdp.symbols, chain.convs)]
    units += [(d.midpoint, float(np.linalg.norm(d.weight, 2))) for d in chain.head[:-1]]
    output = float(np.linalg.norm(chain.head[-1].weight, 2))
    values = [0.0] * len(units)
    values[-1] = 2 * margin * output**2
    for j in range(len(units) - 1, 0, -1):
        midpoint, norm = units[j]  # unit j and the norm of the map into it from unit j − 1
        values[j - 1] = max(margin * 4 * midpoint**2 * norm**2 * values[j], 1e-300)
    return [np.full(n, v) for n, v in zip(sdp.multiplier_sizes(), values)]


def _torus_norm(symbol: np.ndarray, conv) -> float:
    """‖the circular convolution‖ from its symbols (an estimate: the start needs no bound)."""
    aliases = math.prod(conv.stride)
    stacked = symbol.reshape((aliases, -1) + symbol.shape[1:]).transpose(1, 2, 0, 3).reshape(
        symbol.shape[0] // aliases, symbol.shape[1], -1)
    return float(np.max(np.linalg.norm(stacked, ord=2, axis=(1, 2))))


def _seconds_per_step(sdp: FrequencySdp) -> float:
    """Estimated time of one optimisation step: the blocks' factorizations and couplings."""
    _, sizes, _ = sdp.layout(False)
    counts = [f.shape[0] for f in sdp.freqs[-len(sizes):]]
    # each level's coupling reaches the first unit of the next grid (or the head's first layer)
    reach = [c.channels for c, level, following in zip(sdp.chain.convs[1:], sdp.node_level[1:], sdp.node_level[2:])
             if following != level] + [len(sdp.head_block[0])]
    flops = 4.0 * sdp.border_size**3
    for count, n, rows in zip(counts, sizes, reach):
        flops += 4 * count * (n**3 / 3 + 2 * n * n * rows + n * rows**2)
    return flops / _FLOPS_PER_SECOND
