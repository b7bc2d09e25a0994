"""Low-bit diffusion models: EfficientDM (QALoRA + temporal LSQ + data-free distillation) and baselines.

``quantize(pipe, QuantConfig(...))`` quantizes the pipeline's denoiser in place (fake
quantization) and returns a report; ``export_quantized(pipe, DIR, ...)`` writes the real low-bit
model that ``studio.load_pipeline(DIR)`` loads onto integer kernels. ``run_job`` is the whole
job (load, quantize, export) for the CLI and the service layer.

Methods: ``efficientdm`` (He et al., ICLR 2024), ``ptq-minmax``, ``ptq-mse`` (Lp search of
clipping ranges) and ``qat`` (full fine-tuning of the fake-quantized weights with the same
distillation). Package layout: :mod:`.config` (the job), :mod:`.functional` (the quantizer math),
:mod:`.layer` (fake-quantized QALoRA layers, the step clock), :mod:`.model` (which layers, the
timestep hook), :mod:`.calibrate`, :mod:`.trajectories` (the sampler, step by step),
:mod:`.runtime` (integer layers), :mod:`.export`; the distillation loop is the recipe
:mod:`studio.trainers.efficientdm`.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from studio.errors import StudioError
from studio.quant.config import METHODS, QuantConfig
from studio.quant.export import MARKER, export_quantized, is_quantized_folder, load_quantized
from studio.quant.model import QuantState, find_io_layers, quantize_model
from studio.trainers.loop import Event

log = logging.getLogger(__name__)


# progress reports are the training loop's events (phases prepare | train | done), so the CLI's bar and
# the UI's job view show a quantization job as they show a training run
EventHandler = Callable[[Event], None]


def _sampling(pipe: Any, cfg: QuantConfig) -> tuple[int, float]:
    from studio.generation import model_defaults

    d = model_defaults(pipe)
    return int(cfg.steps or d["steps"]), float(d["guidance"] if cfg.guidance is None else cfg.guidance)


def _prompts(pipe: Any, cfg: QuantConfig, n: int, seed: int) -> list[str]:
    from studio.quant.trajectories import default_prompts, read_prompts

    if cfg.prompts:
        pool = read_prompts(cfg.prompts)
        import random

        rng = random.Random(seed)
        return [pool[i % len(pool)] if n <= len(pool) else rng.choice(pool) for i in range(n)]
    return default_prompts(pipe, n, seed)


def quantize(pipe: Any, cfg: QuantConfig, *, on_event: EventHandler | None = None,
             cancel: threading.Event | None = None) -> dict[str, Any]:
    """Quantize ``pipe.unet`` in place with ``cfg.method``; returns the job's report.

    Steps: build the fake-quantized denoiser (first/last layers 8 bits, no LoRA), initialise the
    weight quantizers (min/max, or the Lp search for ptq-mse), record the full-precision
    sampling trajectories and initialise the per-step activation quantizers from them (min/max
    for ptq-minmax, Lp search otherwise), then for efficientdm/qat distil from the
    full-precision teacher.
    """
    from studio.quant.calibrate import calibrate_activations, calibrate_weights, record_activations
    from studio.quant.trajectories import Sampler, run_fp
    from studio.trainers.efficientdm import distill

    emit = on_event or (lambda e: None)
    t0 = time.perf_counter()
    steps, guidance = _sampling(pipe, cfg)
    sampler = Sampler(pipe, steps=steps, guidance=guidance)
    teacher = copy.deepcopy(pipe.unet).requires_grad_(False) if cfg.trained else None
    pipe.unet.requires_grad_(False)
    state = quantize_model(pipe.unet, wbits=cfg.wbits, abits=cfg.abits, rank=cfg.lora_rank,
                           timesteps=sampler.timestep_grid(), weight_sym8=cfg.weight_sym8)
    calibrate_weights(state, "lp" if cfg.method == "ptq-mse" else "minmax")
    emit(Event("prepare", message=f"calibrating on {cfg.calib_samples} full-precision sampling trajectories"))
    calib_prompts = _prompts(pipe, cfg, cfg.calib_samples, cfg.seed)
    stats = record_activations(state, lambda: run_fp(sampler, calib_prompts, cfg.seed * 100_003, cfg.batch * 2, cancel),
                               seed=cfg.seed)
    calibrate_activations(state, stats, "minmax" if cfg.method == "ptq-minmax" else "lp")
    del stats
    t_calib = time.perf_counter() - t0
    emit(Event("prepare", message=f"calibrated in {t_calib:.0f} s"))
    report: dict[str, Any] = {"method": cfg.method, "wbits": cfg.wbits, "abits": cfg.abits, "steps": steps,
                              "guidance": guidance, "layers": len(state.layers), "first": state.first,
                              "last": state.last, "calibrate_s": round(t_calib, 1)}
    if cfg.trained and cfg.resolved_epochs() > 0:
        prompts = _prompts(pipe, cfg, cfg.samples, cfg.seed + 1)
        summary = distill(sampler, pipe.unet, teacher, state, cfg, prompts, cancel=cancel,
                          on_step=lambda p: emit(Event("train", p.step, p.total, p.loss, cfg.resolved_lr(),
                                                       p.elapsed_s / p.step * (p.total - p.step),
                                                       f"distillation epoch {p.epoch + 1}")))
        report.update(distill_steps=summary["steps"], distill_s=round(summary["seconds"], 1),
                      epoch_losses=[round(v, 6) for v in summary["epoch_losses"]])
    state.set_quant(True)
    report["quantize_s"] = round(time.perf_counter() - t0, 1)
    return report


def run_job(base: str, cfg: QuantConfig, out: str | Path, *, adapter: str | None = None,
            on_event: EventHandler | None = None, cancel: threading.Event | None = None) -> dict[str, Any]:
    """Load ``base`` (optionally fuse an adapter into it), quantize it and export it to ``out``."""
    from studio.loading import load_pipeline

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StudioError(f"--out {out}: exists and is not an empty folder; choose a new folder")
    t0 = time.perf_counter()
    emit = on_event or (lambda e: None)
    emit(Event("prepare", message=f"loading {base}"))
    torch.manual_seed(cfg.seed)
    pipe = load_pipeline(base, device=cfg.device, dtype="fp32")
    if getattr(pipe.unet, "studio_quant_runtime", None) is not None:
        raise StudioError(f"--base {base}: is already a quantized model; quantize the full-precision model")
    if adapter:
        from studio.mixing import Mixer

        Mixer(pipe, [adapter], fuse=True).apply()  # fused into the weights: quantized with them
    report = quantize(pipe, cfg, on_event=on_event, cancel=cancel)
    report.update(base=str(base), adapter=adapter)
    emit(Event("prepare", message=f"exporting to {out}"))
    export_quantized(pipe, out, config=cfg.to_dict(), report=report)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    marker = json.loads((out / MARKER).read_text())  # the marker's report gets the final total too
    marker["report"] = report
    (out / MARKER).write_text(json.dumps(marker, indent=1))
    emit(Event("done", message=f"W{cfg.wbits}A{cfg.abits} {cfg.method} model in {out} ({report['total_s']:.0f} s)"))
    return report


__all__ = ["METHODS", "QuantConfig", "QuantState", "export_quantized", "find_io_layers",
           "is_quantized_folder", "load_quantized", "quantize", "quantize_model", "run_job"]
