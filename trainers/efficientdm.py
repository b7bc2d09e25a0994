"""EfficientDM's data-free distillation (He et al. 2024), and the QAT baseline on the same loop.

The full-precision teacher samples from noise with the pipeline's own sampler and guidance. At
every denoising step the student (the fake-quantized denoiser) predicts the noise for the same
latents and timestep; the loss is the MSE between the two guided predictions, and one optimizer
step follows. The latents then advance with the teacher's prediction, so the student is trained
on the full-precision trajectory. The timestep hook selects each activation quantizer's step
parameters from the timestep the student is called with (temporal LSQ).

What trains:

* ``efficientdm``: the LoRA factors of every QALoRA layer, with a per-layer learning rate
  ``lr * mean weight step size of the layer`` (scale-aware optimisation: Adam ignores the scale
  of a gradient, so the scale goes into the learning rate), and the activation step sizes and
  zero points of every step.
* ``qat``: the weights themselves (full fine-tuning of the fake-quantized weights, the paper's
  QAT baseline), with one global learning rate in the same units (``lr`` times the median
  layer's mean step size), and the same activation parameters.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from studio.errors import StudioError
from studio.quant.config import QuantConfig
from studio.quant.model import QuantState
from studio.quant.trajectories import Sampler
from studio.trainers.loop import Cancelled  # the training loop's: the service treats both jobs alike

log = logging.getLogger(__name__)

# noise seeds of the distillation: away from calibration (seed*100_003) and from the eval suites
# (seed*10^7 + stream*10^6), so no evaluated image was seen in training
NOISE_BASE = 5_000_000_017


@dataclasses.dataclass
class DistillProgress:
    step: int
    total: int
    loss: float
    epoch: int
    elapsed_s: float


def param_groups(state: QuantState, cfg: QuantConfig) -> list[dict[str, Any]]:
    """Optimizer groups: what trains for ``cfg.method`` and at which learning rate."""
    groups: list[dict[str, Any]] = []
    mean_steps = {name: float(layer.wq.scale.detach().mean()) for name, layer in state.layers.items()}
    if cfg.method == "efficientdm":
        for name, layer in state.layers.items():
            if layer.lora_down is None:
                continue
            layer.lora_down.requires_grad_(True)
            layer.lora_up.requires_grad_(True)
            groups.append({"params": [layer.lora_down, layer.lora_up], "lr": cfg.resolved_lr() * mean_steps[name],
                           "name": f"lora:{name}"})
    elif cfg.method == "qat":
        lr = cfg.resolved_lr() * statistics.median(mean_steps.values())
        weights = []
        for layer in state.layers.values():
            layer.base_layer.weight.requires_grad_(True)
            weights.append(layer.base_layer.weight)
        groups.append({"params": weights, "lr": lr, "name": "weights"})
    else:
        raise StudioError(f"--method {cfg.method}: has no training phase")
    if cfg.act_lr > 0:
        for name, layer in state.layers.items():
            layer.aq.scale.requires_grad_(True)
            layer.aq.zero.requires_grad_(True)
            s = float(layer.aq.scale.detach().mean())
            groups.append({"params": [layer.aq.scale], "lr": cfg.act_lr * s, "name": f"act_scale:{name}"})
            # a zero point moves in code units: the same relative rate as the step size
            groups.append({"params": [layer.aq.zero], "lr": cfg.act_lr, "name": f"act_zero:{name}"})
    return groups


def freeze(state: QuantState, unet: torch.nn.Module) -> None:
    """Nothing trains any more (after distillation)."""
    for p in unet.parameters():
        p.requires_grad_(False)


def distill(sampler: Sampler, student: torch.nn.Module, teacher: torch.nn.Module, state: QuantState,
            cfg: QuantConfig, prompts: Sequence[str], *, on_step: Callable[[DistillProgress], None] | None = None,
            cancel: threading.Event | None = None) -> dict[str, Any]:
    """Run the distillation; returns a summary (steps, seconds, losses per epoch)."""
    epochs = cfg.resolved_epochs()
    batches = [list(prompts[i : i + cfg.batch]) for i in range(0, len(prompts), cfg.batch)]
    steps_per_traj = len(list(sampler.timesteps()))
    total = epochs * len(batches) * steps_per_traj
    groups = param_groups(state, cfg)
    opt = torch.optim.Adam(groups, betas=(0.9, 0.999))
    teacher.eval()
    student.train()
    state.set_quant(True)
    t0 = time.perf_counter()
    step = 0
    epoch_losses: list[float] = []
    try:
        for epoch in range(epochs):
            losses = []
            for b, chunk in enumerate(batches):
                cond = sampler.encode(chunk)
                x = sampler.noise(len(chunk), NOISE_BASE + cfg.seed * 1_000_003 + (epoch * len(batches) + b) * 1009)
                sampler.start()
                for t in sampler.timesteps():
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("quantization cancelled")
                    with torch.no_grad():
                        eps_fp = sampler.predict(teacher, x, t, cond)
                    eps_q = sampler.predict(student, x, t, cond)
                    loss = F.mse_loss(eps_q.float(), eps_fp.float())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    _keep_valid(state)
                    with torch.no_grad():
                        x = sampler.advance(eps_fp, t, x)  # the trajectory follows the full-precision model
                    losses.append(float(loss.detach()))
                    step += 1
                    if on_step is not None:
                        on_step(DistillProgress(step, total, losses[-1], epoch, time.perf_counter() - t0))
            epoch_losses.append(sum(losses) / max(1, len(losses)))
            log.info("distillation epoch %d/%d: mean loss %.3g", epoch + 1, epochs, epoch_losses[-1])
    finally:
        freeze(state, student)
        student.eval()
    return {"steps": step, "seconds": time.perf_counter() - t0, "epoch_losses": epoch_losses}


@torch.no_grad()
def _keep_valid(state: QuantState) -> None:
    """Step sizes stay positive and zero points inside the code range after each update."""
    for layer in state.layers.values():
        layer.aq.scale.clamp_(min=1e-8)
        layer.aq.zero.clamp_(0, (1 << layer.abits) - 1)
