"""Host threads for the certified computations: order, errors, configuration, determinism."""

import numpy as np
import pytest

from lipnorm._parallel import parallel_map, worker_count
from lipnorm.conv import conv_operator


def test_results_come_back_in_order_and_errors_propagate(monkeypatch):
    monkeypatch.setenv("LIPNORM_NUM_THREADS", "3")
    assert worker_count() == 3
    assert parallel_map(lambda x: x * x, range(10)) == [x * x for x in range(10)]

    def fail(x):
        raise KeyError(x)

    with pytest.raises(KeyError):
        parallel_map(fail, [1, 2])


@pytest.mark.parametrize("value", ["0", "-2", "two", ""])
def test_a_bad_thread_count_is_refused(monkeypatch, value):
    monkeypatch.setenv("LIPNORM_NUM_THREADS", value)
    with pytest.raises(ValueError, match="LIPNORM_NUM_THREADS must be a positive integer"):
        worker_count()


def test_conv_bounds_do_not_depend_on_the_thread_count(monkeypatch):
    rng = np.random.default_rng(7)
    ops = [
        conv_operator(rng.standard_normal((24, 16, 3, 3)), (16, 12, 12), padding=1),  # Gram symbol
        conv_operator(rng.standard_normal((16, 2, 5, 5)), (2, 12, 12), stride=2, padding=2),  # stacked blocks
    ]
    results = {}
    for threads in ("1", "2", "5"):
        monkeypatch.setenv("LIPNORM_NUM_THREADS", threads)
        results[threads] = [tuple(op.sigma_bounds(dense_max_columns=0)) for op in ops]
    assert results["1"] == results["2"] == results["5"]
