"""Two CPU processes in one gloo process group, for the DistributedDataParallel tests."""

import sys

import pytest

torch = pytest.importorskip("torch")

WORLD_SIZE = 2

requires_gloo = pytest.mark.skipif(not torch.distributed.is_available() or sys.platform == "win32",
                                   reason="needs torch.distributed with gloo")


def _rank_main(rank, worker, init_file, args):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=WORLD_SIZE)
    try:
        worker(rank, *args)
    finally:
        torch.distributed.destroy_process_group()


def run_on_two_ranks(worker, tmp_path, *args) -> None:
    """Run ``worker(rank, *args)`` on each of two processes joined in a gloo group.

    ``worker`` must be a module-level function (the processes are spawned); it saves what the
    test compares, e.g. under ``tmp_path``.
    """
    torch.multiprocessing.spawn(_rank_main, args=(worker, str(tmp_path / "init"), args), nprocs=WORLD_SIZE,
                                join=True)
