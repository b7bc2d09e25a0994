"""The partly learnable projection: a LoRA matrix whose frozen half is a buffer and whose other half learns.

:class:`SplitWeight` takes the place of a PEFT LoRA layer's ``lora_A`` (down) or ``lora_B`` (up)
module. Its ``weight`` is ``cat([frozen, learn], dim)``; only ``learn`` is a Parameter, so no
optimizer, weight decay or gradient clipping can reach the frozen half. Its state dict holds the
plain ``weight`` (hooks join and split it), so files, checkpoints, PEFT's merge and vanilla
diffusers see an ordinary LoRA.

Gradient routing: ``grad_rows`` (a bool per batch row, or None) lets one forward pass carry
samples that train this half and samples that must not (the content images train D but not B;
the auxiliary style sets train B but not D). Rows outside the mask see the same values with
the learnable half detached. The reference code's two optimizers each zero only their own
parameters, so there both losses reach both halves; routing keeps them apart in one pass.
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
                 conv: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.role = role  # "up" (the learnable half is B) or "down" (D)
        self.conv = conv  # stride/padding/dilation of a convolution, None for a Linear
        self.register_buffer("frozen", frozen.detach().clone())
        self.learn = nn.Parameter(learn.detach().clone())
        self.grad_rows: torch.Tensor | None = None
        self.register_state_dict_post_hook(_join_hook)
        self.register_load_state_dict_pre_hook(_split_hook)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.frozen.to(self.learn.dtype), self.learn], dim=self.dim)

    @property
    def split_at(self) -> int:
        return self.frozen.shape[self.dim]

    def _apply_weight(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.linear(x, w)
        return F.conv2d(x, w, None, **self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = self.grad_rows
        if rows is None or not torch.is_grad_enabled():
            return self._apply_weight(x, w)
        if rows.shape[0] != x.shape[0]:
            raise StudioError(f"b4m: gradient routing for {rows.shape[0]} rows, but the batch has {x.shape[0]}")
        live = self._apply_weight(x, w)
        dead = self._apply_weight(x, torch.cat([self.frozen.to(self.learn.dtype), self.learn.detach()], dim=self.dim))
        mask = rows.to(x.device).view(-1, *([1] * (live.dim() - 1)))
        return torch.where(mask, live, dead)

    def extra_repr(self) -> str:
        return f"role={self.role}, frozen={tuple(self.frozen.shape)}, learn={tuple(self.learn.shape)}, dim={self.dim}"


def _join_hook(module: SplitWeight, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    frozen, learn = state_dict.pop(prefix + "frozen"), state_dict.pop(prefix + "learn")
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
    state_dict[prefix + "frozen"] = module.frozen.clone()
    state_dict[prefix + "learn"] = learn
