"""Pure-torch references of the low-bit kernels: the definitions every fast path is tested against.

Conventions (shared by every backend):

* activations: unsigned codes ``xq`` (uint8, values 0..2**bits-1), one scale and integer zero
  point per tensor: ``x = x_scale * (xq - x_zero)``.
* weights: :class:`~studio.kernels.weights.IntWeight`, signed int8 ``data`` with a per-output-channel
  scale and signed integer zero point: ``W = scale[o] * (data - zero[o])``.
* outputs: float32, ``y = x . W + bias``, the integer sums exact (float64 here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from studio.kernels.weights import IntWeight


def quantize_act(x: torch.Tensor, scale: torch.Tensor | float, zero: int, bits: int) -> torch.Tensor:
    """clip(round(x / scale) + zero, 0, 2**bits - 1) as uint8 (same layout as ``x``)."""
    qmax = (1 << bits) - 1
    return torch.clamp(torch.round(x / scale) + zero, 0, qmax).to(torch.uint8)


def qlinear(xq: torch.Tensor, x_scale: float, x_zero: int, w: IntWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x_scale * (xq - x_zero) @ W^T + bias, exactly (float64 sums), float32 out."""
    x = (xq.double() - x_zero) * x_scale
    wd = w.dequantize(torch.float64)
    y = F.linear(x, wd, None if bias is None else bias.double())
    return y.float()


def qconv2d(xq: torch.Tensor, x_scale: float, x_zero: int, w: IntWeight, bias: torch.Tensor | None,
            stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int) -> torch.Tensor:
    """conv2d of the dequantized codes with the dequantized weight (zero padding is a real 0), float32 out."""
    x = (xq.double() - x_zero) * x_scale
    wd = w.dequantize(torch.float64)
    y = F.conv2d(x, wd, None if bias is None else bias.double(), stride, padding, dilation, groups)
    return y.float()


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes (any shape, values 0..15) -> uint8, two per byte (low nibble first), flattened."""
    flat = codes.reshape(-1).to(torch.uint8)
    if bool((flat > 15).any()):
        raise ValueError("pack_int4: codes must lie in 0..15")
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: the first ``numel`` codes as uint8 (flat)."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(-1)[:numel]


def norm_act_quant(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float, scale: torch.Tensor | float, zero: int, bits: int,
                   add: torch.Tensor | None = None) -> torch.Tensor:
    """Codes of ``silu(group_norm(x + add))``: what a ResNet block feeds its convs, as unfused torch ops."""
    h = x if add is None else x + add
    h = F.silu(F.group_norm(h, groups, weight, bias, eps))
    return quantize_act(h, scale, zero, bits)


def geglu_quant(h: torch.Tensor, scale: torch.Tensor | float, zero: int, bits: int) -> torch.Tensor:
    """Codes of GEGLU's output ``a * gelu(gate)`` with ``a, gate = h.chunk(2, -1)`` (exact erf GELU)."""
    a, gate = h.chunk(2, dim=-1)
    return quantize_act(a * F.gelu(gate), scale, zero, bits)


def heads_quant(o: torch.Tensor, scale: torch.Tensor | float, zero: int, bits: int) -> torch.Tensor:
    """Codes of an attention output (B, heads, L, d) with the heads merged: (B, L, heads * d), contiguous."""
    b, h, n, d = o.shape
    return quantize_act(o.transpose(1, 2).reshape(b, n, h * d), scale, zero, bits)
