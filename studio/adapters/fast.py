"""A lean forward for PEFT's plain LoRA Linear layers while one adapter trains.

PEFT's ``lora.Linear.forward`` handles every case (several adapters, variants, mixed batches,
dtype casts, dropout) through three module calls and a dozen checks per layer and call. On the
micro model that Python work is a measurable part of a training step (batch 4: 92 LoRA layers per
forward). While the trainer trains one vanilla LoRA adapter, the layer's output is just
``x W^T + b + s (x A^T) B^T``; :func:`speed_up` swaps such layers to a subclass that computes it
with three ``F.linear`` calls and hands every other case (adapters off, merged, variants such as
DoRA, lora_A/lora_B modules other than plain Linears, dropout, a dtype that PEFT would cast, extra arguments) back to PEFT's own forward.

Small layers take the adapter through the weight instead: ``x (W + s B A)^T + b``, two ops
(``addmm`` builds the r-rank update into a temporary copy of the weight, one ``linear`` applies
it) where the low-rank path runs five, and autograd's backward does four matrix products where the
low-rank one does six with their views. The weight path does more arithmetic (the gradient of the
whole ``d_out x d_in`` update), so it pays only on narrow inputs: layers of at most
:data:`MERGE_MAX_IN` input features, i.e. the micro model's (docs/training.md, "Session 13"). Both
paths compute the same function and gradients (to float rounding).

Parameters, names, state dicts and files are PEFT's: the subclass only overrides ``forward``,
and :func:`restore` swaps the layers back (the trainer does so before saving).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear


# Layers of at most this many input features train their LoRA through the weight (module docstring).
# One layer's forward and backward, rank 8, 1 thread, 64-4096 tokens (`bench/lora_paths.py`, docs/training.md):
# the weight path takes 0.49-0.93x the time at 64-128 inputs (any output width), 0.89-1.11x at 512,
# 1.00-1.70x at 320-1280 (SD's layers). Micro's layers have 32-128 inputs, SD's at least 320.
MERGE_MAX_IN = 128


class FastLoraLinear(LoraLinear):
    """PEFT's ``lora.Linear`` with a fast path for one active vanilla LoRA adapter."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.base_layer
        active = self.active_adapters
        if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1
                or type(base) is not torch.nn.Linear):
            return super().forward(x, *args, **kwargs)
        name = active[0]
        lora_a = self.lora_A[name] if name in self.lora_A else None
        if (lora_a is None or name in self.lora_variant or type(lora_a) is not torch.nn.Linear
                or type(self.lora_B[name]) is not torch.nn.Linear  # e.g. Break-for-Make's split halves
                or not isinstance(self.lora_dropout[name], torch.nn.Identity)
                or lora_a.weight.dtype != x.dtype or base.weight.dtype != x.dtype):
            return super().forward(x, *args, **kwargs)
        lora_b, scale = self.lora_B[name].weight, self.scaling[name]
        if base.in_features <= MERGE_MAX_IN:
            return F.linear(x, torch.addmm(base.weight, lora_b, lora_a.weight, alpha=scale), base.bias)
        out = F.linear(x, base.weight, base.bias)
        return out + F.linear(F.linear(x, lora_a.weight), lora_b) * scale


def _swap(model: torch.nn.Module, src: type, dst: type) -> int:
    """Give every module of exactly class ``src`` the class ``dst`` (same state); returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is src:
            module.__class__ = dst
            n += 1
    return n


def speed_up(model: torch.nn.Module) -> int:
    """Swap ``model``'s PEFT ``lora.Linear`` layers (exactly that class) to :class:`FastLoraLinear`.

    Returns how many layers were swapped. Layers of other classes (LoHa, LoKr, TLoRA, convs,
    subclasses of PEFT's) are left alone.
    """
    return _swap(model, LoraLinear, FastLoraLinear)


def restore(model: torch.nn.Module) -> int:
    """Undo :func:`speed_up`: the layers are PEFT's ``lora.Linear`` again. Returns how many."""
    return _swap(model, FastLoraLinear, LoraLinear)
