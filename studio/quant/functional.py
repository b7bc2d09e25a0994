"""The math of EfficientDM's quantizers as pure functions (the modules call them; export reuses them).

The quantizer is asymmetric uniform (He et al. 2024, eq. 1)::

    Q(x; s, z) = s * (clip(round(x / s) + z, 0, 2**b - 1) - z)

with a straight-through round and LSQ gradients (Esser et al. 2020; LSQ+ for the zero point):

    dQ/dx = 1 inside the range, 0 outside
    dQ/ds = round(x/s) - x/s inside, -z below, (2**b - 1) - z above   (times the LSQ gradient scale)
    dQ/dz = 0 inside, -s outside

``fake_quant`` computes exactly that with autograd; ``tests/test_quant.py`` checks it against the
closed forms above. Initialisation: per-channel min/max for weights (``minmax_params``), a search
over clipping ratios under an Lp error for activations (``lp_search``).
"""

from __future__ import annotations

import math

import torch

# Lp norm of the clipping search: 2.4 is the norm Q-Diffusion / EfficientDM's code use for
# activations (it weighs large errors a little more than MSE without chasing outliers)
DEFAULT_P = 2.4


def qmax(bits: int) -> int:
    """The largest integer code of a ``bits``-bit unsigned quantizer."""
    return (1 << bits) - 1


