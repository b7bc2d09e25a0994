"""Turning a denoiser into a fake-quantized one: which layers, which bits, and the timestep hook.

Every ``Linear`` and ``Conv2d`` of the denoiser becomes a :class:`~studio.quant.layer.QuantLayer`.
The first layer (the one that reads the model's input) and the last (the one whose output is
the model's output) keep 8 bits and no LoRA; they are found by running the model once on a
probe input and watching which layer touches the input and which one produces the output, so
no layer name or index is hard-coded (``find_io_layers``). One :class:`StepClock` per model,
set by the timestep hook of :mod:`studio.hooks`, selects the activation parameters of the step.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from studio.errors import StudioError
from studio.hooks import listen_timestep, unlisten_timestep
from studio.quant.config import IO_BITS
from studio.quant.layer import QuantLayer, StepClock

log = logging.getLogger(__name__)

QUANTIZABLE = (nn.Linear, nn.Conv2d)


@dataclasses.dataclass
class QuantState:
    """What quantization added to a denoiser, kept on it as ``unet.studio_quant``."""

    clock: StepClock
    layers: dict[str, QuantLayer]
    first: str
    last: str
    wbits: int
    abits: int
    rank: int

    def set_quant(self, enabled: bool) -> None:
        """Fake quantization on (True) or the full-precision base layers (False)."""
        for layer in self.layers.values():
            layer.quant = enabled


def probe_inputs(unet: nn.Module, batch: int = 1) -> dict[str, Any]:
    """Inputs for one forward of ``unet`` built from its config (SD/SDXL UNet2DConditionModel, UNet2DModel)."""
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    size = min(int(size), 32)  # the structure is what matters; keep the probe cheap
    p = next(unet.parameters())
    kw: dict[str, Any] = {
        "sample": torch.randn(batch, cfg.in_channels, size, size, device=p.device, dtype=p.dtype),
        "timestep": torch.tensor([500] * batch, device=p.device),
    }
    cross = getattr(cfg, "cross_attention_dim", None)
    if cross is not None and "encoder_hidden_states" in _forward_args(unet):
        kw["encoder_hidden_states"] = torch.randn(batch, 8, cross if isinstance(cross, int) else cross[0],
                                                  device=p.device, dtype=p.dtype)
        if getattr(cfg, "addition_embed_type", None) == "text_time":
            tdim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, tdim, device=p.device, dtype=p.dtype),
                                       "time_ids": torch.zeros(batch, 6, device=p.device, dtype=p.dtype)}
    return kw


def _forward_args(module: nn.Module) -> tuple[str, ...]:
    import inspect

    return tuple(inspect.signature(module.forward).parameters)


def _output_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


@torch.no_grad()
def find_io_layers(unet: nn.Module) -> tuple[str, str]:
    """Names of the first (reads the model input) and last (makes the model output) Linear/Conv2d layers.

    Found from one probe forward: the first layer is the one whose input is the ``sample`` tensor
    itself (else the first layer run on a tensor of the sample's shape), the last is the one whose
    output is the returned tensor (else the last layer run that gives the output's shape).
    """
    inputs = probe_inputs(unet)
    sample = inputs["sample"]
    order: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    handles = []
    for name, m in unet.named_modules():
        if isinstance(m, QUANTIZABLE):
            handles.append(m.register_forward_hook(
                lambda mod, args, out, name=name: order.append((name, args[0], out))))
    try:
        out = _output_tensor(unet(**inputs, return_dict=False) if "return_dict" in _forward_args(unet)
                             else unet(**inputs))
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise StudioError(f"{type(unet).__name__}: no Linear or Conv2d layer ran; nothing to quantize")
    first = next((n for n, x, _ in order if x.data_ptr() == sample.data_ptr()), None) or \
        next((n for n, x, _ in order if tuple(x.shape) == tuple(sample.shape)), order[0][0])
    last = next((n for n, _, y in reversed(order) if y.data_ptr() == out.data_ptr()), None) or \
        next((n for n, _, y in reversed(order) if tuple(y.shape) == tuple(out.shape)), order[-1][0])
    return first, last


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def quantize_model(unet: nn.Module, *, wbits: int, abits: int, rank: int, timesteps: list[float],
                   weight_sym8: bool = False) -> QuantState:
    """Replace every Linear/Conv2d of ``unet`` by a QuantLayer (in place) and install the timestep hook.

    The first and last layers get 8 bits and no LoRA; ``weight_sym8``: every 8-bit weight quantizer
    has its zero point fixed at the middle code (see :class:`~studio.quant.config.QuantConfig`).
    Quantizer parameters start at 1/0: the caller calibrates them (:mod:`studio.quant.calibrate`).
    """
    if getattr(unet, "studio_quant", None) is not None:
        raise StudioError("this denoiser is already quantized")
    first, last = find_io_layers(unet)
    clock = StepClock(timesteps)
    layers: dict[str, QuantLayer] = {}
    targets = [(n, m) for n, m in unet.named_modules() if isinstance(m, QUANTIZABLE)]
    for name, module in targets:
        io = name in (first, last)
        layer = QuantLayer(module, wbits=IO_BITS if io else wbits, abits=IO_BITS if io else abits,
                           rank=0 if io else rank, clock=clock, name=name)
        layer.wq.symmetric = weight_sym8 and layer.wbits == 8
        layer.to(device=module.weight.device)
        _set_module(unet, name, layer)
        layers[name] = layer
    state = QuantState(clock, layers, first, last, wbits, abits, rank)
    unet.studio_quant = state
    listen_timestep(unet, clock.set_timestep)
    log.info("quantized %d layers at W%dA%d (first %s and last %s at W8A8), LoRA rank %d", len(layers), wbits,
             abits, first, last, rank)
    return state


def remove_hook(unet: nn.Module) -> None:
    """Take the timestep hook of a quantized denoiser off (the layers stay)."""
    state = getattr(unet, "studio_quant", None)
    if state is not None:
        unlisten_timestep(unet, state.clock.set_timestep)


def weight_memory(module: nn.Module) -> int:
    """Bytes of the weights of Linear/Conv2d layers (fp: the weight tensors; see runtime for integer ones)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in module.modules() if isinstance(m, QUANTIZABLE))
