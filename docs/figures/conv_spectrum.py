"""A convolution's singular values over spatial frequencies.

For circular padding a 2-D convolution is block-diagonalized by the 2-D DFT: on an n×n
input its singular values are those of the cout×cin matrices K̂(ω) = Σ_x K[:, :, x] e^{-iωx},
one per frequency ω (Sedghi, Gupta and Long, ICLR 2019). The figure shows, for a random
3×3, 16→16 kernel on 32×32 inputs, the largest singular value at each frequency (left),
and all singular values sorted (right) with σ of the reshaped kernel, what torch's and
Keras's spectral norm divide by, and the operator norm, checked against lipnorm's
``conv_operator(..., padding="circular").exact_sigma()``. Writes docs/img/conv_spectrum.png.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

import lipnorm
from _style import save

N = 32


def frequency_singular_values(kernel: np.ndarray, n: int) -> np.ndarray:
    """Singular values of K̂(ω) for every frequency of an n×n input: shape (n, n, min(cout, cin))."""
    symbol = np.fft.fft2(kernel, s=(n, n), axes=(2, 3))          # (cout, cin, n, n)
    return np.linalg.svd(symbol.transpose(2, 3, 0, 1), compute_uv=False)


def main() -> None:
    kernel = np.random.default_rng(0).standard_normal((16, 16, 3, 3)) / 12
    values = frequency_singular_values(kernel, N)
    operator_norm = float(values.max())
    exact = lipnorm.conv_operator(kernel, (16, N, N), padding="circular").exact_sigma()
    np.testing.assert_allclose(operator_norm, exact, rtol=1e-10)
    reshaped = float(np.linalg.svd(kernel.reshape(16, -1), compute_uv=False)[0])

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    image = left.imshow(np.fft.fftshift(values[..., 0]), extent=(-np.pi, np.pi, -np.pi, np.pi),
                        origin="lower", cmap="viridis")
    fig.colorbar(image, ax=left, label="largest singular value of K̂(ω)")
    left.set_xlabel("ω₁")
    left.set_ylabel("ω₂")
    left.set_title("top singular value per frequency")
    right.plot(np.sort(values.ravel())[::-1], color="tab:blue", label="all singular values")
    right.axhline(operator_norm, color="black", label=f"operator norm {operator_norm:.3f}")
    right.axhline(reshaped, color="tab:red", linestyle="--",
                  label=f"σ of the reshaped kernel {reshaped:.3f}")
    right.set_xlabel(f"index (of {values.size} = 16 · {N}²)")
    right.set_ylabel("singular value")
    right.set_title("the convolution's spectrum, sorted")
    right.legend(fontsize=8)
    save(fig, "conv_spectrum.png")


if __name__ == "__main__":
    main()
