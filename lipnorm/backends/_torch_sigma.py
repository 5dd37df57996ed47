"""What sigma is the norm of, and the power iteration that estimates it (PyTorch).

Two views of a weight ``W``:

``MatrixView(dim)``
    torch's semantics: ``W`` with axis ``dim`` moved to the front and the rest flattened,
    a ``(h, w)`` matrix; ``u`` has length ``h``, ``v`` length ``w``.
``OperatorView(layer_map)``
    the layer's own linear map (a convolution with its stride, padding, dilation, groups):
    ``v`` is shaped like one input ``(1, C_in, *spatial)``, ``u`` like one output.

Both give ``sigma = <u, A v>`` (``u^H A v`` for complex weights, as torch computes it) and its weight gradient ``d sigma / dW`` (with ``u``, ``v``
held constant) as an in-place update of a weight gradient, so no weight-sized temporary is
formed for the matrix view.

References
----------
Miyato, Kataoka, Koyama, Yoshida, "Spectral Normalization for Generative Adversarial
Networks", ICLR 2018, Algorithm 1.
Ryu et al., "Plug-and-Play Methods Provably Converge with Properly Trained Denoisers",
ICML 2019, Section 5 (power iteration through the convolution operator).
"""

from __future__ import annotations

from typing import NamedTuple, Union

import torch

from ._torch_layer_maps import ConvMap, LinearMap


