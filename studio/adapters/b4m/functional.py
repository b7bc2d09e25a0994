"""Break-for-Make's math as pure functions: the split of a LoRA pair into frozen and learnable halves.

A LoRA update is ``dW = s * up @ down`` with ``up`` (d_out x r) and ``down`` (r x d_in; a
convolution's down is r x d_in x kh x kw). Partly learnable projections (PLP) split both:

    up   = [A; B]     A: the first ``h_out = d_out // 2`` output rows (frozen), B: the rest (learnable)
    down = [C, D]     C: the first ``h_in = d_in // 2`` input channels (frozen), D: the rest (learnable)

    dW = s * [[A C, A D],
              [B C, B D]]

Content trains D, style trains B; the make step takes ``up = [A; B_style]``,
``down = [C, D_content]`` (:func:`make`).

**The frozen halves.** A and C are drawn once per layer from a seeded generator (the seed, the
layer's name and its shape), so a content run and a style run trained apart hold bit-identical
A and C. One orthonormal basis ``Q`` (``(h_out + h_in*taps) x r``, QR of a Gaussian) is drawn per
layer; A takes its first ``h_out`` rows, C its remaining rows (disjoint rows, as in the
reference code), each re-orthonormalised, and the two use *complementary halves of the rank
space*: A's columns ``k:`` and C's rows ``:k`` are exact zeros (``k = r // 2``). So ``A C = 0``
exactly and a fresh adapter (B = D = 0) is the base model bit for bit. The reference code's
A and C span the whole rank space, so its ``A C`` is small but not zero: a fresh adapter already
moves the model, and the AC block is a fixed perturbation nobody trains.

**Disjoint rank components (no cross term; a deviation).** With ``A C = 0`` as above, A reads
only rank components ``:k`` of D and C feeds only components ``k:`` of B. The product of the
other two, ``B D = B[:, :k] D[:k] + B[:, k:] D[k:]``, is the cross term that the make step
creates between a content D and a style B that never trained together. By default the learnable
halves use only the components their frozen partner pairs with: D's rows ``:k`` and B's columns
``k:`` (:func:`live_components`); the rest stay exact zeros, so ``B D = 0`` and a layer's update
is ``[[0, A D], [B C, 0]]``: the content's block plus the style's block, whatever the partner.
Measured on micro (docs/b4m.md): without it the content stage's D grew components ``k:``, read
by its auxiliary B alone, larger than the ones A reads, and the style B of the make step turns
them into an update neither stage trained. The halves still meet
across layers (one layer's B C feeds the next layer's D), which is what multi-correspondence
and the make step's joint fine-tune are for.

**d_in != d_out** (cross-attention k/v read the text width, out projections, ResNet shortcuts):
the output and input splits are independent, each at its own half, so every target layer takes
PLP whatever its shape. The reference applies PLP only where d_in == d_out (its shared basis is
1280 wide) and leaves the other layers as plain LoRAs that both stages train, so there the two
runs overwrite each other at the make step; here nothing is shared but A and C.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch

from studio.errors import StudioError


@dataclasses.dataclass(frozen=True)
class Split:
    """Where one layer's LoRA pair is cut: output rows ``[:h_out]`` and input channels ``[:h_in]`` are frozen."""

    d_out: int
    d_in: int  # input channels (a convolution's taps are not split)
    taps: int  # kh * kw of the down convolution, 1 for a Linear
    rank: int

    @property
    def h_out(self) -> int:
        return self.d_out // 2

    @property
    def h_in(self) -> int:
        return self.d_in // 2

    @property
    def k(self) -> int:
        """Rank components of A (the rest, ``rank - k``, belong to C)."""
        return self.rank // 2


def check_split(s: Split, where: str) -> None:
    """Raise a StudioError when the layer is too narrow for the rank (each half needs room for its basis)."""
    if s.rank < 2:
        raise StudioError(f"b4m: --rank {s.rank}: must be at least 2 (A and C take half of the rank each)")
    if s.h_out < s.k or s.h_in * s.taps < s.rank - s.k or s.d_out - s.h_out < 1 or s.d_in - s.h_in < 1:
        limit = 2 * min(s.h_out, s.h_in * s.taps)
        raise StudioError(f"b4m: {where} ({s.d_out} x {s.d_in}) is too narrow for --rank {s.rank}; "
                          f"use --rank {max(2, limit)} or less")


