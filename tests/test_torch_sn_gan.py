"""A small SN-GAN on scikit-learn's 8x8 digits with operator-mode spectral normalization."""

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
from torch import nn  # noqa: E402

import lipnorm  # noqa: E402
from lipnorm.backends.torch import spectral_norm, warm_up  # noqa: E402


def _digits(n):
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images[:n], dtype=torch.float32) / 8.0 - 1.0
    return images.unsqueeze(1)


def _operator_norm(layer, input_shape):
    """Largest singular value of the bias-free layer on inputs of ``input_shape``, by dense SVD."""
    layer = copy.deepcopy(layer).double().eval()
    n = 1
    for size in input_shape:
        n *= size
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *input_shape)
    with torch.no_grad():
        columns = layer(basis) - layer(torch.zeros(1, *input_shape, dtype=torch.float64))
    return float(torch.linalg.matrix_norm(columns.reshape(n, -1), 2))


def _discriminator_operator_norms(discriminator):
    input_shapes = {0: (1, 8, 8), 2: (16, 8, 8), 4: (32, 4, 4), 7: (32 * 2 * 2,)}
    return {index: _operator_norm(discriminator[index], shape) for index, shape in input_shapes.items()}


def test_sn_gan_on_digits_trains_without_nan_and_keeps_discriminator_1_lipschitz():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    data = _digits(512)
    generator = nn.Sequential(nn.Linear(16, 64 * 2 * 2), nn.ReLU(), nn.Unflatten(1, (64, 2, 2)),
                              nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),
                              nn.ConvTranspose2d(32, 1, 4, stride=2, padding=1), nn.Tanh())
    # Adam moves these small convolutions fast relative to the convergence of the power
    # iteration through the operator (the top of a convolution's spectrum is dense), and the
    # estimate approaches sigma from below: with 10 steps per training forward (three
    # forwards per optimizer step) the normalized convolutions stay within 1% of norm 1
    # (0.5% at most, checked every 10 steps: see docs/torch.md).
    operator = dict(mode="operator", n_power_iterations=10)
    discriminator = nn.Sequential(
        spectral_norm(nn.Conv2d(1, 16, 3, stride=1, padding=1), **operator), nn.LeakyReLU(0.1),
        spectral_norm(nn.Conv2d(16, 32, 4, stride=2, padding=1), **operator), nn.LeakyReLU(0.1),
        spectral_norm(nn.Conv2d(32, 32, 4, stride=2, padding=1), **operator), nn.LeakyReLU(0.1),
        nn.Flatten(), spectral_norm(nn.Linear(32 * 2 * 2, 1)))
    opt_g = torch.optim.Adam(generator.parameters(), lr=2e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=2e-4, betas=(0.5, 0.9))
    for step in range(1, 151):
        real = data[torch.randint(0, len(data), (32,))]
        fake = generator(torch.randn(32, 16))
        loss_d = torch.relu(1 - discriminator(real)).mean() + torch.relu(1 + discriminator(fake.detach())).mean()
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        loss_g = -discriminator(fake).mean()
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        assert torch.isfinite(loss_d) and torch.isfinite(loss_g), step
        if step % 50 == 0:
            norms = _discriminator_operator_norms(discriminator)
            assert all(norm <= 1.0 + 1e-2 for norm in norms.values()), (step, norms)
            assert norms[7] <= 1.0 + 1e-3  # the Linear layer: matrix mode is its operator norm
            bound = 1.0
            for norm in norms.values():  # LeakyReLU(0.1) and Flatten are 1-Lipschitz
                bound *= norm
            assert bound <= (1.0 + 1e-2) ** 3 * (1.0 + 1e-3)
    with torch.no_grad():
        assert torch.isfinite(generator(torch.randn(8, 16))).all()
    # After training, converged u, v make the whole discriminator certifiably 1-Lipschitz.
    warm_up(discriminator, iterations=100)
    certificate = lipnorm.certify(discriminator.eval(), input_shape=(1, 8, 8))
    assert certificate.upper <= 1.0 + 1e-2, certificate.table()
