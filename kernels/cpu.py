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
from typing import Any

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


def quantize_act_eager(x: torch.Tensor, scale: torch.Tensor | float, zero: int, bits: int) -> torch.Tensor:
    """The reference's codes, computed with fewer passes: float -> int8 is several times faster
    than float -> uint8 on CPUs, so the codes are shifted into int8 and the top bit flipped back."""
    qmax = (1 << bits) - 1
    t = torch.round(x / scale)
    t.add_(zero - 128).clamp_(-128, qmax - 128)
    return (t.to(torch.int8) ^ -128).view(torch.uint8)


def _codes_and_sums(x: torch.Tensor, scale: torch.Tensor, zero: int, qmax: int, channels_last: bool,
                    sums_dim: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    codes = torch.clamp(torch.round(x / scale) + zero, 0, qmax)
    sums = None if sums_dim is None else (codes - zero).sum(sums_dim, keepdim=True)  # exact: integers < 2^24
    q = codes.to(torch.uint8)
    if channels_last:
        q = q.contiguous(memory_format=torch.channels_last)
    return q, sums


@functools.lru_cache(maxsize=8)
def _compiled(channels_last: bool, sums_dim: int | None):
    # Inductor fuses the elementwise passes, the layout change oneDNN's conv wants and the channel sums
    # the zero-point correction needs into one compiled call: measured about 4x less time than the eager
    # passes on the micro UNet's activations; dynamic shapes, so every layer shares one compilation
    def fn(x: torch.Tensor, scale: torch.Tensor, zero: int, qmax: int):
        return _codes_and_sums(x, scale, zero, qmax, channels_last, sums_dim)

    return torch.compile(fn, dynamic=True, fullgraph=True)


_compile_state = {"failed": False}


def quantize_act_sums(x: torch.Tensor, scale: torch.Tensor | float, zero: int, bits: int, *,
                      channels_last: bool = False, sums_dim: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes (uint8, NHWC when ``channels_last``) and, with ``sums_dim``, the float sums of
    ``codes - zero`` over that dimension (keepdim), from one compiled call where torch.compile works
    here, eager passes otherwise. ``STUDIO_COMPILE=0`` keeps to eager (no compiler, or no time for the
    first compilation, about 10 s)."""
    import os

    channels_last = channels_last and x.dim() == 4
    if not (_compile_state["failed"] or os.environ.get("STUDIO_COMPILE", "1") == "0"
            or not isinstance(scale, torch.Tensor)):
        try:
            return _compiled(channels_last, sums_dim)(x, scale, zero, (1 << bits) - 1)
        except Exception as exc:  # noqa: BLE001 - no C++ compiler, an Inductor bug: eager is as exact
            _compile_state["failed"] = True
            import logging

            logging.getLogger(__name__).warning("compiled activation quantization unavailable (%s: %s); using "
                                                "eager", type(exc).__name__,
                                                str(exc).splitlines()[0][:200] if str(exc) else "")
    q = quantize_act_eager(x, scale, zero, bits)
    sums = None if sums_dim is None else q.sum(sums_dim, keepdim=True, dtype=torch.int32).float().sub_(
        q.shape[sums_dim] * zero)
    return (q.contiguous(memory_format=torch.channels_last) if channels_last else q), sums


def _silu_quant(h: torch.Tensor, scale: torch.Tensor, zero: int, qmax: int,
                sums: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    return _codes_and_sums(F.silu(h), scale, zero, qmax, True, 1 if sums else None)


def _affine_silu_quant(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, zero: int,
                       qmax: int, sums: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    return _codes_and_sums(F.silu(h * a + b), scale, zero, qmax, True, 1 if sums else None)


_silu_quant_compiled = None
_affine_silu_quant_compiled = None


def is_channels_last(x: torch.Tensor) -> bool:
    """A 4-d tensor laid out NHWC (and not also NCHW, as tensors with one channel or 1x1 maps are)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _sums_and_squares(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return v.sum(1), (v * v).sum(1)


_sums_and_squares_compiled = None


def _channel_sums(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums and sums of squares of ``v`` (N, L, C) over L: one compiled pass (about 2x faster than the two
    eager reductions and their temporary, measured), eager where the compiler is unavailable."""
    global _sums_and_squares_compiled
    import os

    if not (_compile_state["failed"] or os.environ.get("STUDIO_COMPILE", "1") == "0"):
        try:
            if _sums_and_squares_compiled is None:
                _sums_and_squares_compiled = torch.compile(_sums_and_squares, dynamic=True, fullgraph=True)
            return _sums_and_squares_compiled(v)
        except Exception as exc:  # noqa: BLE001 - as in quantize_act_sums
            _compile_state["failed"] = True
            import logging

            logging.getLogger(__name__).warning("compiled channel sums unavailable (%s); using eager",
                                                type(exc).__name__)
    return _sums_and_squares(v)


def group_norm_affine(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Group norm as a per-sample, per-channel affine map ``a * x + b`` ((N, C, 1, 1) each), its statistics
    read from an NHWC tensor without changing its layout (torch's own group norm is 2 to 4 times slower on
    channels-last tensors than on NCHW ones, measured on the micro UNet's activations)."""
    n, c = x.shape[:2]
    # per-channel sums over the positions, channels innermost: torch vectorises these reductions (measured:
    # 10 to 60 times faster than var_mean over the (positions, channels-in-group) dims of the same view)
    v = x.permute(0, 2, 3, 1).reshape(n, -1, c)
    count = v.shape[1] * (c // groups)
    s1, s2 = _channel_sums(v)
    mean = s1.view(n, groups, -1).sum(-1).div_(count)
    var = s2.view(n, groups, -1).sum(-1).div_(count).sub_(mean * mean).clamp_min_(0)
    rstd = (var + eps).rsqrt_()
    a = rstd.repeat_interleave(c // groups, dim=1)
    mean_c = mean.repeat_interleave(c // groups, dim=1)
    if weight is not None:
        a = a * weight
    b = -mean_c * a
    if bias is not None:
        b = b + bias
    return a.view(n, c, 1, 1), b.view(n, c, 1, 1)


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """``F.group_norm`` that keeps an NHWC input NHWC and fast (see :func:`group_norm_affine`)."""
    if not is_channels_last(x):
        return F.group_norm(x, groups, weight, bias, eps)
    a, b = group_norm_affine(x, groups, weight, bias, eps)
    return torch.addcmul(b, x, a)


def norm_act_quant(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float, scale: torch.Tensor, zero: int, bits: int, *, add: torch.Tensor | None = None,
                   sums: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes of ``silu(group_norm(x + add))`` (NHWC uint8) and, with ``sums``, their channel sums minus the
    zero point. NCHW input: torch's group norm, then the SiLU, the rounding and the layout change in one
    compiled pass. NHWC input (a conv's output in a channels-last model): the norm's statistics in one
    reduction, then the normalisation, the SiLU and the rounding in one compiled pass that keeps the layout
    (measured: torch's channels-last group norm and Inductor's group norm with dynamic shapes are both
    2 to 4 times slower). Eager where the compiler is unavailable (see :func:`quantize_act_sums`)."""
    global _silu_quant_compiled, _affine_silu_quant_compiled
    import os

    h = x if add is None else x + add
    qmax = (1 << bits) - 1
    cl = is_channels_last(h)
    if cl:
        a, b = group_norm_affine(h, groups, weight, bias, eps)
    else:
        h = F.group_norm(h.contiguous(), groups, weight, bias, eps)
    if not (_compile_state["failed"] or os.environ.get("STUDIO_COMPILE", "1") == "0"):
        try:
            if cl:
                if _affine_silu_quant_compiled is None:
                    _affine_silu_quant_compiled = torch.compile(_affine_silu_quant, dynamic=True, fullgraph=True)
                return _affine_silu_quant_compiled(h, a, b, scale, zero, qmax, sums)
            if _silu_quant_compiled is None:
                _silu_quant_compiled = torch.compile(_silu_quant, dynamic=True, fullgraph=True)
            return _silu_quant_compiled(h, scale, zero, qmax, sums)
        except Exception as exc:  # noqa: BLE001 - as in quantize_act_sums
            _compile_state["failed"] = True
            import logging

            logging.getLogger(__name__).warning("compiled activation quantization unavailable (%s); using eager",
                                                type(exc).__name__)
    if cl:
        h = torch.addcmul(b, h, a)
    return quantize_act_sums(F.silu(h), scale, zero, bits, channels_last=True, sums_dim=1 if sums else None)


def _geglu_quant(h: torch.Tensor, scale: torch.Tensor, zero: int, qmax: int,
                 sums: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    a, gate = h.chunk(2, dim=-1)
    return _codes_and_sums(a * F.gelu(gate), scale, zero, qmax, False, -1 if sums else None)


_geglu_quant_compiled = None


def geglu_quant(h: torch.Tensor, scale: torch.Tensor, zero: int, bits: int, *,
                sums: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes of GEGLU's ``a * gelu(gate)`` (and, with ``sums``, their row sums minus the zero point) from one
    compiled call that reads the projection once: the GELU, the product and the rounding fused."""
    global _geglu_quant_compiled
    import os

    if not (_compile_state["failed"] or os.environ.get("STUDIO_COMPILE", "1") == "0"):
        try:
            if _geglu_quant_compiled is None:
                _geglu_quant_compiled = torch.compile(_geglu_quant, dynamic=True, fullgraph=True)
            return _geglu_quant_compiled(h, scale, zero, (1 << bits) - 1, sums)
        except Exception as exc:  # noqa: BLE001 - as in quantize_act_sums
            _compile_state["failed"] = True
            import logging

            logging.getLogger(__name__).warning("compiled GEGLU quantization unavailable (%s); using eager",
                                                type(exc).__name__)
    a, gate = h.chunk(2, dim=-1)
    return quantize_act_sums(a * F.gelu(gate), scale, zero, bits, sums_dim=-1 if sums else None)


def _multi_quant(x: torch.Tensor, scales: list[torch.Tensor], zeros: list[int], qmax: int) -> list[torch.Tensor]:
    return [torch.clamp(torch.round(x / s) + z, 0, qmax).to(torch.uint8) for s, z in zip(scales, zeros)]


def _heads_quant(o: torch.Tensor, scale: torch.Tensor, zero: int, qmax: int) -> torch.Tensor:
    b, h, n, d = o.shape
    x = o.transpose(1, 2).reshape(b, n, h * d)
    return torch.clamp(torch.round(x / scale) + zero, 0, qmax).to(torch.uint8)


_multi_quant_compiled = None
_heads_quant_compiled = None


def _compile_or_none(name: str, fn: Any) -> Any:
    import os

    if _compile_state["failed"] or os.environ.get("STUDIO_COMPILE", "1") == "0":
        return None
    cached = globals().get(name)
    if cached is None:
        cached = torch.compile(fn, dynamic=True, fullgraph=True)
        globals()[name] = cached
    return cached


def _compile_failed(what: str, exc: Exception) -> None:
    import logging

    _compile_state["failed"] = True
    logging.getLogger(__name__).warning("compiled %s unavailable (%s); using eager", what, type(exc).__name__)


def multi_quant(x: torch.Tensor, scales: list[torch.Tensor], zeros: list[int], bits: int) -> list[torch.Tensor]:
    """Codes of one tensor under several (scale, zero) pairs (the query/key/value projections of an attention
    read the same input, each with its own activation quantizer) from one compiled pass over ``x``."""
    fn = _compile_or_none("_multi_quant_compiled", _multi_quant)
    if fn is not None:
        try:
            return fn(x, list(scales), list(zeros), (1 << bits) - 1)
        except Exception as exc:  # noqa: BLE001 - as in quantize_act_sums
            _compile_failed("multi-scale quantization", exc)
    return [quantize_act_eager(x, s, z, bits) for s, z in zip(scales, zeros)]


def heads_quant(o: torch.Tensor, scale: torch.Tensor, zero: int, bits: int) -> torch.Tensor:
    """Codes of an attention output (B, heads, L, d) with the heads merged, (B, L, heads * d) contiguous: the
    merge (a transposing copy of the float output) and the quantization in one compiled pass."""
    fn = _compile_or_none("_heads_quant_compiled", _heads_quant)
    if fn is not None:
        try:
            return fn(o, scale, zero, (1 << bits) - 1)
        except Exception as exc:  # noqa: BLE001 - as in quantize_act_sums
            _compile_failed("attention-output quantization", exc)
    b, h, n, d = o.shape
    return quantize_act_eager(o.transpose(1, 2).reshape(b, n, h * d), scale, zero, bits)


def quantize_act(x: torch.Tensor, scale: torch.Tensor | float, zero: int, bits: int,
                 channels_last: bool = False) -> torch.Tensor:
    """Activation codes (see :func:`quantize_act_sums`)."""
    return quantize_act_sums(x, scale, zero, bits, channels_last=channels_last)[0]


def _zeros(n: int, device: torch.device) -> torch.Tensor:
    key = (n, str(device))
    if key not in _NO_ZP:
        _NO_ZP[key] = torch.zeros(n, dtype=torch.int64, device=device)
    return _NO_ZP[key]


def _correction(w: IntWeight) -> torch.Tensor | None:
    """-(scale * zero) per output channel, None for symmetric weights (cached)."""
    if w.symmetric:
        return None
    if "zcorr" not in w.cache:
        w.cache["zcorr"] = -(w.scale * w.zero.float())
    return w.cache["zcorr"]


def onednn_qlinear(xq: torch.Tensor, x_scale: float, x_zero: int, w: IntWeight, bias: torch.Tensor | None,
                   act_sums: torch.Tensor | None = None) -> torch.Tensor:
    """oneDNN u8s8 linear with float32 output; ``xq`` (..., K); ``act_sums``: sum of (xq - x_zero) over K."""
    if "onednn_linear" not in w.cache:
        w.cache["onednn_linear"] = torch.ops.onednn.qlinear_prepack(w.data.contiguous(), None)
    shape = xq.shape
    x2 = xq.reshape(-1, shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = torch.ops.onednn.qlinear_pointwise(x2, float(x_scale), int(x_zero), w.cache["onednn_linear"], w.scale,
                                           _zeros(w.out_features, xq.device), bias, 1.0, 0, torch.float32,
                                           "none", [], "")
    corr = _correction(w)
    if corr is not None:
        # sum of (xq - x_zero) per row, read from the bytes (measured: cheaper than an extra GEMM row
        # of ones, whose strided slice costs more than it saves)
        if act_sums is None:
            rows = x2.sum(-1, dtype=torch.int32).float().sub_(shape[-1] * x_zero)
        else:
            rows = act_sums.reshape(-1)
        y.addr_(rows, corr, alpha=x_scale)
    return y.reshape(*shape[:-1], w.out_features)


def onednn_qconv2d(xq: torch.Tensor, x_scale: float, x_zero: int, w: IntWeight, bias: torch.Tensor | None,
                   stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                   groups: int, out_layout: torch.memory_format | None = None,
                   act_sums: torch.Tensor | None = None) -> torch.Tensor:
    """oneDNN u8s8 conv2d with float32 output, channels-last unless ``out_layout`` asks otherwise.

    ``act_sums``: (B, 1, H, W) sums of (xq - x_zero) over the channels, when the caller has them."""
    corr = _correction(w)
    if groups != 1 and corr is not None:
        raise NotImplementedError("grouped conv with asymmetric weights: no oneDNN path (the reference runs it)")
    key = ("onednn_conv", tuple(stride), tuple(padding), tuple(dilation), groups)
    if key not in w.cache:
        w.cache[key] = torch.ops.onednn.qconv_prepack(w.data.contiguous(), w.scale, 1.0, 0, list(stride),
                                                      list(padding), list(dilation), groups, None)
    y = torch.ops.onednn.qconv2d_pointwise(xq, float(x_scale), int(x_zero), w.cache[key], w.scale,
                                           _zeros(w.out_features, xq.device), bias, list(stride), list(padding),
                                           list(dilation), groups, 1.0, 0, torch.float32, "none", [], "")
    if out_layout is not None:
        y = y.contiguous(memory_format=out_layout)
    if corr is not None:
        patch = _patch_sums(xq, x_zero, w, stride, padding, dilation, act_sums)
        y.addcmul_(patch, corr.view(1, -1, 1, 1), value=x_scale)
    return y


def _patch_sums(xq: torch.Tensor, x_zero: int, w: IntWeight, stride, padding, dilation,
                act_sums: torch.Tensor | None) -> torch.Tensor:
    """Sum of (xq - x_zero) over each output position's receptive field, (B, 1, Ho, Wo)."""
    kh, kw = w.data.shape[2:]
    s = act_sums if act_sums is not None else \
        xq.sum(1, keepdim=True, dtype=torch.int32).float().sub_(xq.shape[1] * x_zero)
    if kh == kw == 1 and tuple(padding) == (0, 0):  # a 1x1 conv's field is one position
        return s[:, :, ::stride[0], ::stride[1]]
    key = ("ones", kh, kw)
    if key not in w.cache:
        w.cache[key] = torch.ones(1, 1, kh, kw, device=xq.device)
    # zero padding of the sums is right: a padded position is a real 0, i.e. code == x_zero
    return F.conv2d(s, w.cache[key], None, stride, padding, dilation)


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