def exporting() -> bool:
    """Whether ``torch.onnx.export`` (either exporter) or ``torch.export`` is tracing the call."""
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return the inner product ``sum(conj(a) * b)`` as a 0-d tensor, without a temporary.

    For real arguments this is ``sum(a * b)``. Low-precision (float16/bfloat16) arguments are
    accumulated in float32. While a model is exported, the product and the sum are separate
    operators (ONNX has no ``vdot``; the TorchScript exporter refuses ``aten::vdot``).
    """
    if a.dtype in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    if exporting():
        return torch.sum(a.conj().reshape(-1) * b.reshape(-1))
    return torch.vdot(a.reshape(-1), b.reshape(-1))


def normalize_into_(w: torch.Tensor, out: torch.Tensor, eps: float) -> None:
    """Write ``w / ||w||`` into ``out``; keep ``out`` unchanged where ``||w|| <= eps``.

    Keeping the previous unit vector (instead of writing ``w / eps``) means a zero weight
    never turns ``u`` or ``v`` into a zero vector from which the iteration cannot recover.
    """
    norm = torch.linalg.vector_norm(w)
    out.copy_(torch.where(norm > eps, w / norm.clamp_min(eps), out))


class MatrixView(NamedTuple):
    """``W`` seen as the matrix ``W.movedim(dim, 0).reshape(W.shape[dim], -1)`` (torch's SN)."""

    dim: int

    def operand(self, weight: torch.Tensor) -> torch.Tensor:
        """Return the ``(h, w)`` matrix (a view when ``dim == 0`` and ``weight`` is contiguous)."""
        return weight.movedim(self.dim, 0).reshape(weight.shape[self.dim], -1)

    def matvec(self, matrix: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Return ``matrix @ v``, shape ``(h,)``."""
        return torch.mv(matrix, v)

    def rmatvec(self, matrix: torch.Tensor, u: torch.Tensor, v_like: torch.Tensor) -> torch.Tensor:
        """Return ``matrix^H @ u`` (the conjugate transpose; ``matrix^T`` when real), shape ``(w,)``."""
        return torch.mv(matrix.mH, u)

    def initial_vectors(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return random unit vectors ``u`` (``h``) and ``v`` (``w``) in ``weight``'s dtype/device."""
        h = weight.shape[self.dim]
        u = torch.randn(h, dtype=weight.dtype, device=weight.device)
        v = torch.randn(weight.numel() // h, dtype=weight.dtype, device=weight.device)
        return u / torch.linalg.vector_norm(u), v / torch.linalg.vector_norm(v)

    def add_sigma_grad_(self, grad_weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                        alpha: torch.Tensor) -> None:
        """Add ``alpha * d sigma/dW = alpha * u v^T`` (in ``W``'s layout) to ``grad_weight`` in place."""
        moved = grad_weight.movedim(self.dim, 0)
        u_col = (u * alpha).to(moved.dtype).view(-1, *([1] * (moved.ndim - 1)))
        moved.addcmul_(u_col, v.to(moved.dtype).view(moved.shape[1:]))


class OperatorView(NamedTuple):
    """``W`` seen through the layer's own linear map (for convolutions: the true operator)."""

    layer_map: Union[ConvMap, LinearMap]

    def operand(self, weight: torch.Tensor) -> torch.Tensor:
        """Return ``weight`` unchanged: the map is applied by convolution."""
        return weight

    def matvec(self, weight: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Return ``A_W(v)`` for one input-shaped ``v``."""
        return self.layer_map.apply(v, weight)

    def rmatvec(self, weight: torch.Tensor, u: torch.Tensor, v_like: torch.Tensor) -> torch.Tensor:
        """Return ``A_W^T(u)``, shaped like ``v_like``."""
        return self.layer_map.adjoint(u, weight, v_like)

    def initial_vectors(self, weight: torch.Tensor, input_shape: tuple[int, ...]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return random unit ``u`` (one output) and ``v`` (shape ``(1, *input_shape)``)."""
        v = torch.randn((1, *input_shape), dtype=weight.dtype, device=weight.device)
        u = torch.randn_like(self.matvec(weight.detach(), v))
        return u / torch.linalg.vector_norm(u), v / torch.linalg.vector_norm(v)

    def add_sigma_grad_(self, grad_weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                        alpha: torch.Tensor) -> None:
        """Add ``alpha * d<u, A_W v>/dW`` to ``grad_weight`` in place."""
        dtype = grad_weight.dtype
        grad_weight.add_(self.layer_map.weight_grad(v.to(dtype), (u * alpha).to(dtype), grad_weight))


SigmaView = Union[MatrixView, OperatorView]


def power_iteration_(view: SigmaView, operand: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                     n_iterations: int, eps: float) -> torch.Tensor:
    """Run ``n_iterations`` steps ``u <- A v/||A v||``, ``v <- A^T u/||A^T u||`` in place.

    Parameters
    ----------
    view : MatrixView or OperatorView
        What ``A`` is.
    operand : torch.Tensor
        ``view.operand(W)``, detached, in the iteration dtype.
    u, v : torch.Tensor
        Unit vectors (output- and input-shaped), overwritten in place.
    n_iterations : int
        At least 1.
    eps : float
        Norms at or below ``eps`` leave the vector unchanged.

    Returns
    -------
    torch.Tensor
        ``t = A^T u`` of the last step, so that ``sigma = <u, A v> = <t, v>`` needs no
        further product.
    """
    for _ in range(n_iterations):
        normalize_into_(view.matvec(operand, v), u, eps)
        t = view.rmatvec(operand, u, v)
        normalize_into_(t, v, eps)
    return t


#: Longest Golub-Kahan-Lanczos run before a restart from its own Ritz vectors. In float32 with
#: one Gram-Schmidt pass, 100 warm-up steps on a 3->32 conv at 16x16 left sigma 8% low as one
#: run (the basis lost orthogonality); with two passes (CGS2) every block size tried (8, 32,
#: 101) lands within 3e-6 of the certified lower bound. Short runs keep few vectors alive.
MAX_KRYLOV_STEPS = 8


def golub_kahan_(view: SigmaView, operand: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                 n_iterations: int, eps: float) -> torch.Tensor:
    """Refine ``u``, ``v`` in place by ``n_iterations + 1`` Golub-Kahan-Lanczos steps from ``v``.

    The steps run in restarted blocks (:func:`golub_kahan_block_`) of at most
    ``MAX_KRYLOV_STEPS`` and at most the dimension of the smaller space, so long warm-ups
    neither outgrow the Krylov space (where the basis would fill with rounding noise) nor
    hold many vectors at once. A training step (one or a few iterations) is one block.

    Returns
    -------
    torch.Tensor
        0-d ``sigma = <u, A v>`` for the updated ``u``, ``v``.
    """
    remaining = n_iterations + 1
    block = max(1, min(MAX_KRYLOV_STEPS, u.numel(), v.numel()))
    while True:
        steps = min(remaining, block)
        sigma = golub_kahan_block_(view, operand, u, v, steps, eps)
        remaining -= steps
        if remaining <= 0:
            return sigma


def golub_kahan_block_(view: SigmaView, operand: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                       k: int, eps: float) -> torch.Tensor:
    """Refine ``u``, ``v`` in place by ``k`` steps of Golub-Kahan-Lanczos from ``v``.

    Builds orthonormal ``V = [v_1..v_k]`` (``v_1 = v``; ``v_{j+1}`` from ``A^T u_j``, fully
    reorthogonalized) and orthonormal ``U`` with ``A V = U B``, ``B`` upper triangular, from
    the products ``A v_j`` themselves, so the identity holds whatever the loss of
    orthogonality (``k`` at most the dimension of either space). With ``y`` the top right
    singular vector of the small ``B``::

        v <- V y / ||V y||,   u <- U B y / ||U B y||,   sigma = ||U B y|| / ||V y|| = <u, A v>.

    The Krylov space contains the power iteration's vector, and on the dense top spectrum
    of a convolution the Ritz value converges much faster. Costs ``k`` products with ``A``
    and ``k - 1`` with ``A^T``.

    Returns
    -------
    torch.Tensor
        0-d ``sigma = <u, A v>`` for the updated ``u``, ``v``.

    References
    ----------
    Golub, Kahan, "Calculating the singular values and pseudo-inverse of a matrix", SIAM J.
    Numer. Anal. B 2(2), 1965; Golub, Van Loan, "Matrix Computations", 4th ed., Section 10.4.
    """
    us, vs, columns = [], [], []
    v_j = v
    for j in range(k):
        vs.append(v_j)
        w = view.matvec(operand, v_j)
        column = [w.new_zeros(()) for _ in us]
        for _ in range(2):  # CGS2, the coefficients of both passes summed: A V = U B stays exact
            for i, u_i in enumerate(us):
                c = inner(u_i, w)
                w = w - c * u_i
                column[i] = column[i] + c
        alpha = torch.linalg.vector_norm(w)
        us.append(w / alpha.clamp_min(eps))
        columns.append(torch.stack(column + [alpha] + [alpha.new_zeros(())] * (k - j - 1)))
        if j + 1 < k:
            z = view.rmatvec(operand, us[-1], v_j)
            for _ in range(2):  # twice (CGS2): one pass loses orthogonality in float32
                for v_i in vs:
                    z = z - inner(v_i, z) * v_i
            v_j = z / torch.linalg.vector_norm(z).clamp_min(eps)
    small = torch.stack(columns, dim=1)
    y = torch.linalg.svd(small)[2][0]
    by = small @ y
    v_new = sum(y_j * v_j for y_j, v_j in zip(y, vs))
    u_new = sum(b_i * u_i for b_i, u_i in zip(by, us))
    sigma = torch.linalg.vector_norm(u_new) / torch.linalg.vector_norm(v_new).clamp_min(eps)
    # In exact arithmetic the Ritz value is at least the start's ||A v_1|| (the Krylov space
    # holds v_1); rounding can make it come out lower, and then the start is kept, so that
    # more steps never lower sigma. torch.where keeps the graph free of data-dependent branches.
    start_sigma = columns[0][0]
    improved = sigma >= start_sigma
    v_new = torch.where(improved, v_new, vs[0])
    u_new = torch.where(improved, u_new, us[0])
    sigma = torch.where(improved, sigma, start_sigma)
    normalize_into_(u_new, u, eps)
    normalize_into_(v_new, v, eps)
    return sigma


def update_sigma_(view: SigmaView, operand: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                  n_iterations: int, eps: float) -> torch.Tensor:
    """Update ``u``, ``v`` in place and return ``sigma = <u, A v>`` at ``operand``.

    Matrix view: torch's power iteration (``n_iterations`` steps, identical to torch's SN).
    Operator view: Golub-Kahan-Lanczos with ``n_iterations + 1`` steps.
    """
    if isinstance(view, OperatorView):
        return golub_kahan_(view, operand, u, v, n_iterations, eps)
    return inner(power_iteration_(view, operand, u, v, n_iterations, eps), v)
