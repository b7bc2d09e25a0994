"""Text-to-image generation on any loaded family, with A1111-style infotext in the PNGs.

``generate(pipe, GenerationParams(...))`` returns PIL images, each carrying its parameters;
``save_images`` writes them as PNGs with the ``parameters`` text chunk that A1111, ComfyUI
and image browsers read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from studio import __version__
from studio.errors import StudioError
from studio.home import studio_home

log = logging.getLogger(__name__)

# diffusers scheduler class -> (A1111 sampler name, extra config)
SAMPLERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "dpm++2m": ("DPM++ 2M", "DPMSolverMultistepScheduler", {}),
    "dpm++2m-karras": ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "euler": ("Euler", "EulerDiscreteScheduler", {}),
    "euler-a": ("Euler a", "EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIM", "DDIMScheduler", {}),
    "pndm": ("PLMS", "PNDMScheduler", {}),
    "unipc": ("UniPC", "UniPCMultistepScheduler", {}),
}
_CLASS_TO_SAMPLER = {cls: name for name, cls, extra in SAMPLERS.values() if not extra}


@dataclasses.dataclass
class GenerationParams:
    """Everything that determines an image, as recorded in its infotext."""

    prompt: str
    negative: str = ""
    steps: int | None = None  # None: the model's default (20 for micro, 30 otherwise)
    guidance: float | None = None  # None: the model's default
    seed: int | None = None  # None: a random seed, recorded in the PNG
    num: int = 1
    width: int | None = None
    height: int | None = None
    sampler: str | None = None  # a key of SAMPLERS; None keeps the model's scheduler
    batch_size: int = 8

    def validate(self) -> None:
        if self.steps is not None and self.steps <= 0:
            raise StudioError(f"--steps {self.steps}: must be a positive number of denoising steps")
        if self.num <= 0:
            raise StudioError(f"--num {self.num}: must be at least 1")
        if self.guidance is not None and self.guidance < 0:
            raise StudioError(f"--guidance {self.guidance}: must be >= 0 (1 turns guidance off)")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise StudioError(f"--sampler {self.sampler}: unknown; choose one of {', '.join(SAMPLERS)}")
        if self.batch_size <= 0:
            raise StudioError(f"--batch-size {self.batch_size}: must be at least 1")


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' or 'N' -> (width, height)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX*]\s*(\d+))?\s*", text)
    if not m:
        raise StudioError(f"--size {text}: expected WIDTHxHEIGHT, e.g. 64x64 or 512x768")
    w = int(m.group(1))
    h = int(m.group(2) or m.group(1))
    return w, h


def vae_factor(pipe: Any) -> int:
    """How many pixels one latent cell covers."""
    if hasattr(pipe, "vae_scale_factor"):
        return int(pipe.vae_scale_factor)
    vae = getattr(pipe, "vae", None) or getattr(pipe, "vqvae", None)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def native_size(pipe: Any) -> tuple[int, int]:
    """The resolution the model was trained at."""
    size = pipe.unet.config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    px = int(size) * vae_factor(pipe)
    return px, px


def model_defaults(pipe: Any) -> dict[str, Any]:
    """Steps and guidance that suit the model (the micro model keeps its own in studio_micro.json)."""
    src = getattr(pipe, "studio_source", None)
    if src is not None and src.kind == "micro":
        from studio.micro import configs

        report = Path(src.path) / "studio_micro.json"
        sampling = json.loads(report.read_text()).get("sampling", {}) if report.is_file() else {}
        return {**configs.SAMPLING, **sampling}
    return {"steps": 30, "guidance": 7.5}


def set_sampler(pipe: Any, sampler: str) -> None:
    """Swap the pipeline's scheduler for ``sampler`` (a key of SAMPLERS), keeping its betas."""
    import diffusers

    _, cls_name, extra = SAMPLERS[sampler]
    cls = getattr(diffusers, cls_name)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)


def sampler_name(pipe: Any) -> str:
    cls = type(pipe.scheduler).__name__
    if cls == "DPMSolverMultistepScheduler" and pipe.scheduler.config.get("use_karras_sigmas"):
        return "DPM++ 2M Karras"
    return _CLASS_TO_SAMPLER.get(cls, cls)


_HASH_CACHE: dict[tuple[str, int, float], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, cached per (path, size, mtime) in memory and under STUDIO_HOME."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime)
    if key in _HASH_CACHE:
        return _HASH_CACHE[key]
    cache_file = studio_home() / "cache" / "hashes.json"
    disk: dict[str, str] = {}
    if cache_file.is_file():
        try:
            disk = json.loads(cache_file.read_text())
        except (json.JSONDecodeError, OSError):
            disk = {}
    dkey = f"{key[0]}|{key[1]}|{key[2]}"
    if dkey not in disk:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        disk[dkey] = h.hexdigest()
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(disk))
            os.replace(tmp, cache_file)
        except OSError:  # a read-only home only costs a re-hash next time
            pass
    _HASH_CACHE[key] = disk[dkey]
    return disk[dkey]


