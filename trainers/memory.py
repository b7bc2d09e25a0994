"""Will a training run fit in memory? An estimate made before the base model is loaded.

A real-size model that does not fit is otherwise killed by the kernel minutes into the run,
with no message. :func:`preflight` reads the parameter counts from the checkpoint's header (or
the diffusers folder's headers), estimates the peak resident memory of the run and raises a
:class:`StudioError` that names what would fit (batch, resolution, gradient checkpointing)
when the estimate is above the memory the machine has free.

On the CPU the trainer loads in stages (studio.loading ``staged``): the text encoder(s) and
the VAE for the caches, then, once they are freed, the denoiser. The estimate is so the larger
of the two stages: fp32 text encoders and VAE plus one VAE encode at the resolution; or the fp32
denoiser (and the text encoder(s) where the text side trains: a learned trigger, a text-encoder
adapter) plus its activations, which grow with batch x latent pixels, scaled by the UNet's size
for the families; with prior preservation whose class images must be generated, the whole
pipeline at once. Calibrated on SD 1.5 at 512 px, batch 1, checkpointing (docs/realsize.md:
estimate vs measured there); other sizes are scaled, not measured: measure before trusting it
near the limit. It is checked on the CPU only: GPU memory is the device's business (fp16, 8-bit
optimizers) and a CUDA out-of-memory error already says what happened; ``staged=False`` is the
whole-pipeline estimate that the GPU's checkpointing decision uses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

from studio.errors import StudioError

log = logging.getLogger(__name__)

GIB = 1024**3
# Denoiser activations kept for the backward pass, in bytes per latent pixel per sample of an
# SD 1.5-sized UNet (860M parameters), fp32, SDPA; other UNets are scaled by their parameter count.
# "checkpointing" is consistent with the SD 1.5 512 px run (docs/realsize.md: staged, checkpointing on the
# two highest resolutions, estimate 4.54 GiB, measured peak 4.50 GiB); "none" is a guess.
ACT_BYTES_PER_LATENT_PX = {"checkpointing": 220_000, "none": 1_100_000}
SD15_UNET_PARAMS = 859_520_964
# the interpreter, torch, diffusers and the data caches, beside the model (whole loading, GPU estimate)
OVERHEAD_BYTES = int(1.2 * GIB)
# staged loading (the CPU trainer): the interpreter and libraries, about 0.4 GiB measured before any
# weight, plus the allocator's slack
STAGED_OVERHEAD_BYTES = int(0.5 * GIB)
# one image through the VAE encoder (no gradients), per pixel: SD 1.5's caching stage peaked at
# 2.18 GiB at 512 px with 0.77 GiB of fp32 text encoder + VAE and 0.4 GiB of interpreter
VAE_ENCODE_BYTES_PER_PX = 4096
NATIVE = {"sd1": 512, "sd2": 768, "sdxl": 1024}


@dataclasses.dataclass
class ModelSize:
    """Parameter counts of a base model's components, read from file headers."""

    family: str
    params: dict[str, int]  # component -> parameters

    @property
    def total(self) -> int:
        return sum(self.params.values())


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def model_size(spec: str) -> ModelSize | None:
    """Parameter counts of a single file or a diffusers folder from headers only; None for
    micro, hub ids, quantized folders and anything that cannot be read cheaply."""
    path = Path(spec).expanduser()
    try:
        if path.is_file() and path.suffix.lower() == ".safetensors":
            from studio.single_file import TEXT_LAYOUTS, UNET_PREFIX, VAE_PREFIX, detect_checkpoint_family, read_header

            shapes, _ = read_header(path)
            family = detect_checkpoint_family(shapes, source=path)
            prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX,
                        **{name: p for name, (_, p) in TEXT_LAYOUTS[family].items()}}
            params = {name: sum(_count(s) for k, s in shapes.items() if k.startswith(p) and not k.endswith("position_ids"))
                      for name, p in prefixes.items()}  # position_ids: CLIP's index buffer, not a weight
            return ModelSize(family, params)
        if path.is_dir() and (path / "model_index.json").is_file() and not (path / "studio_quant.json").is_file():
            from studio.single_file import read_header

            index = json.loads((path / "model_index.json").read_text())
            if index.get("_class_name") not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
                return None
            params = {}
            for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
                files = sorted((path / comp).glob("*.safetensors")) if (path / comp).is_dir() else []
                if files:
                    params[comp] = sum(_count(s) for f in files for s in read_header(f)[0].values())
            if "unet" not in params:
                return None
            if "text_encoder_2" in params:
                family = "sdxl"
            else:
                te = json.loads((path / "text_encoder" / "config.json").read_text())
                family = "sd2" if te.get("hidden_act") == "gelu" else "sd1"
            return ModelSize(family, params)
    except (OSError, ValueError, StudioError) as exc:  # the loader reports bad files properly
        log.debug("no size estimate for %s: %s", spec, exc)
    return None


def available_bytes() -> int:
    """Memory this process may still use: MemAvailable, the cgroup's limit, and $STUDIO_MEMORY_LIMIT
    (e.g. ``12G``: a cap for machines shared with other jobs), whichever is smallest."""
    limits = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for max_file, cur_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                               ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            raw = Path(max_file).read_text().strip()
            if raw != "max" and int(raw) < 1 << 60:
                limits.append(int(raw) - int(Path(cur_file).read_text().strip()))
            break
        except (OSError, ValueError):
            continue
    env = os.environ.get("STUDIO_MEMORY_LIMIT", "").strip()
    if env:
        limits.append(parse_size(env))
    if not limits:
        return 1 << 62
    return max(0, min(limits))


