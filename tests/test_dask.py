"""A chunked Dask matrix is processed block by block, never gathered whole."""

from __future__ import annotations

import numpy as np
import pytest

import lipnorm
from tests.helpers import assert_contains, assert_relative_close

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
from dask.callbacks import Callback  # noqa: E402


class LargestResult(Callback):
    """Records the largest array any Dask task produced."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def _posttask(self, key, result, dsk, state, worker_id):
        self.largest = max(self.largest, getattr(result, "size", 0))


def test_estimate_runs_block_by_block_on_the_local_scheduler():
    shape, chunks = (1200, 900), (300, 300)
    matrix = da.random.default_rng(0).standard_normal(shape, chunks=chunks)
    with dask.config.set(scheduler="threads"), LargestResult() as spy:
        sigma, state = lipnorm.estimate_sigma(matrix, method="lanczos", return_state=True)
    assert isinstance(sigma, da.Array)
    assert state.converged
    # No task ever held more than one block (or a vector): the matrix was never gathered.
    assert 0 < spy.largest <= chunks[0] * chunks[1]
    truth = float(np.linalg.norm(matrix.compute(), 2))
    assert_relative_close(float(sigma), truth, 1e-6, "dask")


def test_bounds_on_dask():
    matrix = da.from_array(np.random.default_rng(1).standard_normal((80, 60)), chunks=(20, 20))
    assert_contains(lipnorm.sigma_bounds(matrix), float(np.linalg.norm(matrix.compute(), 2)))
