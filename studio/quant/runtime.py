"""The deployed quantized layers: integer weights only, integer kernels, per-step activation parameters.

After EfficientDM training the LoRA branch is merged and only the integer weight is kept.
:class:`IntQuantLayer` holds it (int8, or int4 packed two per byte and unpacked on the fly),
its per-channel scale and zero point, the bias, and one activation (scale, zero) per denoising
step; its forward quantizes the input to uint8 codes and calls :mod:`studio.kernels`. It computes
the same function as the fake-quantized :class:`~studio.quant.layer.QuantLayer` it came from:
the same codes (same rounding), the same integer sums.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from studio import kernels
from studio.kernels import IntWeight
from studio.quant.layer import QuantLayer, StepClock


class IntQuantLayer(nn.Module):
    """An integer Linear or Conv2d with temporal activation parameters (see the module docstring).

    Storage (buffers, what export writes): W8 ``qweight`` int8 = codes - 128 with ``w_zero`` =
    zero point - 128; W4 ``qweight_packed`` uint8 (two unsigned codes per byte, low nibble first)
    with ``w_zero`` the unsigned zero point. Either way ``W = w_scale * (codes - zero point)``.
    """

    def __init__(self, spec: dict[str, Any], clock: StepClock, *, cache_unpacked: bool = False) -> None:
        super().__init__()
        self.kind = spec["kind"]
        self.wbits, self.abits = int(spec["wbits"]), int(spec["abits"])
        self.weight_shape = tuple(int(v) for v in spec["weight_shape"])
        self.stride = tuple(spec.get("stride", (1, 1)))
        self.padding = tuple(spec.get("padding", (0, 0)))
        self.dilation = tuple(spec.get("dilation", (1, 1)))
        self.groups = int(spec.get("groups", 1))
        self.clock = clock
        self.cache_unpacked = cache_unpacked
        out = self.weight_shape[0]
        numel = math.prod(self.weight_shape)
        if self.wbits == 8:
            self.register_buffer("qweight", torch.zeros(self.weight_shape, dtype=torch.int8))
        else:
            self.register_buffer("qweight_packed", torch.zeros((numel + 1) // 2, dtype=torch.uint8))
        self.register_buffer("w_scale", torch.ones(out))
        self.register_buffer("w_zero", torch.zeros(out, dtype=torch.int32))
        self.register_buffer("act_scale", torch.ones(clock.steps))
        self.register_buffer("act_zero", torch.zeros(clock.steps))
        if spec.get("bias", True):
            self.register_buffer("bias", torch.zeros(out))
        else:
            self.bias = None
        self._weight: IntWeight | None = None
        self._steps: list[tuple[torch.Tensor, int, float]] | None = None
        # a conv's output layout: True channels-last (what oneDNN writes), False NCHW, None its input's
        # layout (a copy back when the input was NCHW); studio.quant.fused sets it for a channels-last model
        self.channels_last_out: bool | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_quant_layer(cls, layer: QuantLayer, clock: StepClock, **kw: Any) -> IntQuantLayer:
        """The integer twin of a trained fake-quantized layer (LoRA merged, codes rounded once)."""
        b = layer.base_layer
        spec = layer_spec(layer)
        m = cls(spec, clock, **kw)
        with torch.no_grad():
            w = layer.merged_weight().detach().float()
            codes = layer.wq.codes(w).to(torch.int32).reshape(w.shape[0], -1)
            zero = torch.round(layer.wq.zero.detach()).reshape(-1).to(torch.int32)
            m.w_scale.copy_(layer.wq.scale.detach().reshape(-1).float())
            if m.wbits == 8:
                m.qweight.copy_((codes - 128).to(torch.int8).reshape(m.weight_shape))
                m.w_zero.copy_(zero - 128)
            else:
                m.qweight_packed.copy_(kernels.pack_int4(codes.to(torch.uint8)))
                m.w_zero.copy_(zero)
            m.act_scale.copy_(layer.aq.scale.detach().float())
            m.act_zero.copy_(torch.round(layer.aq.zero.detach().float()))
            if m.bias is not None:
                m.bias.copy_(b.bias.detach().float())
        return m.to(b.weight.device)

    def int_weight(self) -> IntWeight:
        """The weight as the kernels take it (W4: unpacked now, and cached only with ``cache_unpacked``)."""
        if self._weight is not None:
            return self._weight
        if self.wbits == 8:
            w = IntWeight(self.qweight, self.w_scale, self.w_zero)
            self._weight = w  # int8 is already the kernels' format: keep its prepacked copies
            return w
        codes = kernels.unpack_int4(self.qweight_packed, math.prod(self.weight_shape)).reshape(self.weight_shape[0], -1)
        # q - z of a 4-bit code fits int8 whole: a symmetric int8 weight, no zero-point correction
        data = (codes.to(torch.int16) - self.w_zero.view(-1, 1).to(torch.int16)).to(torch.int8)
        w = IntWeight(data.reshape(self.weight_shape), self.w_scale, torch.zeros_like(self.w_zero))
        if self.cache_unpacked:
            self._weight = w
        return w

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:  # .to(), .cuda(): caches follow the tensors
        self._weight = None
        self._steps = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._weight = None
        self._steps = None
        super()._load_from_state_dict(*args, **kwargs)

    # ------------------------------------------------------------------ running
    def _act_params(self) -> tuple[torch.Tensor, int, float]:
        """The live (scale, zero, scale as a float); on the grid from a per-step cache (no tensor math, no sync)."""
        clock = self.clock
        if clock.w != 0.0:
            s = clock.pick(self.act_scale)
            return s, int(torch.round(clock.pick(self.act_zero))), float(s)
        if self._steps is None:
            zeros = [int(v) for v in torch.round(self.act_zero).tolist()]
            floats = self.act_scale.tolist()
            self._steps = [(self.act_scale[i], zeros[i], floats[i]) for i in range(len(zeros))]
        return self._steps[clock.lo]

    def act_params(self) -> tuple[torch.Tensor, int, float]:
        """The live activation (scale, zero, scale as a float) of the current step (cached per step)."""
        return self._act_params()

    def wants_sums(self) -> bool:
        """Whether the kernel needs the codes' channel sums (an asymmetric weight's zero-point correction)."""
        return not (self.int_weight().symmetric or (self.kind == "conv" and self.groups != 1))

    def out_layout(self, x: torch.Tensor) -> torch.memory_format | None:
        """The memory format a conv's output is copied to for input ``x`` (None: left as the kernel wrote it)."""
        if self.kind != "conv" or self.channels_last_out:
            return None
        if self.channels_last_out is False or x.is_contiguous():
            return torch.contiguous_format
        return None

    def run_codes(self, xq: torch.Tensor, s_float: float, z: int, sums: torch.Tensor | None = None,
                  out_layout: torch.memory_format | None = None) -> torch.Tensor:
        """The integer kernel on codes already made (by :meth:`forward` or a fused producer), float32 out;
        a conv answers channels-last unless ``out_layout`` asks otherwise."""
        w = self.int_weight()
        if self.kind == "conv":
            return kernels.qconv2d(xq, s_float, z, w, self.bias, self.stride, self.padding, self.dilation,
                                   self.groups, out_layout=out_layout, act_sums=sums)
        return kernels.qlinear(xq, s_float, z, w, self.bias, act_sums=sums)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, z, s_float = self._act_params()
        conv = self.kind == "conv"
        # an asymmetric weight's zero-point correction needs the codes' channel sums: same pass
        sums_dim = (1 if conv else -1) if self.wants_sums() else None
        xq, sums = kernels.quantize_act_sums(x, s, z, self.abits, channels_last=conv, sums_dim=sums_dim)
        # oneDNN answers channels-last; unless the model runs channels-last throughout (channels_last_out),
        # the output goes back to the input's layout: torch's group norm and mixed-layout elementwise ops are
        # several times slower than one copy
        y = self.run_codes(xq, s_float, z, sums, self.out_layout(x))
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def stored_bytes(self) -> int:
        """Bytes of the weight and its quantization parameters as stored (bias excluded, as for fp weights)."""
        names = ("qweight", "qweight_packed", "w_scale", "w_zero", "act_scale", "act_zero")
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n in names)

    def resident_bytes(self) -> int:
        """Stored bytes plus what the kernels keep (the oneDNN prepacked copy, cached unpacked weights)."""
        extra = 0
        w = self._weight
        if w is not None:
            if self.wbits != 8:
                extra += w.data.numel()
            for v in w.cache.values():
                for t in (v if isinstance(v, tuple) else (v,)):
                    if isinstance(t, torch.Tensor):
                        try:
                            extra += t.numel() * t.element_size()
                        except RuntimeError:  # an opaque oneDNN tensor: count it as int8
                            extra += math.prod(self.weight_shape)
        return self.stored_bytes() + extra

    def extra_repr(self) -> str:
        return f"{self.kind}, W{self.wbits}A{self.abits}, weight {self.weight_shape}"


def layer_spec(layer: QuantLayer) -> dict[str, Any]:
    """What rebuilding an :class:`IntQuantLayer` needs besides its tensors (kept in the export's config)."""
    b = layer.base_layer
    spec: dict[str, Any] = {"kind": "conv" if layer.conv else "linear", "wbits": layer.wbits, "abits": layer.abits,
                            "weight_shape": list(b.weight.shape), "bias": b.bias is not None}
    if layer.conv:
        if isinstance(b.padding, str):
            raise ValueError(f"{layer.name}: string padding {b.padding!r} is not supported by the integer kernels")
        spec.update(stride=list(b.stride), padding=list(b.padding), dilation=list(b.dilation), groups=b.groups)
        if b.padding_mode != "zeros":
            raise ValueError(f"{layer.name}: padding mode {b.padding_mode!r} is not supported by the integer kernels")
    return spec
