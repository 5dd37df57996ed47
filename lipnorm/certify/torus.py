r"""The torus view of a convolutional graph: every linear map a strided circular convolution.

A zero-padded convolutional network, restricted to its input window, is a network on a
torus. Every tensor of the model is placed on a grid :math:`\mathbb{Z}_{N_1} \times \dots
\times \mathbb{Z}_{N_d}` (its :class:`TorusSpace`) with its window (the model's tensor) at
positions ``[0, n)`` of each axis; everything outside the window is extra. Then

* a zero-padded convolution with stride ``s`` and padding ``p`` is the circular
  convolution ``y[o] = Σ_j W_j x[(o s + j δ − p) mod N]`` from a grid ``N`` to ``N / s``
  (:class:`TorusConv`): on the window it reads exactly the samples the zero-padded one
  reads and, where its input is zero outside the window, zeros in the padding, as long as
  ``N ≥ max(L − p, p + n, m s)`` (:func:`lipnorm.conv.bounds.embedding_grid`'s condition);
* BatchNorm, average pooling, zero padding (a shift), concatenation (a channel placement)
  and 1×1 convolutions are circular convolutions too; a dense layer reading a flattened
  window is one whose kernel covers the window and whose stride is the whole grid: its
  output lives on the grid of one point, where every later dense layer is a 1×1
  convolution;
* an elementwise activation with slopes in ``[a, b]`` is *masked* to the window: it is
  applied on the window and gives zero outside, so its derivative is ``diag(φ')`` on the
  window and 0 outside, a slope range of ``[min(a, 0), max(b, 0)]``. On a space whose
  window is the whole grid (circular padding, the one-point grid) nothing is masked and
  the range stays ``[a, b]``;
* where a tensor that is not zero outside its window (a convolution's output, which
  spills into the padding ring) feeds a layer that reads outside the window, the model's
  zero padding still cuts it: a *mask* unit (``diag`` of 0 and 1, slopes in ``[0, 1]``)
  keeps it. Dropping it gives a map that can differ from the model on the window: ``x ↦
  (Sx, x) ↦ S⁻¹(Sx) − x`` is 0 on a torus and has norm 1 with zero padding;
* a nonlinear layer known by its bound alone (max pooling, a user rule) is an *opaque*
  unit that reads its input's window and writes its output's window (zero elsewhere).

With every activation replaced by its midpoint times the identity, a product of these maps
is a strided circular convolution again, whose norm is a maximum over frequencies of the
norms of small matrices (:mod:`lipnorm.certify.fibers`): what the chain method needs.

:func:`lipnorm.certify.torus_builder.torus_network` builds the view from a graph and
chooses the grids; it refuses, with :class:`NotOnTorus` naming the layer, what a torus
cannot hold (reflect and replicate padding, transposed convolutions, maps that are not
translation-invariant).

The view keeps the model's convention that a layer's bias and a BatchNorm's shift are
dropped (they do not change the Jacobian).

References
----------
.. [1] H. Sedghi, V. Gupta, P. M. Long, "The Singular Values of Convolutional Layers",
   ICLR 2019 (circular convolutions are block-diagonal in Fourier space).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lipnorm.bounds import round_up
from lipnorm.certify.rounding import UNIT_ROUNDOFF
from lipnorm.certify.unit import LoopUnit
from lipnorm.conv.spectrum import block_error_bound, kernel_symbol

__all__ = ["NotOnTorus", "TorusBlock", "TorusConv", "TorusNetwork", "TorusPath", "TorusSpace", "TorusUnit"]


class NotOnTorus(ValueError):
    """The graph has a layer the torus view cannot hold; the message names it."""


@dataclass(frozen=True)
class TorusSpace:
    """Where one tensor of the model lives: ``channels`` × ``grid``, the model's entries in
    the window ``[0, n)`` of every spatial axis.

    Attributes
    ----------
    channels : int
    window : tuple of int
        The model tensor's spatial size ``n`` per axis (all 1 for a vector).
    grid : tuple of int
        The torus size ``N ≥ n`` per axis (all 1 for a vector).
    """

    channels: int
    window: tuple[int, ...]
    grid: tuple[int, ...]

    @property
    def full(self) -> bool:
        """Whether the window is the whole grid (nothing outside it)."""
        return self.window == self.grid

    @property
    def size(self) -> int:
        """Entries of the torus tensor, ``channels · ∏ N``."""
        return self.channels * math.prod(self.grid)


@dataclass(frozen=True, eq=False)
class TorusConv:
    r"""A strided circular convolution from one space to another.

    ``y[c, o] = Σ_j Σ_c' W[c, c', j] x[c', (o·s + j·δ + origin) mod N]`` for ``o`` on the
    target grid ``N / s`` (per group of channels, as in PyTorch). In Fourier space
    (unitary DFTs), target frequency η receives the ``S = ∏ s`` source frequencies
    ``ξ = η + a N/s``: ``ŷ(η) = S^{-1/2} Σ_a H(ξ_a) x̂(ξ_a)`` with ``H(ξ) = Σ_j W_j
    e^{2πi ξ·(jδ + origin)/N}`` (:func:`lipnorm.conv.spectrum.kernel_symbol`).

    Attributes
    ----------
    name : str
        The graph node it comes from (shown in refusals and notes).
    kernel : ndarray, float64, shape (cout, cin / groups, *k)
    stride, dilation, origin : tuple of int
    groups : int
    source, target : TorusSpace
    error : float
        Upper bound of the operator norm of (this convolution − the model's exact map) on
        the torus, from the rounding that formed the kernel.
    """

    name: str
    kernel: np.ndarray
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    origin: tuple[int, ...]
    groups: int
    source: TorusSpace
    target: TorusSpace
    error: float = 0.0

    @property
    def alias_count(self) -> int:
        """``S``: source frequencies folding onto each target frequency."""
        return math.prod(self.stride)

    def symbol(self, freqs: np.ndarray) -> np.ndarray:
        """``S^{-1/2} H(ξ)`` at source frequencies ``freqs`` (rounding: :meth:`block_error`).

        Parameters
        ----------
        freqs : ndarray of int, shape (F, d)

        Returns
        -------
        ndarray, complex128, shape (F, cout, cin)
            Block-diagonal over the groups.
        """
        grouped = self._grouped()
        groups, cout_g, cin_g = grouped.shape[:3]
        per_group = kernel_symbol(grouped, self.dilation, self.source.grid, freqs, self.origin)
        scale = 1.0 / math.sqrt(self.alias_count)
        if groups == 1:
            return per_group[0] * scale
        blocks = np.zeros((freqs.shape[0], groups * cout_g, groups * cin_g), dtype=np.complex128)
        for g in range(groups):
            blocks[:, g * cout_g:(g + 1) * cout_g, g * cin_g:(g + 1) * cin_g] = per_group[g] * scale
        return blocks

    def block_error(self, aliases: int) -> float:
        """Bound on the spectral-norm error of ``aliases`` blocks of :meth:`symbol` side by
        side (a target frequency's row of the operator, or a slice of it), the model's own
        rounding (``error``) included."""
        rounding = block_error_bound(self._grouped(), (aliases,)) / math.sqrt(self.alias_count)
        return round_up(rounding * (1 + 4 * UNIT_ROUNDOFF) + self.error)

    def norm_bound(self) -> float:
        """A cheap upper bound of the operator norm: ``Σ_j ‖W_j‖_F`` (each tap is a shift,
        of norm 1, times a channel matrix; subsampling does not increase the norm)."""
        taps = self.kernel.reshape(self.kernel.shape[0], self.kernel.shape[1], -1)
        return round_up(float(np.sqrt((taps**2).sum(axis=(0, 1))).sum()) * (1 + 1e-12) + self.error)

    def _grouped(self) -> np.ndarray:
        cout, cin_g = self.kernel.shape[:2]
        return self.kernel.reshape((self.groups, cout // self.groups, cin_g) + self.kernel.shape[2:])


@dataclass(frozen=True)
class TorusPath:
    """``scale`` times the convolutions applied in order (the identity when there are none).

    Attributes
    ----------
    convs : tuple of TorusConv
    scale : float
    scale_error : float
        ``|scale − exact scale|`` (products of affine slopes and scalars are rounded).
    """

    convs: tuple[TorusConv, ...] = ()
    scale: float = 1.0
    scale_error: float = 0.0

    def then(self, conv: TorusConv) -> "TorusPath":
        return TorusPath((*self.convs, conv), self.scale, self.scale_error)

    def scaled(self, factor: float) -> "TorusPath":
        scale = self.scale * factor
        error = abs(factor) * self.scale_error + UNIT_ROUNDOFF * abs(scale)
        return TorusPath(self.convs, scale, round_up(error))


#: A linear map between two tensors of the network: the sum of its paths.
TorusBlock = tuple[TorusPath, ...]


@dataclass
class TorusUnit(LoopUnit):
    """A nonlinear (or masking) unit of a :class:`TorusNetwork`.

    Attributes
    ----------
    name : str
        The graph node (``"<node>.mask"`` for a mask the view added before a node).
    kind : {"activation", "mask", "opaque"}
    input_space, output_space : TorusSpace
        Equal but for an opaque unit.
    slope : (float, float) or None
        The slope range on the torus (masked: ``[min(a, 0), max(b, 0)]``); ``[0, 1]`` for a
        mask; None for an opaque unit.
    bound : float
        Upper bound of the unit's Lipschitz constant on the torus.
    inputs : dict of int to TorusBlock
        The unit's input ``z = Σ_s inputs[s] v_s`` over sources ``s``: 0 is the model
        input, ``j + 1`` the output of unit ``j``.
    """

    name: str
    kind: str
    input_space: TorusSpace
    output_space: TorusSpace
    slope: tuple[float, float] | None
    bound: float
    inputs: dict[int, TorusBlock] = field(default_factory=dict)


@dataclass
class TorusNetwork:
    """A network as units on tori and the strided circular convolutions between them.

    The model's Jacobian at any input is the window restriction of this network's:
    ``J_model = R J_torus E`` with ``E`` the embedding of the input window and ``R`` the
    restriction to the output window, so ``‖J_model‖ ≤ ‖J_torus‖``.

    Attributes
    ----------
    input_space : TorusSpace
    units : list of TorusUnit
        In topological order.
    output : dict of int to TorusBlock
        ``f = Σ_s output[s] v_s``.
    output_space : TorusSpace
    fiber_grid : tuple of int
        ``N_f`` per axis: every grid but the one-point grid is a multiple of it, so the
        network splits into ``∏ N_f`` independent fibers (:mod:`lipnorm.certify.fibers`).
    """

    input_space: TorusSpace
    units: list[TorusUnit]
    output: dict[int, TorusBlock]
    output_space: TorusSpace
    fiber_grid: tuple[int, ...]

    def source_space(self, source: int) -> TorusSpace:
        """Space of source ``source`` (0: the input; j + 1: unit j's output)."""
        return self.input_space if source == 0 else self.units[source - 1].output_space

    def convs(self) -> list[TorusConv]:
        """Every convolution of the network, once each, in order of appearance."""
        seen: dict[int, TorusConv] = {}
        for blocks in [unit.inputs for unit in self.units] + [self.output]:
            for paths in blocks.values():
                for path in paths:
                    for conv in path.convs:
                        seen.setdefault(id(conv), conv)
        return list(seen.values())
