"""lipnorm's torch spectral norm under DistributedDataParallel: 2 CPU processes on gloo."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from lipnorm.backends.torch import sigmas, spectral_norm  # noqa: E402
from tests.ddp import WORLD_SIZE, requires_gloo, run_on_two_ranks  # noqa: E402

pytestmark = requires_gloo

STEPS = 3


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


def _ddp_worker(rank, out_dir):
    model = _model()
    model(torch.zeros(1, 2, 6, 6))  # operator mode: create u, v (same on every rank: same seed)
    ddp = nn.parallel.DistributedDataParallel(model)
    losses = _train(model, ddp, slice(rank, None, WORLD_SIZE))
    torch.save(_state(model, losses), f"{out_dir}/rank{rank}.pt")


def test_ddp_two_processes_match_single_process(tmp_path):
    run_on_two_ranks(_ddp_worker, tmp_path, str(tmp_path))
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
