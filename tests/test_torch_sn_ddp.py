"""lipnorm's torch spectral norm under DistributedDataParallel: 2 CPU processes on gloo."""

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from lipnorm.backends.torch import sigmas, spectral_norm  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or sys.platform == "win32",
                                reason="needs torch.distributed with gloo")

STEPS = 3
WORLD_SIZE = 2


def _model():
    torch.manual_seed(0)
    return nn.Sequential(spectral_norm(nn.Conv2d(2, 4, 3, padding=1)), nn.ReLU(),
                         spectral_norm(nn.Conv2d(4, 4, 3, stride=2, padding=1), mode="operator"), nn.ReLU(),
                         nn.Flatten(), spectral_norm(nn.Linear(4 * 3 * 3, 1)))


def _batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 2, 6, 6, generator=generator), torch.randn(8, 1, generator=generator))
            for _ in range(STEPS)]


def _train(model, forward, shard):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for x, target in _batches():
        loss = (forward(x[shard]) - target[shard]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _state(model, losses):
    return {"losses": losses, "sigmas": sigmas(model),
            "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _ddp_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=WORLD_SIZE)
    try:
        model = _model()
        model(torch.zeros(1, 2, 6, 6))  # operator mode: create u, v (same on every rank: same seed)
        ddp = nn.parallel.DistributedDataParallel(model)
        losses = _train(model, ddp, slice(rank, None, WORLD_SIZE))
        torch.save(_state(model, losses), f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_processes_match_single_process(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)),
                                nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    single = _model()
    single(torch.zeros(1, 2, 6, 6))
    expected = _state(single, _train(single, single, slice(None)))
    for key, value in ranks[0]["tensors"].items():
        torch.testing.assert_close(ranks[1]["tensors"][key], value, rtol=0, atol=0, msg=key)
        np.testing.assert_allclose(value, expected["tensors"][key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert ranks[0]["sigmas"] == ranks[1]["sigmas"]
    np.testing.assert_allclose(list(ranks[0]["sigmas"].values()), list(expected["sigmas"].values()), rtol=1e-5)
    mean_rank_loss = np.mean([r["losses"] for r in ranks], axis=0)
    np.testing.assert_allclose(mean_rank_loss, expected["losses"], rtol=1e-5)
