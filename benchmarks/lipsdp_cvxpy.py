"""LipSDP-Neuron through cvxpy, on lipnorm's dense view of a network: the reference solver.

The same matrix as :mod:`lipnorm.certify.methods.sdp` (slope-range constraints per neuron,
one norm constraint per opaque unit), handed to a conic solver: the matrix is written as
``ρJ − H₀ − Σᵢ λᵢ Tᵢ`` with every ``Tᵢ`` a sparse column of one affine map, so cvxpy
canonicalizes one sparse product. The solver's ρ is a proposal: the benchmark re-checks
its multipliers with lipnorm's exact test
(:func:`lipnorm.certify.methods.sdp.check_multipliers`) and reports the certified value.
Not part of the package: cvxpy is a benchmark dependency only.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def _constraint_columns(problem):
    """vec(Tᵢ) for every multiplier, as the columns of one sparse matrix (size² × count)."""
    size = problem.size
    rows, cols, values = [], [], []
    column = 0
    for unit, columns, z, own in zip(problem.network.units, problem.unit_columns,
                                     problem.unit_matrices, problem.ranges[1:]):
        if unit.slope is None:
            # μ (L² ZᵀZ − I_w): one column
            gram = unit.bound**2 * (z.T @ z)
            r, c = np.meshgrid(columns, columns, indexing="ij")
            rows += [r.ravel() * size + c.ravel(), own * size + own]
            values += [gram.ravel(), -np.ones(own.size)]
            cols += [np.full(gram.size + own.size, column)]
            column += 1
            continue
        a, b = unit.slope
        for i in range(unit.size_out):
            w = own[i]
            zi = z[i]
            entries_r = [np.array([w]), np.full(columns.size, w), columns]
            entries_c = [np.array([w]), columns, np.full(columns.size, w)]
            entries_v = [np.array([-1.0]), (a + b) / 2 * zi, (a + b) / 2 * zi]
            if a * b != 0:
                r, c = np.meshgrid(columns, columns, indexing="ij")
                entries_r.append(r.ravel())
                entries_c.append(c.ravel())
                entries_v.append(-(a * b) * np.outer(zi, zi).ravel())
            r = np.concatenate(entries_r)
            c = np.concatenate(entries_c)
            rows.append(r * size + c)
            values.append(np.concatenate(entries_v))
            cols.append(np.full(r.size, column))
            column += 1
    return sp.csc_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(size * size, column))


def lipsdp_cvxpy(network, *, solver: str = "SCS", time_limit: float = 600.0, eps: float = 1e-6):
    """Solve min ρ s.t. ρJ − H(λ) ⪰ 0, λ ≥ 0 with cvxpy.

    Returns
    -------
    (float or None, list of ndarray or None, str)
        The solver's ρ, its multipliers (per unit, as lipnorm stores them), and its status.
    """
    import cvxpy as cp

    from lipnorm.certify.methods.sdp import _Problem

    problem = _Problem(network, None)
    size, n = problem.size, problem.input_size
    affine = _constraint_columns(problem)
    count = affine.shape[1]
    rho = cp.Variable(nonneg=True)
    lam = cp.Variable(count, nonneg=True)
    selector = np.zeros((size, size))
    selector[np.arange(n), np.arange(n)] = 1.0
    h = cp.reshape(affine @ lam, (size, size), order="C") + problem.constant
    matrix = rho * selector - h
    program = cp.Problem(cp.Minimize(rho), [(matrix + matrix.T) / 2 >> 0])
    options = {"eps": eps, "time_limit_secs": time_limit} if solver == "SCS" else {"time_limit": time_limit}
    try:
        program.solve(solver=solver, **options)
    except cp.SolverError as error:
        return None, None, f"solver error: {error}"
    if rho.value is None:
        return None, None, program.status
    values = np.maximum(np.asarray(lam.value, dtype=np.float64), 0.0)
    multipliers, start = [], 0
    for unit in network.units:
        length = unit.size_out if unit.slope is not None else 1
        multipliers.append(values[start:start + length])
        start += length
    return float(rho.value), multipliers, program.status
