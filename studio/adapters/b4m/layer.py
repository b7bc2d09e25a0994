"""The partly learnable projection: a LoRA matrix whose frozen half is a buffer and whose other half learns.

:class:`SplitWeight` takes the place of a PEFT LoRA layer's ``lora_A`` (down) or ``lora_B`` (up)
module. Its ``weight`` is ``cat([frozen, learn], dim)``; only ``learn`` is a Parameter, so no
optimizer, weight decay or gradient clipping can reach the frozen half. Its state dict holds the
plain ``weight`` (hooks join and split it), so files, checkpoints, PEFT's merge and vanilla
diffusers see an ordinary LoRA.

Gradient routing: ``grad_rows`` (a bool per batch row, or None) lets one forward pass carry
samples that train this half and samples that must not (the content images train D but not B;
the auxiliary style sets train B but not D). Rows outside the mask see the same values with
the learnable half detached. Partner dropout (``off_rows``): rows that see the learnable half
as zero, so a stage's own images train its half beside the partner half and without it. The reference code's two optimizers each zero only their own
parameters, so there both losses reach both halves; routing keeps them apart in one pass.

Disjoint rank components (``live``): a bool per rank component; the learnable half's entries of
the other components are held at exact zeros (masked in ``weight``, so they get no gradient and
AdamW, which starts them at zero, leaves them there). :mod:`studio.adapters.b4m.functional`
explains why (``B D = 0``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from studio.errors import StudioError


class SplitWeight(nn.Module):
    """``weight = cat([frozen, learn], dim)`` applied as a Linear or a Conv2d (no bias)."""

    def __init__(self, frozen: torch.Tensor, learn: torch.Tensor, dim: int, role: str,
                 conv: dict[str, Any] | None = None, live: torch.Tensor | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.role = role  # "up" (the learnable half is B) or "down" (D)
        self.conv = conv  # stride/padding/dilation of a convolution, None for a Linear
        self.register_buffer("frozen", frozen.detach().clone())
        self.learn = nn.Parameter(learn.detach().clone())
        # the rank axis is dim 1 of an up matrix (d_out x r) and dim 0 of a down matrix (r x d_in)
        self.rank_dim = 1 if role == "up" else 0
        mask = None
        if live is not None:
            shape = [1] * learn.dim()
            shape[self.rank_dim] = -1
            mask = live.to(learn.device, learn.dtype).view(shape)
            with torch.no_grad():
                self.learn.mul_(mask)
        # not persistent: files hold the joined weight only (the mask is the recipe's, re-made on injection)
        self.register_buffer("mask", mask, persistent=False)
        self.grad_rows: torch.Tensor | None = None
        self.off_rows: torch.Tensor | None = None  # rows that see this learnable half as zero (partner dropout)
        self.register_state_dict_post_hook(_join_hook)
        self.register_load_state_dict_pre_hook(_split_hook)

    @property
    def live_learn(self) -> torch.Tensor:
        """The learnable half as it acts: its masked rank components are exact zeros."""
        return self.learn if self.mask is None else self.learn * self.mask

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.frozen.to(self.learn.dtype), self.live_learn], dim=self.dim)

    @property
    def split_at(self) -> int:
        return self.frozen.shape[self.dim]

    def _apply_weight(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.linear(x, w)
        return F.conv2d(x, w, None, **self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows, off = self.grad_rows, self.off_rows
        routed = rows is not None and torch.is_grad_enabled()
        if not routed and off is None:
            return self._apply_weight(x, w)
        out = self._apply_weight(x, w)
        if routed:
            if rows.shape[0] != x.shape[0]:
                raise StudioError(f"b4m: gradient routing for {rows.shape[0]} rows, but the batch has {x.shape[0]}")
            dead = self._apply_weight(x, torch.cat([self.frozen.to(self.learn.dtype), self.live_learn.detach()],
                                                   dim=self.dim))
            mask = rows.to(x.device).view(-1, *([1] * (out.dim() - 1)))
            out = torch.where(mask, out, dead)
        if off is not None:
            if off.shape[0] != x.shape[0]:
                raise StudioError(f"b4m: partner dropout for {off.shape[0]} rows, but the batch has {x.shape[0]}")
            # these rows see the layer as if its learnable half were still zero (the frozen half alone)
            bare = self._apply_weight(x, torch.cat([self.frozen.to(self.learn.dtype), torch.zeros_like(self.learn)],
                                                   dim=self.dim))
            out = torch.where(off.to(x.device).view(-1, *([1] * (out.dim() - 1))), bare, out)
        return out

    def extra_repr(self) -> str:
        live = "" if self.mask is None else f", live={int(self.mask.sum())}/{self.mask.numel()}"
        return f"role={self.role}, frozen={tuple(self.frozen.shape)}, learn={tuple(self.learn.shape)}, dim={self.dim}{live}"


def _join_hook(module: SplitWeight, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    frozen, learn = state_dict.pop(prefix + "frozen"), state_dict.pop(prefix + "learn")
    if module.mask is not None:
        learn = learn * module.mask.to(learn.device, learn.dtype)
    state_dict[prefix + "weight"] = torch.cat([frozen.to(learn.dtype), learn], dim=module.dim)


def _split_hook(module: SplitWeight, state_dict: dict, prefix: str, local_metadata: Any, strict: bool,
                missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    key = prefix + "weight"
    if key not in state_dict:
        return
    w = state_dict.pop(key)
    want = module.weight.shape
    if w.shape != want:
        error_msgs.append(f"{key}: shape {tuple(w.shape)} in the file, {tuple(want)} in the model (another rank?)")
        return
    frozen, learn = w.split([module.split_at, w.shape[module.dim] - module.split_at], dim=module.dim)
    if not torch.equal(frozen.to(module.frozen.dtype), module.frozen):
        error_msgs.append(f"{key}: its frozen half differs from this layer's basis (another basis seed or rank)")
        return
    if module.mask is not None and not torch.equal(learn * module.mask.to(learn.dtype), learn):
        error_msgs.append(f"{key}: its learnable half uses rank components this layer holds at zero (trained "
                          f"with disjoint=false?)")
        return
    state_dict[prefix + "frozen"] = module.frozen.clone()
    state_dict[prefix + "learn"] = learn
