"""Text-to-image generation on any loaded family, with A1111-style infotext in the PNGs.

``generate(pipe, GenerationParams(...))`` returns PIL images, each carrying its parameters;
``save_images`` writes them as PNGs with the ``parameters`` text chunk that A1111, ComfyUI
and image browsers read.
"""

from __future__ import annotations

import contextlib
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
    adapters: list[Any] = dataclasses.field(default_factory=list)  # spec strings or studio.mixing.AdapterSpec
    seeds: list[int] | None = None  # explicit seeds, one image each (instead of seed, seed+1, ... num)
    decor: str = ""  # DECOR: unwanted words/phrases, comma-separated, projected out of the prompt (studio.text)
    decor_alpha: float = 1.0  # studio.text.decor.DEFAULT_ALPHA
    decor_rows: str = "words"
    decor_pooled: bool = False
    decor_center: bool = False

    def decor_config(self) -> Any:
        """The :class:`studio.text.decor.DecorConfig` of these parameters, or None without ``decor``."""
        if not self.decor.strip():
            return None
        from studio.text.decor import DecorConfig

        return DecorConfig(self.decor, alpha=self.decor_alpha, rows=self.decor_rows, pooled=self.decor_pooled,
                           center=self.decor_center)

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
        if self.seeds is not None and (not self.seeds or any(s < 0 for s in self.seeds)):
            raise StudioError(f"--seeds {','.join(map(str, self.seeds))}: give one or more seeds >= 0")
        from studio.mixing import as_spec

        for a in self.adapters:
            as_spec(a)  # a bad spec fails before the model loads
        self.decor_config()


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


def file_sha256(path: str | Path, data_only: bool = False) -> str:
    """sha256 of a file, cached per (path, size, mtime) in memory and under STUDIO_HOME.

    ``data_only``: of a .safetensors file's tensor data, without its header (sd-scripts'
    ``sshs_model_hash``, which A1111 shows as a LoRA's hash).
    """
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()) + ("#data" if data_only else ""), st.st_size, st.st_mtime)
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
            if data_only:
                fh.seek(8 + int.from_bytes(fh.read(8), "little"))
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
    """Generate ``params.num`` images (or one per ``params.seeds``); each image's ``info['parameters']`` holds its infotext.

    Adapters come from ``params.adapters`` and from ``<lora:SPEC>`` tags in the prompt (taken out
    of the text the model sees); they are mixed in for this call only (:mod:`studio.mixing`).
    ``params.decor`` projects the unwanted words out of the prompt embeddings (DECOR,
    :mod:`studio.text.pipeline`), on top of the adapters.
    """
    from studio.mixing import Mixer, as_spec, parse_prompt
    from studio.text.pipeline import decor_applied, infotext_fields

    params = dataclasses.replace(params)
    params.validate()
    params.prompt, tagged = parse_prompt(params.prompt)
    params.adapters = [as_spec(a) for a in params.adapters] + tagged
    defaults = model_defaults(pipe)
    params.steps = params.steps or defaults["steps"]
    params.guidance = defaults["guidance"] if params.guidance is None else params.guidance
    if params.seed is None:
        params.seed = params.seeds[0] if params.seeds else random.SystemRandom().randrange(2**31)
    seeds_all = list(params.seeds) if params.seeds else [params.seed + i for i in range(params.num)]
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
    info = dict(extra_info or {})
    mix = None
    with contextlib.ExitStack() as stack:
        if params.adapters:
            mix = stack.enter_context(Mixer(pipe, params.adapters))
            info.update(mix.infotext_fields())
        decor = params.decor_config()
        if decor is not None:
            # on the prompt-embedding path: the adapters above act inside the text encoders as usual
            stack.enter_context(decor_applied(pipe, decor))
            info.update(infotext_fields(decor))
        images = _run(pipe, params, seeds_all, width, height, callback)
        gates = mix.gate_means() if mix is not None else {}
    if gates:  # known only after the run: each gated adapter's mean gate (AutoLoRA), as the UI shows it
        info["Gates"] = ", ".join(f"{name}: {g:.3f}" for name, g in gates.items())
    for s, im in zip(seeds_all, images, strict=True):
        im.info["parameters"] = infotext(params, s, im.width, im.height, pipe, info)
    return images


