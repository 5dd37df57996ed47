"""The chain method: a loop transformation over certified norms of chains of linear maps.

Each unit's derivative is split as D = m·I + Δ with m the midpoint of its slope range and
‖Δ‖ ≤ r its half-width (an opaque unit: m = 0, r = its bound). Call ``P_{t←s}`` the map
from source ``s`` (the input, or a unit's output) to target ``t`` (a unit's input, or the
output) with every unit in between replaced by its midpoint: a *linear* map, a sum over
the paths of the DAG of products of consecutive linear layers. Expanding the true
Jacobian unit by unit in topological order gives, exactly,

    J_t = P_{t←x} + Σ_j P_{t←w_j} Δ_j J_{z_j},

so with L_j ≥ ‖J_{z_j}‖ (the bound of the map from the input to unit j's input)

    ‖J_t‖ ≤ ‖P_{t←x}‖ + Σ_j ‖P_{t←w_j}‖ r_j L_j,

every norm certified (float64, rounding included). With the product's bound of each unit
input in place of the chain norms this is the product bound again (m + r = max slope), so
taking the smaller of the two at every unit never loses against the product. It gains
where consecutive layers partly cancel, which the product cannot see.

References
----------
.. [1] Fazlyab, Entesari, Roy, Chellappa, "Certified robustness via dynamic margin
   maximization and improved Lipschitz regularization" (LipLT), NeurIPS 2023, section 3.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lipnorm.bounds import compose, residual_sum, round_up
from lipnorm.certify.rounding import gamma, vector_norm_upper
from lipnorm.certify.network import Block, DenseNetwork, add_blocks, apply_matrix, scale_block

__all__ = ["ChainProof", "chain_bound", "run"]


@dataclass
class ChainProof:
    """What the chain bound rests on, to compute it again (:meth:`verify`).

    Attributes
    ----------
    network : DenseNetwork
    unit_caps : list of float
        An independent upper bound of each unit's input bound L_j (the product's).
    rows : ndarray or None
        Output rows whose functionals were bounded, if any.
    """

    network: DenseNetwork
    unit_caps: list[float]
    rows: np.ndarray | None = None

    def verify(self):
        """The bound computed again from the stored network (every norm certified anew)."""
        return chain_bound(self.network, self.unit_caps, self.rows)[0]


def run(context):
    """The chain bound of the context's graph, through its dense view (see :mod:`lipnorm.certify.methods`)."""
    network = context.dense_network()
    caps = [context.product.cumulative[unit.input_node] for unit in network.units]
    return chain_bound(network, caps, context.rows)


def chain_bound(network: DenseNetwork, unit_caps: list[float], rows: np.ndarray | None = None):
    """The loop-transformation bound of a dense network.

    Parameters
    ----------
    network : DenseNetwork
    unit_caps : list of float
        For each unit, an upper bound of the Lipschitz constant of the map from the input
        to the unit's input, known independently (the product method's); the smaller
        bound is used.
    rows : ndarray, shape (p, output size), optional
        Bound the functionals ``x ↦ rows[i] · f(x)`` instead of ``f``.

    Returns
    -------
    (float or ndarray, ChainProof)
        The bound of the output (one per row when ``rows`` is given) and its proof.
    """
    units = network.units
    # chains[s][t]: P_{t←s} for target t = unit index, or len(units) for the output
    unit_bounds: list[float] = []
    chains: dict[int, dict[int, Block]] = {s: {} for s in range(len(units) + 1)}
    for k, unit in enumerate(units):
        for source in range(k + 1):
            chains[source][k] = _chain(unit.inputs, units, chains, source, k)
        terms = [_norm(chains[0][k])]
        for j in range(k):
            chain = chains[j + 1][k]
            if chain is not None and units[j].radius > 0:
                terms.append(compose([_norm(chain), units[j].radius, unit_bounds[j]]))
        unit_bounds.append(min(residual_sum(terms), unit_caps[k]))
    output = len(units)
    for source in range(len(units) + 1):
        chains[source][output] = _chain(network.output, units, chains, source, output)
    if rows is None:
        norms = [_norm(chains[s][output]) for s in range(len(units) + 1)]
        return _combine(norms, units, unit_bounds), ChainProof(network, list(unit_caps))
    rows = np.asarray(rows, dtype=np.float64)
    norms_per_row = [_row_norms(rows, chains[s][output]) for s in range(len(units) + 1)]
    whole = _combine([_norm(chains[s][output]) for s in range(len(units) + 1)], units, unit_bounds)
    bounds = np.array([min(_combine([n[i] for n in norms_per_row], units, unit_bounds),
                           compose([vector_norm_upper(row), whole]))  # ‖row · f‖ ≤ ‖row‖ L(f)
                       for i, row in enumerate(rows)])
    return bounds, ChainProof(network, list(unit_caps), rows)


def _combine(norms: list[float], units, unit_bounds: list[float]) -> float:
    terms = [norms[0]]
    for j, unit in enumerate(units):
        if norms[j + 1] > 0 and unit.radius > 0:
            terms.append(compose([norms[j + 1], unit.radius, unit_bounds[j]]))
    return residual_sum(terms)


def _chain(blocks: dict[int, Block], units, chains, source: int, target: int) -> Block | None:
    """P_{target←source} = direct block + Σ_j block_j · m_j · P_{z_j←source} (None if no path)."""
    total = blocks.get(source)
    for j in range(source, target):  # the units after the source: outputs j + 1 > source
        if j + 1 not in blocks:
            continue
        m = units[j].midpoint
        inner = chains[source].get(j)
        if m == 0 or inner is None:
            continue
        term = _scaled_product(blocks[j + 1], inner, m)
        total = term if total is None else add_blocks(total, term)
    return total


def _scaled_product(left: Block, right: Block, scale: float) -> Block:
    """``scale · left · right`` with its error bound."""
    if left.matrix is None:  # an identity block (exact)
        return scale_block(right, scale)
    scaled = scale_block(left, scale)
    return apply_matrix((scaled.matrix, scaled.error), right)


def _norm(block: Block | None) -> float:
    """Certified upper bound of the exact map's norm."""
    if block is None:
        return 0.0
    if block.matrix is None:
        return round_up(1.0 + block.error)
    import lipnorm

    matrix = block.matrix
    if not np.any(matrix):
        return round_up(block.error)
    return round_up(lipnorm.sigma_bounds(matrix).upper + block.error)


def _row_norms(rows: np.ndarray, block: Block | None) -> list[float]:
    """Certified ‖rows[i] · P‖ for every row."""
    if block is None:
        return [0.0] * rows.shape[0]
    matrix = block.dense()
    product = rows @ matrix
    rounding = gamma(rows.shape[1] + 1) * np.linalg.norm(np.abs(rows) @ np.abs(matrix), axis=1)
    norms = np.linalg.norm(product, axis=1) * (1 + 4 * gamma(product.shape[1] + 1))
    total = norms + rounding + np.linalg.norm(rows, axis=1) * block.error
    return [round_up(float(v) * (1 + 1e-12)) for v in total]


