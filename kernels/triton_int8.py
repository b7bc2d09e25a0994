"""Triton kernels for CUDA: u8 x s8 matmul with the zero-point bookkeeping fused into the epilogue.

``qlinear`` computes ``x_scale * scale[o] * sum_k (xq - x_zero)(q - zero[o]) + bias[o]`` in one
kernel; ``qconv2d`` lowers the convolution to that matmul with ``unfold`` (im2col), padding the
codes with the activation zero point (a real zero). Importing this module needs ``triton``;
the dispatcher only does so on CUDA, and tests marked ``gpu`` compare it with the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from studio.kernels.weights import IntWeight


@triton.jit
def _qmm_kernel(x_ptr, w_ptr, y_ptr, scale_ptr, zero_ptr, colsum_ptr, bias_ptr, M, N, K, x_zero, x_scale,
                stride_xm, stride_xk, stride_wk, stride_wn, stride_ym, stride_yn,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    rowsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        xm = (rm[:, None] < M) & (kk[None, :] < K)
        wm = (kk[:, None] < K) & (rn[None, :] < N)
        xu = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk, mask=xm, other=0).to(tl.int32)
        xs = tl.where(xm, xu - 128, 0).to(tl.int8)  # codes shifted into signed bytes
        rowsum += tl.sum(tl.where(xm, xu - x_zero, 0), axis=1)
        w = tl.load(w_ptr + kk[:, None] * stride_wk + rn[None, :] * stride_wn, mask=wm, other=0)
        acc += tl.dot(xs, w, out_dtype=tl.int32)
    zero = tl.load(zero_ptr + rn, mask=rn < N, other=0)
    colsum = tl.load(colsum_ptr + rn, mask=rn < N, other=0)
    # sum (x - xz)(q - z) = sum (x - 128) q + (128 - xz) colsum(q) - z rowsum(x - xz)
    acc = acc + (128 - x_zero) * colsum[None, :] - rowsum[:, None] * zero[None, :]
    scale = tl.load(scale_ptr + rn, mask=rn < N, other=0.0)
    y = acc.to(tl.float32) * (scale[None, :] * x_scale)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
    ym = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, y, mask=ym)


def _matmul(x2: torch.Tensor, x_scale: float, x_zero: int, w: IntWeight, bias: torch.Tensor | None) -> torch.Tensor:
    if "triton" not in w.cache:
        wt = w.data.reshape(w.out_features, -1)
        w.cache["triton"] = (wt.t().contiguous(), wt.sum(1, dtype=torch.int32))
    wt, colsum = w.cache["triton"]
    m, k = x2.shape
    n = w.out_features
    y = torch.empty(m, n, device=x2.device, dtype=torch.float32)
    grid = (triton.cdiv(m, 64), triton.cdiv(n, 64))
    _qmm_kernel[grid](x2, wt, y, w.scale, w.zero, colsum, bias if bias is not None else w.scale, m, n, k,
                      int(x_zero), float(x_scale), x2.stride(0), x2.stride(1), wt.stride(0), wt.stride(1),
                      y.stride(0), y.stride(1), HAS_BIAS=bias is not None, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
    return y


def qlinear(xq: torch.Tensor, x_scale: float, x_zero: int, w: IntWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """CUDA u8s8 linear, float32 out; the reference's semantics."""
    shape = xq.shape
    y = _matmul(xq.reshape(-1, shape[-1]).contiguous(), x_scale, x_zero, w, bias)
    return y.reshape(*shape[:-1], w.out_features)


def qconv2d(xq: torch.Tensor, x_scale: float, x_zero: int, w: IntWeight, bias: torch.Tensor | None,
            stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int) -> torch.Tensor:
    """CUDA u8s8 conv2d by im2col + the matmul kernel (groups 1), float32 out."""
    if groups != 1:
        raise NotImplementedError("triton qconv2d: grouped convolutions are not supported")
    b, c, h, wd = xq.shape
    kh, kw = w.data.shape[2:]
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    xp = F.pad(xq, (padding[1], padding[1], padding[0], padding[0]), value=int(x_zero))  # pad with a real zero
    cols = F.unfold(xp.float(), (kh, kw), dilation=dilation, stride=stride).to(torch.uint8)  # (B, C*kh*kw, L)
    cols = cols.transpose(1, 2).reshape(-1, c * kh * kw)
    y = _matmul(cols.contiguous(), x_scale, x_zero, w, bias)
    return y.reshape(b, ho, wo, w.out_features).permute(0, 3, 1, 2)