def _run(pipe: Any, params: GenerationParams, seeds_all: list[int], width: int, height: int,
         callback: Any) -> list[Image.Image]:
    kind = type(pipe).__name__
    images: list[Image.Image] = []
    device = getattr(pipe, "device", torch.device("cpu"))
    gen_device = "cpu" if device.type == "mps" else device
    for start in range(0, len(seeds_all), params.batch_size):
        seeds = seeds_all[start:start + params.batch_size]
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
        images.extend(out)
    return images


def generate_sweep(pipe: Any, params: GenerationParams, sweep: Any, *,
                   callback: Any = None) -> tuple[list[list[Image.Image]], Image.Image]:
    """An XY grid: rows are the seeds, columns the swept adapter's weights (``sweep``: text or a Sweep).

    The swept adapter replaces any adapter of the same name in ``params`` or in the prompt's tags.
    ``callback``: as for :func:`generate`, called through every column. Returns (images by row,
    the labelled grid, whose infotext names the sweep).
    """
    from studio.mixing import Sweep, as_spec, parse_prompt, parse_sweep

    sweep = sweep if isinstance(sweep, Sweep) else parse_sweep(sweep)
    params.validate()
    prompt, tagged = parse_prompt(params.prompt)
    others = [a for a in [as_spec(a) for a in params.adapters] + tagged if a.target != sweep.spec.target]
    seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**31)
    seeds = list(params.seeds) if params.seeds else [seed + i for i in range(params.num)]
    columns = [generate(pipe, dataclasses.replace(params, prompt=prompt, adapters=others + [spec], seeds=seeds),
                        callback=callback) for spec in sweep.specs()]
    rows = [[col[r] for col in columns] for r in range(len(seeds))]
    name = sweep.spec.target if not Path(sweep.spec.target).exists() else Path(sweep.spec.target).name
    grid = image_grid(rows, [f"seed {s}" for s in seeds], [f"{name} {v:g}" for v in sweep.values])
    first = rows[0][0].info.get("parameters", "")
    values = ",".join(f"{v:g}" for v in sweep.values)
    grid.info["parameters"] = f"{first}, Sweep: {_quote(f'{sweep.spec}={values}')}"
    return rows, grid


def image_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str],
               col_labels: Sequence[str]) -> Image.Image:
    """Tile images into a grid with a label above each column and left of each row (PIL only)."""
    from PIL import ImageDraw, ImageFont

    tile_w = max(im.width for row in rows for im in row)
    tile_h = max(im.height for row in rows for im in row)
    font = ImageFont.load_default(size=max(10, min(tile_h // 6, 24)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        box = measure.textbbox((0, 0), text, font=font)
        return box[2] - box[0], box[3] - box[1]

    pad = 4
    cell_w = max([tile_w] + [size(t)[0] + 2 * pad for t in col_labels])
    label_w = max([size(t)[0] for t in row_labels] + [0]) + 2 * pad
    header_h = max([size(t)[1] for t in col_labels] + [0]) + 2 * pad
    grid = Image.new("RGB", (label_w + cell_w * len(col_labels), header_h + tile_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, text in enumerate(col_labels):
        draw.text((label_w + c * cell_w + (cell_w - size(text)[0]) // 2, pad), text, fill="black", font=font)
    for r, row in enumerate(rows):
        y = header_h + r * tile_h
        draw.text((pad, y + (tile_h - size(row_labels[r])[1]) // 2), row_labels[r], fill="black", font=font)
        for c, im in enumerate(row):
            grid.paste(im.convert("RGB"), (label_w + c * cell_w + (cell_w - im.width) // 2, y))
    return grid


def save_grid(grid: Image.Image, path: str | Path) -> Path:
    """Write a grid PNG atomically, with its infotext."""
    return write_png(grid, png_path(path, "--grid", "the grid"))


def png_path(path: str | Path, flag: str, what: str) -> Path:
    """``path`` checked to name a PNG file, its folder made; errors name ``flag`` and ``what`` is written."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise StudioError(f"{flag} {path}: {what} is written as PNG; give a .png file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StudioError(f"{flag} {path}: cannot create its folder ({exc.strerror}); choose another") from exc
    return path


def write_png(im: Image.Image, path: Path) -> Path:
    """Write ``im`` as a PNG atomically, with its ``info['parameters']`` infotext (empty when it has none)."""
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", im.info.get("parameters", ""))
    tmp = path.with_suffix(".png.tmp")
    im.save(tmp, format="PNG", pnginfo=meta)
    os.replace(tmp, path)  # never a half-written PNG under the final name
    return path


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
        paths.append(write_png(im, out / f"{index:05d}-{seed.group(1) if seed else 'x'}.png"))
        index += 1
    return paths
