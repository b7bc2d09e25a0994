"""Sampling trajectories of a pipeline's own sampler, step by step: calibration and distillation data.

EfficientDM needs no training images: the full-precision model samples from noise with the
pipeline's scheduler and guidance, and every step's input is data. :class:`Sampler` runs that
loop over the pipeline's components (SD 1.x/2.x text-to-image, LDM text-to-image, unconditional
LDM), one step at a time, so a caller can act at each step (record activations, take an
optimizer step) while the latents follow the full-precision prediction.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from studio.errors import StudioError

log = logging.getLogger(__name__)

# prompts for bases other than micro when the user gives none: everyday captions of the kind
# text-to-image models are trained on (data-free distillation only needs plausible conditions)
GENERIC_PROMPTS: tuple[str, ...] = (
    "a photo of a cat sitting on a sofa", "a red car parked on a city street", "a bowl of fruit on a wooden table",
    "a mountain lake at sunrise", "a portrait of an old man with a beard", "a watercolor painting of a harbor",
    "a dog running on the beach", "a cup of coffee next to a laptop", "a forest path in autumn",
    "a plate of pasta with tomato sauce", "a modern living room with large windows", "a bird on a branch",
    "a snowy village at night", "a bicycle leaning against a brick wall", "a bouquet of flowers in a vase",
    "an astronaut riding a horse", "a lighthouse on a rocky coast", "a close-up of a green leaf with water drops",
    "a busy market street in the afternoon", "a sailing boat on a calm sea", "a child reading a book",
    "a castle on a hill under a cloudy sky", "a pizza on a kitchen counter", "a desert with sand dunes",
)


def default_prompts(pipe: Any, n: int, seed: int) -> list[str]:
    """``n`` prompts: micro-world training captions on micro, the generic list elsewhere."""
    import random

    rng = random.Random(seed)
    src = getattr(pipe, "studio_source", None)
    if src is not None and src.kind == "micro":
        from studio.micro.world import caption, random_scene

        return [caption(random_scene(rng), rng) for _ in range(n)]
    return [rng.choice(GENERIC_PROMPTS) for _ in range(n)]


def read_prompts(path: str) -> list[str]:
    """One prompt per non-empty line of a text file."""
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.is_file():
        raise StudioError(f"--prompts {path}: no such file; pass a text file with one prompt per line")
    lines = [line.strip() for line in p.read_text(encoding="utf-8", errors="replace").splitlines()]
    prompts = [line for line in lines if line]
    if not prompts:
        raise StudioError(f"--prompts {path}: the file holds no prompts; write one prompt per line")
    return prompts


class Sampler:
    """The pipeline's sampling loop for one batch, exposed step by step.

    ``for t, x, cond in sampler.steps(...)``: yields each timestep with the current latents and
    the denoiser's conditioning; the caller computes the guided prediction with
    :meth:`predict` and advances the latents with :meth:`advance` (the full-precision prediction,
    so the trajectory is the full-precision model's).
    """

    def __init__(self, pipe: Any, *, steps: int, guidance: float) -> None:
        self.pipe = pipe
        self.steps_n = steps
        self.guidance = guidance
        self.kind = _pipeline_kind(pipe)
        self.unet = pipe.unet
        self.device = self.unet.device
        self.dtype = self.unet.dtype
        self.scheduler = copy.deepcopy(pipe.scheduler)
        self.scheduler.set_timesteps(steps, device=self.device)
        self._grid = _dedup([float(t) for t in self.scheduler.timesteps])

    @property
    def cfg(self) -> bool:
        return self.kind != "uncond" and self.guidance > 1.0

    def timestep_grid(self) -> list[float]:
        """The distinct timesteps of one run: the calibration grid of temporal LSQ."""
        return list(self._grid)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The denoiser's conditioning for ``prompts``, [negative; positive] when guidance is on."""
        pipe = self.pipe
        if self.kind == "uncond":
            return {}
        if self.kind == "sd":
            pos, neg = pipe.encode_prompt(list(prompts), self.device, 1, self.cfg)
            emb = torch.cat([neg, pos]) if self.cfg else pos
            return {"encoder_hidden_states": emb.to(self.dtype)}
        tok, bert = pipe.tokenizer, pipe.bert  # LDM text-to-image, as LDMTextToImagePipeline does it

        def embed(texts: list[str]) -> torch.Tensor:
            ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            return bert(ids.to(self.device))[0]

        emb = embed(list(prompts))
        if self.cfg:
            emb = torch.cat([embed([""] * len(prompts)), emb])
        return {"encoder_hidden_states": emb.to(self.dtype)}

    def noise(self, n: int, seed: int) -> torch.Tensor:
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
        x = torch.stack([torch.randn(cfg.in_channels, size, size, generator=g) for g in gens])
        return x.to(self.device, self.dtype) * self.scheduler.init_noise_sigma

    def predict(self, unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The guided noise prediction of ``unet`` at (x, t), as the pipeline computes it."""
        inp = torch.cat([x, x]) if self.cfg else x
        inp = self.scheduler.scale_model_input(inp, t)
        out = unet(inp, t, **cond, return_dict=False)[0]
        if self.cfg:
            neg, pos = out.chunk(2)
            out = neg + self.guidance * (pos - neg)
        return out

    def start(self) -> None:
        """Reset the scheduler for a new trajectory (multistep solvers keep a history)."""
        self.scheduler.set_timesteps(self.steps_n, device=self.device)

    def advance(self, eps: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.scheduler.step(eps, t, x, return_dict=False)[0]

    def timesteps(self) -> Iterator[torch.Tensor]:
        yield from self.scheduler.timesteps


def _dedup(ts: list[float]) -> list[float]:
    seen: dict[float, None] = {}
    for t in ts:
        seen.setdefault(t, None)  # second-order samplers visit a timestep twice
    return list(seen)


def _pipeline_kind(pipe: Any) -> str:
    comps = getattr(pipe, "components", {})
    if "text_encoder_2" in comps:
        raise StudioError("SDXL pipelines are not supported by studio quantize yet; use an SD 1.x/2.x, LDM or "
                          "micro base")
    if "bert" in comps:
        return "ldm-text"
    if "text_encoder" in comps and hasattr(pipe, "encode_prompt"):
        return "sd"
    if "encoder_hidden_states" not in _args(pipe.unet):
        return "uncond"
    raise StudioError(f"{type(pipe).__name__}: cannot build prompts' conditioning for this pipeline")


def _args(module: torch.nn.Module) -> tuple[str, ...]:
    import inspect

    return tuple(inspect.signature(module.forward).parameters)


@torch.no_grad()
def run_fp(sampler: Sampler, prompts: Sequence[str], seed: int, batch: int,
           cancel: threading.Event | None = None) -> None:
    """Sample ``prompts`` with the pipeline's denoiser (whatever mode it is in), ``batch`` at a time."""
    for start in range(0, len(prompts), batch):
        if cancel is not None and cancel.is_set():
            from studio.trainers.loop import Cancelled

            raise Cancelled("quantization cancelled")
        chunk = list(prompts[start : start + batch])
        cond = sampler.encode(chunk)
        x = sampler.noise(len(chunk), seed + start)
        sampler.start()
        for t in sampler.timesteps():
            eps = sampler.predict(sampler.unet, x, t, cond)
            x = sampler.advance(eps, t, x)
