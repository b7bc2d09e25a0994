"""Full-size, randomly initialised SD 1.5, SD 2.1 (768-v) and SDXL base checkpoints, built offline.

The weights of the real models cannot be downloaded here, but their architectures can be built
from the configs bundled in ``assets/configs`` with seeded random weights. :func:`make` writes one
model on demand to a cache folder (never to the repository) in the two layouts users have:

- a diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``...), and
- an A1111/original single ``.safetensors`` file (``model.diffusion_model.*``,
  ``first_stage_model.*``, ``cond_stage_model.*`` / ``conditioner.embedders.*``), written by
  :func:`studio.single_file.save_single_file` with the configs and tokenizer embedded.

The tokenizers are the micro CLIP BPE tokenizer of :mod:`studio.testing` (about a thousand
tokens; the real 49408-token vocabulary cannot be downloaded): every id it produces is in range
of the full-size text encoders' embedding tables.

``width_div`` builds the same architecture with every width divided (blocks, layers, attention
levels and so key names unchanged), so tests can check the real key layout in seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from studio.errors import StudioError

log = logging.getLogger(__name__)

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "assets" / "configs"


@dataclasses.dataclass(frozen=True)
class RealModel:
    """One full-size model: its bundled config folder, family, single-file name and native size."""

    name: str
    configs: str  # folder under assets/configs
    family: str  # sd1 | sd2 | sdxl (studio.loading's families)
    file_name: str  # the single file's name; SD 2.1's says 768-v, which is how A1111 users tell it apart
    resolution: int
    prediction_type: str


MODELS: dict[str, RealModel] = {
    "sd15": RealModel("sd15", "sd15", "sd1", "sd15.safetensors", 512, "epsilon"),
    "sd21": RealModel("sd21", "sd21-v", "sd2", "sd21-768-v.safetensors", 768, "v_prediction"),
    "sdxl": RealModel("sdxl", "sdxl", "sdxl", "sdxl-base.safetensors", 1024, "epsilon"),
}
DONE_FILE = "realsize.json"  # written last: a folder without it is incomplete and is rebuilt


def get_model(name: str) -> RealModel:
    """The :class:`RealModel` called ``name`` (sd15, sd21, sdxl), or a StudioError listing them."""
    if name not in MODELS:
        raise StudioError(f"{name}: unknown real-size model; choose one of {', '.join(MODELS)}")
    return MODELS[name]


def cache_dir() -> Path:
    """Where built models go: $STUDIO_REALSIZE_DIR, else $STUDIO_HOME/cache/realsize when STUDIO_HOME
    is set, else ~/.cache/diffusion-studio/realsize (several GB per model: never inside the repository)."""
    if os.environ.get("STUDIO_REALSIZE_DIR"):
        return Path(os.environ["STUDIO_REALSIZE_DIR"])
    home = os.environ.get("STUDIO_HOME")
    if home:
        return Path(home) / "cache" / "realsize"
    return Path.home() / ".cache" / "diffusion-studio" / "realsize"


def _read(path: Path) -> dict[str, Any]:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def component_configs(name: str, width_div: int = 1) -> dict[str, dict[str, Any]]:
    """The diffusers/transformers configs of every weight-bearing component of ``name``.

    ``width_div`` > 1 divides every width (channels, hidden sizes, embedding widths) and uses two
    attention heads per block, keeping the block and layer counts, hence every key name.
    """
    model = get_model(name)
    root = CONFIGS_DIR / model.configs
    parts = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if model.family == "sdxl" else [])
    cfgs = {p: _read(root / p / "config.json") for p in parts}
    if width_div == 1:
        return cfgs
    d = int(width_div)
    if d < 1 or 320 % (d * 4) or 128 % (d * 4):
        raise StudioError(f"width_div {width_div}: must divide the widths into multiples of 4 (e.g. 2, 4, 8, 16)")

    def div(v: int) -> int:
        return int(v) // d

    unet = cfgs["unet"]
    unet["block_out_channels"] = [div(c) for c in unet["block_out_channels"]]
    unet["cross_attention_dim"] = div(unet["cross_attention_dim"])
    unet["norm_num_groups"] = 4
    unet["attention_head_dim"] = 2  # diffusers reads it as the head count of these UNets
    unet["sample_size"] = 8
    if unet.get("addition_embed_type") == "text_time":
        unet["addition_time_embed_dim"] = div(unet["addition_time_embed_dim"])
        proj = div(cfgs["text_encoder_2"]["projection_dim"])
        unet["projection_class_embeddings_input_dim"] = 6 * unet["addition_time_embed_dim"] + proj
    vae = cfgs["vae"]
    vae["block_out_channels"] = [div(c) for c in vae["block_out_channels"]]
    vae["norm_num_groups"] = 4
    vae["sample_size"] = 64
    for te in (p for p in parts if p.startswith("text_encoder")):
        c = cfgs[te]
        c.update(hidden_size=div(c["hidden_size"]), intermediate_size=div(c["intermediate_size"]),
                 projection_dim=div(c["projection_dim"]), num_attention_heads=2)
    return cfgs


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in ``dtype``: a full-size SDXL UNet is 10 GB in fp32, 5 GB in fp16."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build_pipeline(name: str, seed: int = 0, *, dtype: torch.dtype = torch.float16, width_div: int = 1) -> Any:
    """A seeded, randomly initialised ``name`` pipeline (sd15, sd21, sdxl) with the micro tokenizer."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from studio.testing import tiny_tokenizer

    model = get_model(name)
    cfgs = component_configs(name, width_div)
    root = CONFIGS_DIR / model.configs
    sched_cfg = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    with torch.device("cpu"):  # schedulers copy their tables to the CPU: never on the meta device
        scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
    comps: dict[str, Any] = {}
    with _default_dtype(dtype):
        # one seed per component, so a component is the same whatever is built beside it
        torch.manual_seed(seed)
        comps["unet"] = diffusers.UNet2DConditionModel.from_config(cfgs["unet"])
        torch.manual_seed(seed + 1)
        comps["vae"] = diffusers.AutoencoderKL.from_config(cfgs["vae"])
        torch.manual_seed(seed + 2)
        comps["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_dict(cfgs["text_encoder"]))
        if model.family == "sdxl":
            torch.manual_seed(seed + 3)
            comps["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(cfgs["text_encoder_2"]))
    for m in comps.values():
        m.eval()
    # SD 2.x and SDXL's OpenCLIP tokenizer pads with "!", CLIP-L's with <|endoftext|>
    if model.family == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(
            tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(pad="!"), scheduler=scheduler,
            force_zeros_for_empty_prompt=True, **comps)
    else:
        pipe = diffusers.StableDiffusionPipeline(
            tokenizer=tiny_tokenizer(pad="!" if model.family == "sd2" else "<|endoftext|>"), scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False, **comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def key_names(name: str, width_div: int = 1) -> dict[str, list[str]]:
    """Every component's state-dict key names, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        pipe = build_pipeline(name, width_div=width_div, dtype=torch.float32)
    return {c: list(pipe.components[c].state_dict()) for c in component_configs(name)}


def single_file_keys(name: str, width_div: int = 1) -> list[str]:
    """The tensor names of ``name``'s original-layout single file, from meta-device models."""
    from studio.single_file import convert_to_ldm

    with torch.device("meta"):
        pipe = build_pipeline(name, width_div=width_div, dtype=torch.float32)
    return list(convert_to_ldm(pipe.components, get_model(name).family))


@dataclasses.dataclass
class RealsizeFiles:
    """Where :func:`make` put a model."""

    model: str
    folder: Path  # the diffusers folder
    single_file: Path
    parameters: dict[str, int]


def model_root(name: str, seed: int = 0, width_div: int = 1, root: str | os.PathLike | None = None) -> Path:
    """The cache folder of one built model (its diffusers folder and single file live inside)."""
    suffix = f"-w{width_div}" if width_div != 1 else ""
    return Path(root) if root is not None else cache_dir() / f"{name}-seed{seed}{suffix}"


def make(name: str, out: str | os.PathLike | None = None, *, seed: int = 0, width_div: int = 1,
         force: bool = False) -> RealsizeFiles:
    """Build ``name`` and write it as a diffusers folder and a single file under ``out``.

    ``out`` defaults to :func:`model_root` in :func:`cache_dir`. A folder already holding a
    complete build with the same seed and width is reused unless ``force``. Weights are written
    in fp16 (SD 1.5 about 2 GB per layout, SDXL about 7 GB).
    """
    model = get_model(name)
    root = model_root(name, seed, width_div, out)
    root.parent.mkdir(parents=True, exist_ok=True)
    # one build of a folder at a time: a second process waits for the first and then reuses its build
    # (without the lock it took the first one's half-written folder for an interrupted build and deleted it)
    from studio.library import FileLock

    lock = FileLock(root.parent / f".{root.name}.lock")
    if not lock.acquire(timeout=0):
        log.info("%s: another process is building %s; waiting for it", name, root)
        lock.acquire(timeout=float("inf"))
    try:
        return _make_locked(name, model, root, seed, width_div, force)
    finally:
        lock.release()


def _make_locked(name: str, model: Any, root: Path, seed: int, width_div: int, force: bool) -> RealsizeFiles:
    done = root / DONE_FILE
    if done.is_file() and not force:
        info = json.loads(done.read_text())
        if info.get("seed") == seed and info.get("width_div") == width_div and info.get("model") == name:
            log.info("%s: already built in %s", name, root)
            return RealsizeFiles(name, root / "diffusers", root / model.file_name, info.get("parameters", {}))
        raise StudioError(f"{root}: holds another build ({info.get('model')} seed {info.get('seed')}); "
                          f"pass --force to replace it or choose another --out")
    building = root / ".building"
    if root.exists() and any(root.iterdir()):
        if not (done.is_file() or building.is_file()):
            raise StudioError(f"{root}: exists and is not a real-size build; choose an empty or new --out folder")
        shutil.rmtree(root)  # an incomplete earlier build, or --force
    root.mkdir(parents=True, exist_ok=True)
    building.touch()
    from studio.single_file import save_single_file

    try:
        log.info("building %s (seed %d%s)", name, seed, f", widths / {width_div}" if width_div != 1 else "")
        pipe = build_pipeline(name, seed, dtype=torch.float16, width_div=width_div)
        params = {c: sum(p.numel() for p in pipe.components[c].parameters()) for c in component_configs(name)}
        log.info("%s: %s parameters; writing %s", name, ", ".join(f"{c} {n / 1e6:.1f}M" for c, n in params.items()),
                 root)
        # shards bound the writer's buffers; fp16 is how these checkpoints are usually shipped
        pipe.save_pretrained(root / "diffusers", safe_serialization=True, max_shard_size="2GB")
        save_single_file(pipe, root / model.file_name, dtype=torch.float16)
        del pipe
        done.write_text(json.dumps({"model": name, "seed": seed, "width_div": width_div, "parameters": params,
                                    "single_file": model.file_name, "family": model.family,
                                    "prediction_type": model.prediction_type}, indent=2))
        building.unlink()
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return RealsizeFiles(name, root / "diffusers", root / model.file_name, params)


SAMPLE_SET = Path(__file__).resolve().parents[1] / "assets" / "samples" / "subject-heart-red"


def upscaled_images(size: int, src: str | os.PathLike = SAMPLE_SET, out: str | os.PathLike | None = None,
                    count: int | None = None) -> Path:
    """``src``'s images (the first ``count``) resized to ``size`` px, captions copied, for real-size runs.

    The bundled sample sets are 64 px micro-world images; the trainer rightly skips images under
    256 px, so a real-size run trains on these nearest-neighbour enlargements (sharp edges kept).
    Every image costs two VAE encodes at full size (it and its mirror are cached): a few minutes
    each on a CPU, so short runs take ``count`` of them.
    """
    from PIL import Image

    src = Path(src)
    tag = f"-{count}" if count else ""
    folder = Path(out) if out is not None else cache_dir() / f"images-{src.name}-{size}{tag}"
    pics = sorted(p for p in src.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:count]
    if not pics:
        raise StudioError(f"{src}: no images to enlarge")
    folder.mkdir(parents=True, exist_ok=True)
    for p in pics:
        target = folder / f"{p.stem}.png"
        if not target.is_file():
            with Image.open(p) as im:
                im.convert("RGB").resize((size, size), Image.NEAREST).save(target)
        if p.with_suffix(".txt").is_file():
            shutil.copyfile(p.with_suffix(".txt"), folder / f"{p.stem}.txt")
    return folder


__all__ = ["MODELS", "RealModel", "RealsizeFiles", "build_pipeline", "cache_dir", "component_configs", "get_model",
           "key_names", "make", "model_root", "single_file_keys", "upscaled_images"]
