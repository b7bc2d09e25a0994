"""Fast CPU paths: oneDNN's quantized linear/conv (u8 x s8) and ``torch._int_mm`` (s8 x s8).

Both compute the reference's exact integer sums; what they add is bookkeeping for our
conventions:

* oneDNN takes the activation zero point but ignores weight zero points (measured: they are
  silently dropped), so an asymmetric weight ``W = s (q - z)`` runs as the symmetric
  ``s q`` plus a rank-1 correction ``- s z * sum over the receptive field of (xq - x_zero)``.
  The 4-bit export stores ``q - z`` directly (it fits int8), so only 8-bit weights pay for it.
* ``torch._int_mm`` multiplies signed bytes: codes are shifted by 128 (an XOR of the top bit)
  and the shift is corrected with the weight's column sums.

The prepacked oneDNN weight does not depend on the activation scale or zero point it was
packed with (measured), so one packing serves every denoising step.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from studio.kernels.weights import IntWeight

_NO_ZP: dict[tuple[int, str], torch.Tensor] = {}


@functools.lru_cache(maxsize=1)
def onednn_available() -> bool:
    """Whether oneDNN's quantized ops are in this torch build and run here."""
    try:
        ops = torch.ops.onednn
        _ = (ops.qlinear_prepack, ops.qlinear_pointwise, ops.qconv_prepack, ops.qconv2d_pointwise)
    except (AttributeError, RuntimeError):
        return False
    return bool(torch.backends.mkldnn.is_available())


def quantize_act(x: torch.Tensor, scale: torch.Tensor | float, zero: int, bits: int) -> torch.Tensor:
    """The reference's codes, computed with fewer passes: float -> int8 is several times faster
    than float -> uint8 on CPUs, so the codes are shifted into int8 and the top bit flipped back."""
    qmax = (1 << bits) - 1
    t = torch.round(x / scale)
    t.add_(zero - 128).clamp_(-128, qmax - 128)
    return (t.to(torch.int8) ^ -128).view(torch.uint8)


def _zeros(n: int, device: torch.device) -> torch.Tensor:
    key = (n, str(device))
    if key not in _NO_ZP:
        _NO_ZP[key] = torch.zeros(n, dtype=torch.int64, device=device)
    return _NO_ZP[key]


def _correction(w: IntWeight, x_scale: float) -> torch.Tensor | None:
    """-(scale * zero) per output channel (times x_scale at call time), None for symmetric weights."""
    if w.symmetric:
        return None
    if "zcorr" not in w.cache:
        w.cache["zcorr"] = -(w.scale * w.zero.float())
    return w.cache["zcorr"] * x_scale


def onednn_qlinear(xq: torch.Tensor, x_scale: float, x_zero: int, w: IntWeight,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN u8s8 linear with float32 output; ``xq`` (..., K)."""
    if "onednn_linear" not in w.cache:
        w.cache["onednn_linear"] = torch.ops.onednn.qlinear_prepack(w.data.contiguous(), None)
    shape = xq.shape
    x2 = xq.reshape(-1, shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = torch.ops.onednn.qlinear_pointwise(x2, float(x_scale), int(x_zero), w.cache["onednn_linear"], w.scale,
                                           _zeros(w.out_features, xq.device), bias, 1.0, 0, torch.float32,
                                           "none", [], "")
    corr = _correction(w, x_scale)
    if corr is not None:
        rows = x2.sum(-1, dtype=torch.int32).float() - shape[-1] * x_zero  # sum of (xq - x_zero) per row
        y.addr_(rows, corr)
    return y.reshape(*shape[:-1], w.out_features)


def onednn_qconv2d(xq: torch.Tensor, x_scale: float, x_zero: int, w: IntWeight, bias: torch.Tensor | None,
                   stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                   groups: int) -> torch.Tensor:
    """oneDNN u8s8 conv2d with float32 output (channels-last)."""
    key = ("onednn_conv", tuple(stride), tuple(padding), tuple(dilation), groups)
    if key not in w.cache:
        w.cache[key] = torch.ops.onednn.qconv_prepack(w.data.contiguous(), w.scale, 1.0, 0, list(stride),
                                                      list(padding), list(dilation), groups, None)
    y = torch.ops.onednn.qconv2d_pointwise(xq, float(x_scale), int(x_zero), w.cache[key], w.scale,
                                           _zeros(w.out_features, xq.device), bias, list(stride), list(padding),
                                           list(dilation), groups, 1.0, 0, torch.float32, "none", [], "")
    corr = _correction(w, x_scale)
    if corr is not None:
        y = y + corr.view(1, -1, 1, 1) * _patch_sums(xq, x_zero, w, stride, padding, dilation, groups)
    return y


def _patch_sums(xq: torch.Tensor, x_zero: int, w: IntWeight, stride, padding, dilation, groups: int) -> torch.Tensor:
    """Sum of (xq - x_zero) over each output position's receptive field, (B, 1 or O, Ho, Wo)."""
    kh, kw = w.data.shape[2:]
    c = xq.shape[1]
    if groups == 1:
        s = xq.sum(1, keepdim=True, dtype=torch.int32).float() - c * x_zero
        ones = torch.ones(1, 1, kh, kw, device=xq.device)
        return F.conv2d(s, ones, None, stride, padding, dilation)
    # grouped: one receptive-field sum per group, repeated for the group's output channels
    cg = c // groups
    s = (xq.float() - x_zero).reshape(xq.shape[0], groups, cg, *xq.shape[2:]).sum(2)
    ones = torch.ones(groups, 1, kh, kw, device=xq.device)
    sums = F.conv2d(s, ones, None, stride, padding, dilation, groups)
    return sums.repeat_interleave(w.out_features // groups, dim=1)


def intmm_qlinear(xq: torch.Tensor, x_scale: float, x_zero: int, w: IntWeight,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """``torch._int_mm`` s8s8 linear: sum (xq - xz)(q - z) = sum x'q + (128 - xz) colsum(q) - z rowsum(xq - xz)."""
    if "intmm" not in w.cache:
        wt = w.data.reshape(w.out_features, -1)
        w.cache["intmm"] = (wt.t().contiguous(), wt.sum(1, dtype=torch.int32))
    wt, colsum = w.cache["intmm"]
    shape = xq.shape
    x2 = xq.reshape(-1, shape[-1])
    xs = (x2 ^ 128).view(torch.int8)  # xq - 128 as signed bytes
    acc = torch._int_mm(xs.contiguous(), wt)
    acc = acc + (128 - x_zero) * colsum
    if not w.symmetric:
        rows = x2.sum(-1, dtype=torch.int32) - shape[-1] * x_zero
        acc = acc - rows[:, None] * w.zero[None, :]
    y = acc.float() * (w.scale * x_scale)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], w.out_features)
