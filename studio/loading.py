"""Load any supported base model as an ordinary diffusers pipeline.

``load_pipeline(spec)`` takes ``micro`` (the embedded model), a local diffusers folder, a single
checkpoint file, or a hub id (only when online). The family (sd1, sd2, sdxl, ldm) is detected
from the components, never asked for. Every failure that is the user's to fix raises a
:class:`~studio.errors.StudioError` naming the input and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from studio.errors import StudioError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
MICRO_DIR = ASSETS / "micro"
FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl", "ldm")
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when present, else CPU; a named device that is not there is a StudioError."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device))
    except RuntimeError as exc:
        raise StudioError(f"--device {device}: not a device name; use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise StudioError(f"--device {device}: no CUDA device on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise StudioError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise StudioError(f"--device {device}: no Apple MPS device on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise StudioError(f"--device {device}: unsupported device type; use cpu, cuda or mps")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere unless asked (bf16 on CPU pays only on some CPUs: see README)."""
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise StudioError(f"--dtype {dtype}: unknown dtype; use fp32, fp16 or bf16")
    return DTYPES[dtype]


@dataclasses.dataclass
class ModelSource:
    """Where a pipeline came from, kept on the pipeline as ``pipe.studio_source``."""

    spec: str
    kind: str  # micro | folder | quantized | file | hub
    path: str
    family: str


def detect_family(pipe: Any) -> str:
    """The family of a loaded pipeline: sd1, sd2, sdxl or ldm."""
    comps = getattr(pipe, "components", {})
    if "text_encoder_2" in comps or "StableDiffusionXL" in type(pipe).__name__:
        return "sdxl"
    if "vqvae" in comps or type(pipe).__name__.startswith("LDM"):
        return "ldm"
    unet = comps.get("unet")
    te = comps.get("text_encoder")
    if unet is not None and hasattr(unet, "config"):
        sched = comps.get("scheduler")
        v_pred = getattr(getattr(sched, "config", None), "prediction_type", "epsilon") == "v_prediction"
        linear = bool(unet.config.get("use_linear_projection", False))
        gelu = getattr(getattr(te, "config", None), "hidden_act", "quick_gelu") == "gelu"
        # SD 2.x: OpenCLIP text encoder (gelu), linear projections in the transformer blocks,
        # and v-prediction for the 768px models; SD 1.x has none of the three
        return "sd2" if (v_pred or linear or gelu) else "sd1"
    raise StudioError(f"{type(pipe).__name__}: unknown model family; supported: {', '.join(FAMILIES)}")


def _read_model_index(folder: Path) -> dict:
    index = folder / "model_index.json"
    if not index.is_file():
        raise StudioError(
            f"{folder}: not a diffusers model folder (no model_index.json); point --base at the folder "
            f"that holds model_index.json, or at a .safetensors checkpoint file"
        )
    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StudioError(f"{index}: malformed JSON ({exc}); re-download or re-save the model folder") from exc
    if not isinstance(data, dict) or "_class_name" not in data:
        raise StudioError(f"{index}: no _class_name entry; this is not a diffusers model_index.json")
    for name, value in data.items():
        if name.startswith("_") or not isinstance(value, list) or value == [None, None]:
            continue
        if not (folder / name).is_dir():
            raise StudioError(f"{folder}: component folder '{name}/' named in model_index.json is missing; "
                              f"re-download or re-save the model folder")
    return data


