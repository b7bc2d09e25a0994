"""Fused forwards for the blocks of a deployed integer denoiser: the activation is quantized by the op
that produces it, and the integer layers exchange codes instead of float tensors where they can.

The plain integer model (:class:`~studio.quant.runtime.IntQuantLayer` in place of each Linear/Conv2d,
diffusers' block forwards unchanged) is the reference: every fused forward here computes the same
function from the same activation parameters, and ``tests/test_quant.py`` compares them. What changes
is the number of passes over the activations (docs/BENCHMARKS.md has the profile):

* ResNet block: ``group_norm -> silu -> quantize -> conv`` twice. :func:`studio.kernels.norm_act_quant`
  runs torch's NCHW group norm, then the SiLU, the rounding and the channels-last layout of the codes
  in one compiled pass (unfused: a SiLU pass, then the quantization pass). Measured on the micro UNet:
  keeping the conv outputs channels-last and fusing the group norm too (Inductor) was slower, as
  torch's group norm is 2 to 4 times slower on channels-last tensors and Inductor's norm with dynamic
  shapes is slower still; the conv outputs therefore go back to the input's layout, as in the plain model.
* Attention: the query, key and value projections read one input with three activation quantizers:
  one compiled pass writes the three code tensors (:func:`studio.kernels.multi_quant`); the heads of
  the attention output are merged and quantized for the output projection in one pass
  (:func:`studio.kernels.heads_quant`) instead of a transposing float copy and a quantization pass.
* Feed-forward (GEGLU): ``proj -> chunk -> gelu -> mul -> quantize -> linear``; fused, one compiled call
  (:func:`studio.kernels.geglu_quant`) reads the projection once and writes the output layer's codes.

``fuse(unet)`` installs the fused forwards on the blocks that qualify (eval mode, SiLU, GroupNorm, no
resampling inside the block, the default time-embedding norm); ``unfuse(unet)`` puts diffusers'
forwards back. ``STUDIO_FUSED=0`` at load time keeps the plain model.
"""

from __future__ import annotations

import logging
import os
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from studio import kernels
from studio.quant.runtime import IntQuantLayer

log = logging.getLogger(__name__)

_MARK = "_studio_fused"


def _resnet_qualifies(block: nn.Module) -> bool:
    from diffusers.models.resnet import ResnetBlock2D

    return (isinstance(block, ResnetBlock2D) and isinstance(block.conv1, IntQuantLayer)
            and isinstance(block.conv2, IntQuantLayer) and isinstance(block.norm1, nn.GroupNorm)
            and isinstance(block.norm2, nn.GroupNorm) and isinstance(block.nonlinearity, nn.SiLU)
            and block.upsample is None and block.downsample is None
            and block.time_embedding_norm == "default" and block.conv1.groups == 1 and block.conv2.groups == 1)


def _norm_args(norm: nn.GroupNorm) -> tuple[int, torch.Tensor | None, torch.Tensor | None, float]:
    return norm.num_groups, norm.weight, norm.bias, norm.eps


def fused_resnet_forward(self: nn.Module, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args: Any,
                         **kwargs: Any) -> torch.Tensor:
    """diffusers' ``ResnetBlock2D.forward`` (default time-embedding norm, no resampling), with each
    ``norm -> silu -> quantize`` fused and the convs fed codes; falls back to the plain forward in training."""
    if self.training or input_tensor.dim() != 4:
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    c1, c2 = self.conv1, self.conv2
    s1, z1, f1 = c1.act_params()
    layout = c1.out_layout(input_tensor)
    xq, sums = kernels.norm_act_quant(input_tensor, *_norm_args(self.norm1), s1, z1, c1.abits,
                                      sums=c1.wants_sums())
    h = c1.run_codes(xq, f1, z1, sums, layout)
    t = None
    if self.time_emb_proj is not None and temb is not None:
        t = self.time_emb_proj(temb if self.skip_time_act else self.nonlinearity(temb))[:, :, None, None]
    s2, z2, f2 = c2.act_params()
    hq, sums = kernels.norm_act_quant(h, *_norm_args(self.norm2), s2, z2, c2.abits, add=t, sums=c2.wants_sums())
    h = c2.run_codes(hq, f2, z2, sums, layout)  # dropout: identity in eval
    skip = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
    out = skip + h
    if self.output_scale_factor != 1.0:
        out.div_(self.output_scale_factor)
    return out


def _ff_qualifies(block: nn.Module) -> bool:
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention import FeedForward

    if not isinstance(block, FeedForward) or len(block.net) < 3:
        return False
    act, out = block.net[0], block.net[2]
    return (type(act) is GEGLU and isinstance(act.proj, IntQuantLayer) and isinstance(out, IntQuantLayer)
            and all(isinstance(m, nn.Dropout) for i, m in enumerate(block.net) if i not in (0, 2)))


def fused_ff_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """diffusers' ``FeedForward.forward`` with a GEGLU gate: the gate, the product and the output layer's
    quantization in one op; dropouts are identities in eval (falls back to the plain forward in training)."""
    if self.training:
        return type(self).forward(self, hidden_states, *args, **kwargs)
    h = self.net[0].proj(hidden_states)
    out = self.net[2]
    s, z, f = out.act_params()
    q, sums = kernels.geglu_quant(h, s, z, out.abits, sums=out.wants_sums())
    y = out.run_codes(q, f, z, sums)
    return y if y.dtype == hidden_states.dtype else y.to(hidden_states.dtype)


class IntAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` for an attention whose projections are integer layers with symmetric
    weights (see the module docstring); anything else (masks, 4-d inputs, norms inside the attention, a
    layer that needs zero-point sums) goes to the processor it replaced."""

    def __init__(self, plain: Any) -> None:
        self.plain = plain

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        if attention_mask is not None or hidden_states.dim() != 3 or attn.training or args or kwargs:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        q_l, k_l, v_l, o_l = attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]
        (sq, zq, fq), (sk, zk, fk), (sv, zv, fv) = q_l.act_params(), k_l.act_params(), v_l.act_params()
        bits = q_l.abits
        if encoder_hidden_states is None:
            cq, ck, cv = kernels.multi_quant(hidden_states, [sq, sk, sv], [zq, zk, zv], bits)
        else:
            (cq,) = kernels.multi_quant(hidden_states, [sq], [zq], bits)
            ck, cv = kernels.multi_quant(encoder_hidden_states, [sk, sv], [zk, zv], bits)
        query, key, value = q_l.run_codes(cq, fq, zq), k_l.run_codes(ck, fk, zk), v_l.run_codes(cv, fv, zv)
        b = hidden_states.shape[0]
        d = key.shape[-1] // attn.heads
        query, key, value = (t.view(b, -1, attn.heads, d).transpose(1, 2) for t in (query, key, value))
        o = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        so, zo, fo = o_l.act_params()
        y = attn.to_out[1](o_l.run_codes(kernels.heads_quant(o, so, zo, o_l.abits), fo, zo))
        if attn.residual_connection:
            y = y + hidden_states
        if attn.rescale_output_factor != 1.0:
            y = y / attn.rescale_output_factor
        return y


def _attn_qualifies(attn: nn.Module) -> bool:
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    if not isinstance(attn, Attention) or type(attn.processor) is not AttnProcessor2_0:
        return False
    layers = (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0])
    return (all(isinstance(m, IntQuantLayer) and m.kind == "linear" and not m.wants_sums() for m in layers)
            and len({m.abits for m in layers}) == 1 and len(attn.to_out) == 2
            and attn.spatial_norm is None and attn.group_norm is None and attn.norm_q is None
            and attn.norm_k is None and not attn.norm_cross and getattr(attn, "add_k_proj", None) is None)


def _group_norm_forward(self: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """``nn.GroupNorm.forward`` that keeps an NHWC input NHWC and fast (:func:`studio.kernels.cpu.group_norm`)."""
    from studio.kernels import cpu

    if x.device.type != "cpu":
        return nn.GroupNorm.forward(self, x)
    return cpu.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def fast_group_norms(model: nn.Module) -> int:
    """Give every ``nn.GroupNorm`` of ``model`` the forward that keeps NHWC inputs NHWC and fast (also for a
    float model run channels-last: the benchmark's strongest float baseline); the number of norms."""
    n = 0
    for module in model.modules():
        if type(module) is nn.GroupNorm:
            if not getattr(module, _MARK, False):
                module.forward = types.MethodType(_group_norm_forward, module)
                setattr(module, _MARK, True)
            n += 1
    return n


def fuse(unet: nn.Module) -> int:
    """Install the fused forwards on the qualifying blocks of an integer denoiser and run it channels-last
    throughout (every integer conv but the model's output conv answers NHWC, group norms keep NHWC); the
    number of fused blocks."""
    last = getattr(unet, "conv_out", None)
    for module in unet.modules():
        if isinstance(module, IntQuantLayer) and module.kind == "conv":
            module.channels_last_out = module is not last  # the model's output keeps the sample's layout
    fast_group_norms(unet)
    n = 0
    for module in unet.modules():
        if isinstance(module, nn.GroupNorm):
            continue
        if getattr(module, _MARK, False):
            n += 1
            continue
        if _attn_qualifies(module):
            module._studio_plain_processor = module.processor
            module.processor = IntAttnProcessor(module.processor)
            setattr(module, _MARK, True)
            n += 1
            continue
        for qualifies, forward in ((_resnet_qualifies, fused_resnet_forward), (_ff_qualifies, fused_ff_forward)):
            if qualifies(module):
                module.forward = types.MethodType(forward, module)
                setattr(module, _MARK, True)
                n += 1
                break
    log.debug("fused %d blocks", n)
    return n


def unfuse(unet: nn.Module) -> None:
    """Back to diffusers' forwards (the reference the fused ones are tested against)."""
    for module in unet.modules():
        if isinstance(module, IntQuantLayer):
            module.channels_last_out = None
        if getattr(module, _MARK, False):
            if isinstance(getattr(module, "processor", None), IntAttnProcessor):
                module.processor = module._studio_plain_processor
            else:
                del module.forward
            setattr(module, _MARK, False)


def fusion_enabled() -> bool:
    """``STUDIO_FUSED=0`` turns the fused forwards off at load time."""
    return os.environ.get("STUDIO_FUSED", "1") != "0"