def layer_seed(seed: int, name: str, s: Split) -> int:
    """A 63-bit seed from the run's basis seed, the layer's name and its split: stable across runs and machines."""
    text = f"{seed}|{name}|{s.d_out}|{s.d_in}|{s.taps}|{s.rank}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def _orthonormal_columns(m: torch.Tensor) -> torch.Tensor:
    q, r = torch.linalg.qr(m)
    # fix QR's sign ambiguity so the basis depends on the Gaussian draw only, not on the LAPACK build
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))


def frozen_halves(seed: int, name: str, s: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, C) of one layer in float32: A is ``h_out x r``, C is ``r x h_in*taps`` (reshape it for a conv).

    A's columns ``k:`` and C's rows ``:k`` are exact zeros, so ``A @ C == 0`` exactly; A's nonzero
    columns and C's nonzero rows are orthonormal (isometries: the learnable halves' learning rate
    means what it means for a plain matrix).
    """
    check_split(s, name)
    g = torch.Generator().manual_seed(layer_seed(seed, name, s))
    n_c = s.h_in * s.taps
    basis = _orthonormal_columns(torch.randn(s.h_out + n_c, s.rank, generator=g, dtype=torch.float64))
    a = torch.zeros(s.h_out, s.rank, dtype=torch.float64)
    c = torch.zeros(s.rank, n_c, dtype=torch.float64)
    a[:, : s.k] = _orthonormal_columns(basis[: s.h_out, : s.k])
    c[s.k :, :] = _orthonormal_columns(basis[s.h_out :, s.k :]).T
    return a.float(), c.float()


def live_components(s: Split, role: str) -> torch.Tensor:
    """Bool per rank component: which the learnable half of ``role`` uses when the cross term is off.

    ``"down"`` (D): components ``:k``, the ones A reads; ``"up"`` (B): components ``k:``, the ones C
    feeds. Then ``B @ D == 0`` exactly for any learned B and D.
    """
    live = torch.zeros(s.rank, dtype=torch.bool)
    if role == "down":
        live[: s.k] = True
    elif role == "up":
        live[s.k :] = True
    else:
        raise ValueError(f"role must be 'up' or 'down', not {role!r}")
    return live


def join_up(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """up = [A; B] (rows: frozen first)."""
    return torch.cat([a, b], dim=0)


def join_down(c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """down = [C, D] (input channels: frozen first); dim 1 for Linear (r x in) and Conv2d (r x in x kh x kw)."""
    return torch.cat([c, d], dim=1)


def split_up(up: torch.Tensor, h_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of an up matrix."""
    return up[:h_out], up[h_out:]


def split_down(down: torch.Tensor, h_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, D) of a down matrix."""
    return down[:, :h_in], down[:, h_in:]


def delta_weight(up: torch.Tensor, down: torch.Tensor, scale: float) -> torch.Tensor:
    """``s * up @ down`` as a dense ``d_out x d_in(*taps)`` matrix (a convolution's taps flattened)."""
    return scale * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1))


def blocks(up: torch.Tensor, down: torch.Tensor, h_out: int, h_in: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The four blocks of dW: ``AC, AD, BC, BD`` (for a Linear pair)."""
    (a, b), (c, d) = split_up(up, h_out), split_down(down, h_in)
    return {"AC": scale * a @ c, "AD": scale * a @ d, "BC": scale * b @ c, "BD": scale * b @ d}


def make(content: tuple[torch.Tensor, torch.Tensor], style: tuple[torch.Tensor, torch.Tensor], h_out: int,
         h_in: int, where: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """The make step for one layer: ``up = [A; B_style]``, ``down = [C, D_content]``.

    ``content`` and ``style`` are (up, down) pairs. Their frozen halves must be bit-identical (the
    same basis seed, layer and rank); anything else means the two were not trained as halves of
    one space, and the recombination would be meaningless.
    """
    (up_c, down_c), (up_s, down_s) = content, style
    if up_c.shape != up_s.shape or down_c.shape != down_s.shape:
        raise StudioError(f"b4m make: {where}: the content adapter's matrices {tuple(up_c.shape)}/{tuple(down_c.shape)} "
                          f"and the style adapter's {tuple(up_s.shape)}/{tuple(down_s.shape)} differ: were they "
                          f"trained with another rank or on another base model?")
    a_c, _ = split_up(up_c, h_out)
    a_s, b_s = split_up(up_s, h_out)
    c_c, d_c = split_down(down_c, h_in)
    c_s, _ = split_down(down_s, h_in)
    if not (torch.equal(a_c, a_s) and torch.equal(c_c, c_s)):
        raise StudioError(f"b4m make: {where}: the frozen halves of the content and style adapters differ; they "
                          f"were trained with different basis seeds or targets and cannot be recombined")
    return join_up(a_s, b_s), join_down(c_c, d_c)

