"""Initialising the quantizers: weights from the weights, activations from full-precision sampling runs.

Weights: per-channel min/max (``minmax``) or a per-channel Lp search over clipping ratios (``lp``).
Activations: the full-precision model samples from noise exactly as at inference (the
pipeline, its scheduler, guidance), with fake quantization off; a pre-hook on every layer
records, per denoising step, the range of its input and a random subsample of its values. Each
step's (scale, zero) is then the min/max range (``minmax``) or the clipped range with the least
Lp error on the subsample (``lp``), the initialisation of EfficientDM's temporal LSQ.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from studio.quant import functional as QF
from studio.quant.model import QuantState

log = logging.getLogger(__name__)

SUBSAMPLE = 4096  # values kept per layer, step and call for the clipping search


class _StepStats:
    """Per-step input statistics of one layer: running min/max and a subsample of values."""

    def __init__(self, steps: int) -> None:
        self.lo = [float("inf")] * steps
        self.hi = [float("-inf")] * steps
        self.values: list[list[torch.Tensor]] = [[] for _ in range(steps)]

    def add(self, step: int, x: torch.Tensor, gen: torch.Generator) -> None:
        x = x.detach().float().reshape(-1)
        self.lo[step] = min(self.lo[step], float(x.min()))
        self.hi[step] = max(self.hi[step], float(x.max()))
        if x.numel() > SUBSAMPLE:
            idx = torch.randint(0, x.numel(), (SUBSAMPLE,), generator=gen, device="cpu").to(x.device)
            x = x[idx]
        self.values[step].append(x.cpu())


@torch.no_grad()
def calibrate_weights(state: QuantState, how: str = "minmax") -> None:
    """Weight quantizers from the (merged) weights: per-channel ``minmax`` or ``lp`` search."""
    for layer in state.layers.values():
        w = layer.merged_weight().detach()
        if how == "lp":
            layer.wq.init_lp(w)
        else:
            layer.wq.init_minmax(w)


@torch.no_grad()
def record_activations(state: QuantState, run: Callable[[], Any], seed: int = 0) -> dict[str, _StepStats]:
    """Run ``run()`` (full-precision sampling) with a recording pre-hook on every layer; stats per layer."""
    steps = state.clock.steps
    stats = {name: _StepStats(steps) for name in state.layers}
    gen = torch.Generator().manual_seed(seed)
    handles = []
    seen_steps: set[int] = set()

    def hook(name: str):
        def pre(module: Any, args: tuple) -> None:
            clock = state.clock
            if clock.w != 0.0:  # a timestep off the calibration grid: not a calibration run
                return
            seen_steps.add(clock.lo)
            stats[name].add(clock.lo, args[0], gen)

        return pre

    state.set_quant(False)
    try:
        for name, layer in state.layers.items():
            handles.append(layer.register_forward_pre_hook(hook(name)))
        run()
    finally:
        for h in handles:
            h.remove()
        state.set_quant(True)
    missing = sorted(set(range(steps)) - seen_steps)
    if missing:
        raise RuntimeError(f"calibration run did not visit steps {missing} of the {steps}-step grid")
    return stats


@torch.no_grad()
def calibrate_activations(state: QuantState, stats: dict[str, _StepStats], how: str = "lp",
                          ratios: torch.Tensor | None = None) -> None:
    """Per-step activation (scale, zero) of every layer from recorded statistics."""
    for name, layer in state.layers.items():
        st = stats[name]
        scales, zeros = [], []
        for i in range(state.clock.steps):
            lo, hi = torch.tensor(st.lo[i]), torch.tensor(st.hi[i])
            if how == "lp":
                vals = torch.cat(st.values[i])
                # the recorded extremes join the subsample so that ratio 1 covers the true range
                vals = torch.cat([vals, lo.reshape(1), hi.reshape(1)])
                s, z = QF.lp_search(vals, layer.abits, ratios=ratios)
            else:
                s, z = QF.params_from_range(lo, hi, layer.abits)
            scales.append(s.reshape(()))
            zeros.append(z.reshape(()))
        dev = layer.aq.scale.device
        layer.aq.scale.copy_(torch.stack(scales).to(dev))
        layer.aq.zero.copy_(torch.stack(zeros).to(dev))