def parse_size(text: str) -> int:
    """``12G``, ``800M``, ``12GiB`` or a byte count, as bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise StudioError(f"STUDIO_MEMORY_LIMIT={text}: not a size; write e.g. 12G or 800M")
    return int(float(m[1]) * 1024 ** " kmgt".index(m[2] or " "))


def estimate_bytes(size: ModelSize, *, resolution: int, batch: int, checkpointing: bool, staged: bool = False,
                   text_in_loop: bool = False, generate: bool = False) -> int:
    """Estimated peak resident memory of a LoRA training run on ``size`` (fp32 weights on the CPU).

    ``staged``: the CPU trainer's loading (module docstring): the larger stage. ``text_in_loop``: the
    text encoder(s) stay through training (learned trigger, text-encoder adapter). ``generate``: class
    images are generated first (the whole pipeline at once). Without ``staged``: every weight at once.
    """
    latent_px = (resolution // 8) ** 2
    unet = size.params.get("unet", SD15_UNET_PARAMS)
    per_px = ACT_BYTES_PER_LATENT_PX["checkpointing" if checkpointing else "none"]
    acts = int(per_px * latent_px * batch * unet / SD15_UNET_PARAMS)
    if not staged:
        return 4 * size.total + acts + OVERHEAD_BYTES
    text = sum(n for name, n in size.params.items() if name.startswith("text_encoder"))
    caching = 4 * (text + size.params.get("vae", 0)) + VAE_ENCODE_BYTES_PER_PX * resolution**2
    training = 4 * (unet + (text if text_in_loop else 0)) + acts
    generating = 4 * size.total if generate else 0
    return max(caching, training, generating) + STAGED_OVERHEAD_BYTES


def gpu_needs_checkpointing(spec: str, *, resolution: int | None, batch: int, prior: bool,
                            weight_bytes: int = 4) -> bool:
    """On CUDA: whether gradient checkpointing is needed, i.e. the run without it would not fit in free GPU memory.

    Checkpointing recomputes the forward pass in the backward one (about 1.5x the step time,
    measured on an H100 at SD 1.5 512 px, docs/BENCHMARKS.md), so a GPU with room to spare
    runs without it. Unknown sizes (hub ids) keep it on. ``weight_bytes``: 2 for fp16/bf16 weights.
    """
    import torch

    size = model_size(spec)
    if size is None or not torch.cuda.is_available():
        return True
    res = resolution or NATIVE.get(size.family, 512)
    seen = batch * (2 if prior else 1)
    need = estimate_bytes(size, resolution=res, batch=seen, checkpointing=False) - (4 - weight_bytes) * size.total
    free, _total = torch.cuda.mem_get_info()
    log.info("GPU memory: about %.1f GiB needed without gradient checkpointing, %.1f GiB free", need / GIB, free / GIB)
    return need > 0.9 * free


def _fits(size: ModelSize, budget: int, resolution: int, batch: int, **kw) -> tuple[int, int] | None:
    """The largest (resolution, batch) with checkpointing, at most the asked ones, that fits."""
    res = resolution
    while res >= 256:
        b = batch
        while b >= 1:
            if estimate_bytes(size, resolution=res, batch=b, checkpointing=True, **kw) <= budget:
                return res, b
            b //= 2
        res -= 64
    return None


def preflight(spec: str, *, resolution: int | None, batch: int, prior: bool, checkpointing: bool,
              device: str = "cpu", text_in_loop: bool = False) -> int | None:
    """Raise a StudioError naming what would fit when a run on ``spec`` cannot fit in memory.

    ``batch`` counts instance images; prior preservation doubles what the denoiser sees (and its
    class images may have to be generated: the whole pipeline at once). ``text_in_loop``: the text
    encoder(s) stay loaded through training. Returns the estimate in bytes (None when there is
    nothing to estimate: micro, hub ids, GPU runs).
    """
    if device != "cpu":
        return None
    size = model_size(spec)
    if size is None:
        return None
    res = resolution or NATIVE.get(size.family, 512)
    seen = batch * (2 if prior else 1)
    kw = {"staged": True, "text_in_loop": text_in_loop, "generate": prior}
    need = estimate_bytes(size, resolution=res, batch=seen, checkpointing=checkpointing, **kw)
    have = available_bytes()
    log.info("memory: about %.1f GiB needed (%s, %d px, %d image(s) per step, checkpointing %s), %.1f GiB free",
             need / GIB, size.family, res, seen, "on" if checkpointing else "off", have / GIB)
    if need <= have:
        return need
    text = sum(n for name, n in size.params.items() if name.startswith("text_encoder"))
    weights = 4 * (size.total if prior else size.params.get("unet", 0) + (text if text_in_loop else 0))
    msg = (f"--base {spec}: this run needs about {need / GIB:.1f} GiB of memory ({weights / GIB:.1f} GiB of fp32 "
           f"weights at once, the rest activations for {seen} image(s) of {res} px"
           f"{' with prior preservation' if prior else ''}); {have / GIB:.1f} GiB are free")
    fit = _fits(size, have, res, seen, **kw)
    if fit is None:
        raise StudioError(f"{msg}. Nothing fits: even the weights alone exceed it; train on a machine with more "
                          f"memory (or a GPU), or free memory")
    r, b = fit
    advice = [] if checkpointing else ["--gradient-checkpointing"]
    per_step = b // 2 if prior and b >= 2 else b  # instance images per step (prior preservation doubles them)
    if prior and b < 2:
        advice.append("--no-prior")
    if per_step < batch:
        advice.append(f"--batch {per_step}")
    if r < res:
        advice.append(f"--resolution {r}")
    raise StudioError(f"{msg}. What would fit: {' '.join(advice) or 'the same run with gradient checkpointing'} "
                      f"(about {estimate_bytes(size, resolution=r, batch=b, checkpointing=True, **kw) / GIB:.1f} GiB)")