def model_hash(pipe: Any) -> str:
    """A1111-style short model hash (first 10 hex digits of the sha256 of the weights file)."""
    src = getattr(pipe, "studio_source", None)
    if src is None:
        return ""
    path = Path(src.path)
    if path.is_file():
        return file_sha256(path)[:10]
    for candidate in ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors"):
        if (path / candidate).is_file():
            return file_sha256(path / candidate)[:10]
    return ""


def infotext(params: GenerationParams, seed: int, width: int, height: int, pipe: Any,
             extra: dict[str, str] | None = None) -> str:
    """The A1111 'parameters' text: prompt, negative prompt, then 'Key: value' pairs."""
    src = getattr(pipe, "studio_source", None)
    fields = {
        "Steps": params.steps,
        "Sampler": sampler_name(pipe),
        "CFG scale": params.guidance,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_hash(pipe),
        "Model": Path(src.spec).name if src else "",
        "Family": src.family if src else "",
    }
    fields.update(extra or {})
    fields["Version"] = f"diffusion-studio {__version__}"
    text = params.prompt
    if params.negative:
        text += f"\nNegative prompt: {params.negative}"
    pairs = ", ".join(f"{k}: {_quote(str(v))}" for k, v in fields.items() if v not in ("", None))
    return f"{text}\n{pairs}"


def _quote(value: str) -> str:
    # A1111 quotes values that contain its separators
    return json.dumps(value) if ("," in value or ":" in value or "\n" in value) else value


def generate(pipe: Any, params: GenerationParams, *, extra_info: dict[str, str] | None = None,
             callback: Any = None) -> list[Image.Image]:
    """Generate ``params.num`` images; each image's ``info['parameters']`` holds its infotext."""
    params = dataclasses.replace(params)
    params.validate()
    defaults = model_defaults(pipe)
    params.steps = params.steps or defaults["steps"]
    params.guidance = defaults["guidance"] if params.guidance is None else params.guidance
    if params.seed is None:
        params.seed = random.SystemRandom().randrange(2**31)
    w0, h0 = native_size(pipe)
    width, height = params.width or w0, params.height or h0
    f = vae_factor(pipe)
    if width <= 0 or height <= 0 or width % f or height % f:
        raise StudioError(f"--size {width}x{height}: width and height must be positive multiples of {f} for this "
                          f"model (its native size is {w0}x{h0})")
    if width * height > 4096 * 4096:
        raise StudioError(f"--size {width}x{height}: too large; at most 4096x4096")
    if params.sampler:
        set_sampler(pipe, params.sampler)
    kind = type(pipe).__name__
    images: list[Image.Image] = []
    device = getattr(pipe, "device", torch.device("cpu"))
    gen_device = "cpu" if device.type == "mps" else device
    for start in range(0, params.num, params.batch_size):
        seeds = [params.seed + i for i in range(start, min(params.num, start + params.batch_size))]
        # one generator per image: image i is the same whatever the batch size (A1111: seed + i)
        gens = [torch.Generator(device=gen_device).manual_seed(s) for s in seeds]
        kwargs: dict[str, Any] = dict(num_inference_steps=params.steps, generator=gens, output_type="pil")
        if kind == "LDMPipeline":
            if params.prompt:
                log.warning("this LDM model is unconditional: the prompt is ignored")
            out = pipe(batch_size=len(seeds), **kwargs).images
        else:
            kwargs.update(height=height, width=width, guidance_scale=params.guidance)
            if kind != "LDMTextToImagePipeline":
                kwargs["negative_prompt"] = [params.negative] * len(seeds) if params.negative else None
            elif params.negative:
                log.warning("LDMTextToImagePipeline has no negative prompt: it is ignored")
            if callback is not None and kind != "LDMTextToImagePipeline":
                kwargs["callback_on_step_end"] = callback
            out = pipe([params.prompt] * len(seeds), **kwargs).images
        for s, im in zip(seeds, out):
            im.info["parameters"] = infotext(params, s, im.width, im.height, pipe, extra_info)
            images.append(im)
    return images


def save_images(images: Sequence[Image.Image], out_dir: str | Path) -> list[Path]:
    """Write PNGs named NNNNN-SEED.png (continuing the folder's numbering), with infotext."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StudioError(f"--out {out}: cannot create the output folder ({exc.strerror}); choose another") from exc
    if not os.access(out, os.W_OK):
        raise StudioError(f"--out {out}: the output folder is not writable; choose another")
    existing = [int(m.group(1)) for p in out.glob("*.png") if (m := re.match(r"(\d{5})-", p.name))]
    index = max(existing, default=-1) + 1
    paths = []
    for im in images:
        text = im.info.get("parameters", "")
        seed = re.search(r"Seed: (\d+)", text)
        path = out / f"{index:05d}-{seed.group(1) if seed else 'x'}.png"
        meta = PngImagePlugin.PngInfo()
        meta.add_text("parameters", text)
        tmp = path.with_suffix(".png.tmp")
        im.save(tmp, format="PNG", pnginfo=meta)
        os.replace(tmp, path)  # never a half-written PNG under the final name
        paths.append(path)
        index += 1
    return paths
