"""Frozen layers that keep less for the backward pass while an adapter trains.

Autograd keeps what each op's backward formula may need, whatever actually requires a gradient:
a convolution keeps its input even when its weight is frozen, although the input's gradient needs
only the weight; diffusers' GEGLU (``h * gelu(g)``) keeps ``gelu(g)`` beside the projection both
halves come from. While the denoiser is frozen and only adapters train, neither is needed:

- a frozen ``Conv2d`` computes the input's gradient from the weight and the input's shape alone
  (:class:`_FrozenConv2d`, the same kernel autograd calls);
- GEGLU keeps only its projection and recomputes the cheap ``gelu`` in the backward pass.

On SD 1.5 at 512 px (one sample, LoRA on attention, no checkpointing) the tensors kept for the
backward pass fall from 1521 to 1119 MiB (docs/realsize.md); no matmul or convolution runs again.
:func:`keep_less` swaps the forwards of such layers in place (instance attributes) and :func:`restore`
takes them back; both leave parameters, names and state dicts alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

_MARK = "_studio_keeps_less"


class _FrozenConv2d(torch.autograd.Function):
    """``conv2d`` whose backward gives the input's gradient only, keeping the weight but not the input."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Any,
                padding: Any, dilation: Any, groups: int) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.conf = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conf
        grad_in = torch.nn.grad.conv2d_input(shape, weight, grad, stride, padding, dilation, groups)
        return grad_in, None, None, None, None, None, None


def _conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if (self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad) or self.padding_mode != "zeros"
            or not torch.is_grad_enabled() or not x.requires_grad or isinstance(self.padding, str)):
        return nn.Conv2d.forward(self, x)
    return _FrozenConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _GegluProduct(torch.autograd.Function):
    """``h * gelu(g)`` for ``(h, g) = p.chunk(2, -1)``, keeping only ``p``."""

    @staticmethod
    def forward(ctx: Any, p: torch.Tensor, approximate: str) -> torch.Tensor:
        h, g = p.chunk(2, dim=-1)
        ctx.save_for_backward(p)
        ctx.approximate = approximate
        return h * F.gelu(g, approximate=approximate)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (p,) = ctx.saved_tensors
        h, g = p.chunk(2, dim=-1)
        with torch.enable_grad():
            g = g.detach().requires_grad_()
            a = F.gelu(g, approximate=ctx.approximate)
            (grad_g,) = torch.autograd.grad(a, g, grad * h)
        return torch.cat([grad * a.detach(), grad_g], dim=-1), None


def _geglu_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    p = self.proj(hidden_states)
    if not torch.is_grad_enabled() or not p.requires_grad or p.device.type not in ("cpu", "cuda"):
        # diffusers' own path (on an NPU it uses a fused kernel of its own)
        h, g = p.chunk(2, dim=-1)
        return h * self.gelu(g)
    return _GegluProduct.apply(p, getattr(self, "approximate", "none"))


def _geglu_class() -> type | None:
    try:
        from diffusers.models.activations import GEGLU
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return None
    return GEGLU


def keep_less(model: nn.Module) -> int:
    """Swap the forwards of ``model``'s frozen convolutions and GEGLU layers (see the module doc); returns
    how many layers were swapped. Layers whose parameters train keep autograd's own path at each call."""
    geglu = _geglu_class()
    n = 0
    for m in model.modules():
        if getattr(m, _MARK, False):
            continue
        if type(m) is nn.Conv2d:
            m.forward = _conv_forward.__get__(m)
        elif geglu is not None and type(m) is geglu:
            m.forward = _geglu_forward.__get__(m)
        else:
            continue
        setattr(m, _MARK, True)
        n += 1
    return n


def restore(model: nn.Module) -> None:
    """Undo :func:`keep_less`."""
    for m in model.modules():
        if getattr(m, _MARK, False):
            del m.forward
            delattr(m, _MARK)