def _from_folder(folder: Path, dtype: torch.dtype) -> Any:
    from diffusers import DiffusionPipeline

    index = _read_model_index(folder)
    supported = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "LDMTextToImagePipeline", "LDMPipeline")
    if index["_class_name"] not in supported:
        raise StudioError(
            f"{folder}: {index['_class_name']} is not a supported family; supported pipelines: {', '.join(supported)}"
        )
    kwargs: dict[str, Any] = {"local_files_only": True, "torch_dtype": dtype}
    if index["_class_name"] == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        return DiffusionPipeline.from_pretrained(str(folder), **kwargs)
    except StudioError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StudioError(f"{folder}: cannot load this model folder ({first[:300]}); "
                          f"check that every component's weights and config are complete") from exc


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub answers; False at once when HF_HUB_OFFLINE is set."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _from_hub(repo_id: str, dtype: torch.dtype) -> Any:
    from diffusers import DiffusionPipeline

    try:  # a copy already in the local cache works offline too
        return DiffusionPipeline.from_pretrained(repo_id, local_files_only=True, torch_dtype=dtype)
    except Exception:  # noqa: BLE001 - any failure here just means "not cached"
        pass
    if not hub_reachable():
        raise StudioError(
            f"{repo_id}: looks like a hub id, but the hub cannot be reached (offline). Download it on a machine "
            f"that is online (e.g. `huggingface-cli download {repo_id} --local-dir DIR`) and pass --base DIR, "
            f"or pass a single .safetensors checkpoint file"
        )
    try:
        return DiffusionPipeline.from_pretrained(repo_id, torch_dtype=dtype)
    except Exception as exc:  # noqa: BLE001
        raise StudioError(f"{repo_id}: could not be loaded from the hub ({str(exc).splitlines()[0][:300]})") from exc


def _is_quantized(folder: Path) -> bool:
    """Whether ``folder`` was written by `studio quantize` (its marker file, studio_quant.json)."""
    return (folder / "studio_quant.json").is_file()


def resolve_spec(spec: str) -> tuple[str, Path | None]:
    """Classify a model spec: ('micro'|'folder'|'file'|'hub', path)."""
    if spec == "micro":
        return "micro", MICRO_DIR
    path = Path(spec).expanduser()
    if path.is_dir():
        return "folder", path
    if path.is_file():
        return "file", path
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")) and not path.parent.exists():
        return "hub", None
    raise StudioError(
        f"{spec}: no such model folder or file; pass `micro`, a diffusers folder (with model_index.json), "
        f"a .safetensors checkpoint, or a hub id like owner/name"
    )


def load_pipeline(
    spec: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_pickle: bool = False,
    config: str | os.PathLike | None = None,
) -> Any:
    """Load ``spec`` (micro, folder, single file, hub id) as a diffusers pipeline on ``device``.

    ``config`` names a diffusers folder whose component configs describe a single-file
    checkpoint (by default the configs bundled in assets/configs, or those embedded in the
    file by the studio). ``.ckpt`` pickles load only with ``trust_pickle=True``.
    """
    spec = str(spec)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    kind, path = resolve_spec(spec)
    if kind == "micro":
        if not (MICRO_DIR / "model_index.json").is_file():
            raise StudioError(f"{MICRO_DIR}: the micro model's weights are missing from this checkout; "
                              f"run `studio micro pretrain --out assets` or restore assets/ from git")
        pipe = _from_folder(MICRO_DIR, dt)
    elif kind == "folder" and _is_quantized(path):
        from studio.quant.export import load_quantized  # a `studio quantize` folder: integer denoiser

        pipe = load_quantized(path, dt)
        kind = "quantized"
    elif kind == "folder":
        pipe = _from_folder(path, dt)
    elif kind == "file":
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES and not trust_pickle:
            raise StudioError(f"{path}: a pickle checkpoint can run arbitrary code when loaded; convert it to "
                              f".safetensors, or pass --trust-pickle if you trust its source")
        if suffix not in PICKLE_SUFFIXES + (".safetensors",):
            raise StudioError(f"{path}: not a checkpoint (expected .safetensors, or .ckpt with --trust-pickle) "
                              f"nor a diffusers folder")
        from studio.single_file import load_single_file

        pipe = load_single_file(path, dtype=dt, trust_pickle=trust_pickle, config=config)
    else:
        pipe = _from_hub(spec, dt)
    family = detect_family(pipe)
    pipe.to(dev)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    pipe.studio_source = ModelSource(spec=spec, kind=kind, path=str(path) if path else spec, family=family)
    log.debug("loaded %s (%s, %s) on %s as %s", spec, kind, family, dev, dt)
    return pipe
