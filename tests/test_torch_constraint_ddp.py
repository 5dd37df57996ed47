"""SpectralConstraint under DistributedDataParallel: 2 CPU processes on gloo give the same
constrained weights on every rank, bit for bit, with no communication of the constraint's own."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from lipnorm.backends.torch import SpectralConstraint  # noqa: E402
from tests.ddp import WORLD_SIZE, requires_gloo, run_on_two_ranks  # noqa: E402
from tests.helpers import true_sigma  # noqa: E402

pytestmark = requires_gloo

STEPS = 3


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16),
                         nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))


def _train(model, forward, shard, projection):
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    SpectralConstraint(model, projection=projection).attach(optimizer)
    for _ in range(STEPS):
        x, target = torch.randn(8, 2, 6, 6, generator=generator), torch.randn(8, 1, generator=generator)
        optimizer.zero_grad()
        (forward(x[shard]) - target[shard]).square().mean().backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _ddp_worker(rank, out_dir, projection):
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    torch.save(_train(model, ddp, slice(rank, None, WORLD_SIZE), projection), f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize("projection", ["scale", "hammer"])
def test_ddp_ranks_agree_bit_for_bit(tmp_path, projection):
    run_on_two_ranks(_ddp_worker, tmp_path, str(tmp_path), projection)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    single = _model()
    expected = _train(single, single, slice(None), projection)
    for name, value in ranks[0].items():
        torch.testing.assert_close(ranks[1][name], value, rtol=0, atol=0, msg=name)
        np.testing.assert_allclose(value, expected[name], rtol=1e-4, atol=1e-5, err_msg=name)
        if name.endswith("weight"):
            assert true_sigma(value.reshape(value.shape[0], -1)) <= 1.0 + 1e-3