class _RoundSTE(torch.autograd.Function):
    # a Function rather than (x.round() - x).detach() + x: the forward is round(x) bit for bit,
    # so fake quantization and the integer kernels see the same codes
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.round(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return g


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: D102
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return g * ctx.scale, None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return _RoundSTE.apply(x)


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` forward (exactly), gradient times ``scale`` backward (LSQ's step-size gradient scaling)."""
    if scale == 1.0 or not x.requires_grad:
        return x
    return _GradScale.apply(x, scale)


def lsq_grad_scale(numel: int, bits: int) -> float:
    """LSQ's gradient scale 1/sqrt(N * Qp) for a step size shared by ``numel`` values."""
    return 1.0 / math.sqrt(max(1, numel) * qmax(bits))


def fake_quant_ste(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   g: float = 1.0) -> torch.Tensor:
    """Q(x; s, z) composed from STE primitives, autograd deriving the gradients (the readable reference)."""
    s = grad_scale(scale, g)
    z = round_ste(grad_scale(zero, g))
    codes = torch.clamp(round_ste(x / s) + z, 0, qmax(bits))
    return (codes - z) * s


class _FakeQuant(torch.autograd.Function):
    """Q(x; s, z) in one node: the forward of :func:`fake_quant_ste` bit for bit, the closed-form
    LSQ gradients in the backward. It keeps only ``x`` for the backward (the composed version keeps
    an intermediate per primitive), which matters for the memory and time of distillation."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,  # noqa: D102
                g: float) -> torch.Tensor:
        z = torch.round(zero)
        y = x / scale
        y.round_().add_(z).clamp_(0, qmax(bits)).sub_(z).mul_(scale)
        ctx.save_for_backward(x, scale, z)
        ctx.bits, ctx.g = bits, g
        ctx.shapes = (scale.shape, zero.shape)
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):  # noqa: D102
        x, scale, z = ctx.saved_tensors
        q = qmax(ctx.bits)
        u = x / scale
        c = torch.round(u) + z
        below, above = c < 0, c > q
        outside = below | above
        gx = gy.masked_fill(outside, 0) if ctx.needs_input_grad[0] else None
        gs = gz = None
        if ctx.needs_input_grad[1]:
            # inside: round(u) - u = c - z - u; below: -z; above: qmax - z
            ds = torch.where(below, -z, torch.where(above, q - z, c - z - u))
            gs = (gy * ds).sum_to_size(ctx.shapes[0]) * ctx.g
        if ctx.needs_input_grad[2]:
            gz = (gy.masked_fill(~outside, 0) * -scale).sum_to_size(ctx.shapes[1]) * ctx.g
        return gx, gs, gz, None, None


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, g: float = 1.0) -> torch.Tensor:
    """Q(x; s, z) with STE round and LSQ/LSQ+ gradients to ``scale`` and ``zero`` (both broadcast to ``x``).

    ``zero`` is kept real-valued for training and rounded here (straight-through), so the forward
    always uses an integer zero point, as the integer kernels do. ``g`` scales the gradients of
    ``scale`` and ``zero`` (LSQ); 1 gives the plain derivatives.
    """
    return _FakeQuant.apply(x, scale, zero, bits, g)


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer codes clip(round(x/s) + z, 0, 2**b - 1) (float dtype; exact integers)."""
    return torch.clamp(torch.round(x / scale) + torch.round(zero), 0, qmax(bits))


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """s * (codes - z)."""
    return (codes.to(scale.dtype) - torch.round(zero)) * scale


def params_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, eps: float = 1e-8) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """(scale, zero) of an asymmetric quantizer covering [lo, hi] (the range is widened to hold 0).

    Zero must be exactly representable (zero padding, ReLU/SiLU floors), so the range always
    includes it; the zero point is rounded so that the grid holds 0.
    """
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    scale = ((hi - lo) / qmax(bits)).clamp_min(eps)
    zero = torch.round(-lo / scale).clamp(0, qmax(bits))
    return scale, zero


def symmetric_params_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int,
                                eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of the quantizer with the zero point fixed at the middle code ``2**(b-1)`` that covers
    [lo, hi]: the same formula Q(x; s, z), codes ``- 2**(b-1) .. 2**(b-1) - 1`` once the zero is taken
    off, so a signed integer kernel runs the weight with no zero-point correction."""
    half = 1 << (bits - 1)
    scale = torch.maximum(-torch.minimum(lo, torch.zeros_like(lo)) / half,
                          torch.maximum(hi, torch.zeros_like(hi)) / (half - 1)).clamp_min(eps)
    return scale, torch.full_like(scale, float(half))


def _range_params(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor,
                                                                                          torch.Tensor]:
    return symmetric_params_from_range(lo, hi, bits) if symmetric else params_from_range(lo, hi, bits)


def minmax_params(w: torch.Tensor, bits: int, channel_dim: int | None = 0, *,
                  symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max quantizer parameters, per channel along ``channel_dim`` (None: one for the tensor);
    ``symmetric``: the zero point fixed at ``2**(b-1)`` (:func:`symmetric_params_from_range`).

    Returned with the broadcast shape of ``w`` (e.g. (O, 1, 1, 1) for a conv weight).
    """
    if channel_dim is None:
        return _range_params(w.detach().min().reshape(()), w.detach().max().reshape(()), bits, symmetric)
    dims = [d for d in range(w.dim()) if d != channel_dim]
    lo = w.detach().amin(dim=dims, keepdim=True)
    hi = w.detach().amax(dim=dims, keepdim=True)
    return _range_params(lo, hi, bits, symmetric)


def lp_error(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, p: float = DEFAULT_P,
             channel_dim: int | None = None) -> torch.Tensor:
    """Mean |x - Q(x)|^p, per channel along ``channel_dim`` (None: a scalar)."""
    err = (x - dequantize(quantize_codes(x, scale, zero, bits), scale, zero)).abs().pow(p)
    if channel_dim is None:
        return err.mean()
    dims = [d for d in range(x.dim()) if d != channel_dim]
    return err.mean(dim=dims, keepdim=True)


def clip_candidates(lo: torch.Tensor, hi: torch.Tensor, bits: int, ratios: torch.Tensor, *,
                    symmetric: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Quantizer parameters for the range [lo, hi] shrunk by each clipping ratio."""
    return [_range_params(lo * r, hi * r, bits, symmetric) for r in ratios.tolist()]


def default_ratios(n: int = 40, low: float = 0.3) -> torch.Tensor:
    """Clipping ratios from 1 down to ``low`` (``n`` of them), the grid of Q-Diffusion's search."""
    return torch.linspace(1.0, low, n)


def lp_search(x: torch.Tensor, bits: int, *, channel_dim: int | None = None, p: float = DEFAULT_P,
              ratios: torch.Tensor | None = None, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The (scale, zero) among clipped min/max ranges with the least Lp error on ``x``.

    Per channel along ``channel_dim`` (weights) or one pair for the tensor (activations); ``symmetric``:
    zero points fixed at ``2**(b-1)``.
    """
    x = x.detach().float()
    ratios = default_ratios() if ratios is None else ratios
    if channel_dim is None:
        lo, hi = x.min().reshape(()), x.max().reshape(())
    else:
        dims = [d for d in range(x.dim()) if d != channel_dim]
        lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    best_s = best_z = best_e = None
    for s, z in clip_candidates(lo, hi, bits, ratios, symmetric=symmetric):
        e = lp_error(x, s, z, bits, p, channel_dim)
        if best_e is None:
            best_s, best_z, best_e = s, z, e
        else:
            better = e < best_e
            best_s, best_z, best_e = torch.where(better, s, best_s), torch.where(better, z, best_z), torch.minimum(e,
                                                                                                               best_e)
    return best_s, best_z


# ----------------------------------------------------------------------------- QALoRA


def lora_delta(weight_shape: torch.Size | tuple[int, ...], down: torch.Tensor, up: torch.Tensor,
               scale: float = 1.0) -> torch.Tensor:
    """B A as a weight of ``weight_shape``: for a conv, A is (r, in, kh, kw) and B is (out, r, 1, 1)."""
    return (up.flatten(1) @ down.flatten(1)).reshape(weight_shape) * scale


def qalora_weight(w0: torch.Tensor, down: torch.Tensor | None, up: torch.Tensor | None, scale: torch.Tensor,
                  zero: torch.Tensor, bits: int, lora_scale: float = 1.0, g: float = 1.0) -> torch.Tensor:
    """Q_w(W0 + B A): the fake-quantized weight of a QALoRA layer."""
    w = w0 if down is None else w0 + lora_delta(w0.shape, down, up, lora_scale)
    return fake_quant(w, scale, zero, bits, g)


# ----------------------------------------------------------------------------- packing

from studio.kernels.reference import pack_int4, unpack_int4  # noqa: E402,F401 - one definition, in kernels
