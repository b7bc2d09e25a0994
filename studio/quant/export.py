"""A real low-bit model on disk: export after quantization, and load it back as an ordinary pipeline.

Folder layout (a diffusers folder plus a marker)::

    DIR/studio_quant.json                 marker and config: format, bits, method, the step grid,
                                          every quantized layer's spec, the job's report
    DIR/model_index.json, text_encoder/, vae/, tokenizer/, scheduler/ ...   as diffusers saves them
    DIR/unet/config.json                  the denoiser's diffusers config
    DIR/unet/studio_quant.safetensors     integer weights (int8; int4 two per byte), per-channel
                                          scales and zero points, per-step activation scales and
                                          zero points, biases, and the unquantized parameters (fp32)

``load_pipeline(DIR)`` sees the marker and calls :func:`load_quantized`; the loaded denoiser has
:class:`~studio.quant.runtime.IntQuantLayer` layers on integer kernels and its timestep hook.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from studio.errors import StudioError
from studio.hooks import listen_timestep
from studio.quant.layer import StepClock
from studio.quant.model import QuantState, _set_module
from studio.quant.runtime import IntQuantLayer, layer_spec

log = logging.getLogger(__name__)

MARKER = "studio_quant.json"
WEIGHTS = "studio_quant.safetensors"
FORMAT = "studio-quant"
VERSION = 1


def is_quantized_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by :func:`export_quantized`."""
    return (Path(path) / MARKER).is_file()


def integer_layers(unet: torch.nn.Module, state: QuantState) -> dict[str, IntQuantLayer]:
    """The integer twin of every fake-quantized layer (LoRA merged into the weight before rounding)."""
    clock = StepClock(state.clock.timesteps)
    return {name: IntQuantLayer.from_quant_layer(layer, clock) for name, layer in state.layers.items()}


def unet_tensors(unet: torch.nn.Module, state: QuantState) -> dict[str, torch.Tensor]:
    """What unet/studio_quant.safetensors holds: integer layers' buffers and every other parameter."""
    ints = integer_layers(unet, state)
    prefixes = tuple(f"{n}." for n in state.layers)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        if not key.startswith(prefixes):
            tensors[key] = value.detach().float().contiguous().cpu() if value.is_floating_point() else value.cpu()
    for name, layer in ints.items():
        for key, value in layer.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().contiguous().cpu()
    return tensors


def export_quantized(pipe: Any, out: str | os.PathLike, *, config: dict[str, Any],
                     report: dict[str, Any] | None = None) -> Path:
    """Write the quantized pipeline to ``out`` (a new or empty folder), atomically.

    Everything is written to a temporary sibling folder that is renamed into place at the end,
    so a failed export leaves nothing behind.
    """
    from safetensors.torch import save_file

    unet = pipe.unet
    state: QuantState | None = getattr(unet, "studio_quant", None)
    if state is None:
        raise StudioError("export_quantized: this pipeline's denoiser is not quantized (run quantize first)")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StudioError(f"--out {out}: exists and is not an empty folder; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_config(tmp)  # model_index.json
        for name, comp in pipe.components.items():
            if name == "unet" or comp is None:
                continue
            if hasattr(comp, "save_pretrained"):
                kw = {"safe_serialization": True} if isinstance(comp, torch.nn.Module) else {}
                comp.save_pretrained(tmp / name, **kw)
        (tmp / "unet").mkdir()
        unet.save_config(tmp / "unet")
        tensors = unet_tensors(unet, state)
        save_file(tensors, str(tmp / "unet" / WEIGHTS), metadata={"format": FORMAT})
        marker = {
            "format": FORMAT, "version": VERSION, "wbits": state.wbits, "abits": state.abits,
            "unet_class": type(unet).__name__, "timesteps": state.clock.timesteps,
            "first": state.first, "last": state.last,
            "layers": {name: layer_spec(layer) for name, layer in state.layers.items()},
            "config": config, "report": report or {},
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=1))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported the W%dA%d model to %s", state.wbits, state.abits, out)
    return out


def read_marker(folder: Path) -> dict[str, Any]:
    path = folder / MARKER
    try:
        marker = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StudioError(f"{path}: unreadable quantized-model config ({exc}); re-run studio quantize") from exc
    if marker.get("format") != FORMAT or not isinstance(marker.get("layers"), dict):
        raise StudioError(f"{path}: not a studio quantized-model config; re-run studio quantize")
    if int(marker.get("version", 0)) > VERSION:
        raise StudioError(f"{path}: written by a newer studio (format version {marker['version']}); update the studio")
    return marker


class RuntimeState:
    """What a loaded quantized denoiser carries, as ``unet.studio_quant_runtime``."""

    def __init__(self, clock: StepClock, layers: dict[str, IntQuantLayer], marker: dict[str, Any]) -> None:
        self.clock = clock
        self.layers = layers
        self.marker = marker

    def stored_bytes(self) -> int:
        return sum(layer.stored_bytes() for layer in self.layers.values())

    def resident_bytes(self) -> int:
        return sum(layer.resident_bytes() for layer in self.layers.values())


def load_quantized_unet(folder: str | os.PathLike, *, cache_unpacked: bool = False) -> torch.nn.Module:
    """The integer denoiser of an exported folder, its timestep hook installed."""
    import diffusers
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    folder = Path(folder)
    marker = read_marker(folder)
    weights = folder / "unet" / WEIGHTS
    if not weights.is_file():
        raise StudioError(f"{folder}: {weights.name} is missing from unet/; re-run studio quantize")
    cls_name = marker.get("unet_class", "UNet2DConditionModel")
    if cls_name not in ("UNet2DConditionModel", "UNet2DModel"):
        raise StudioError(f"{folder}: denoiser class {cls_name} is not supported")
    cls = getattr(diffusers, cls_name)
    config = cls.load_config(folder / "unet")
    with init_empty_weights():
        unet = cls.from_config(config)
    clock = StepClock(marker["timesteps"])
    layers: dict[str, IntQuantLayer] = {}
    for name, spec in marker["layers"].items():
        try:
            unet.get_submodule(name)
        except AttributeError as exc:
            raise StudioError(f"{folder}: layer {name} of the quantized config is not in the denoiser "
                              f"({cls_name}); the folder is inconsistent, re-run studio quantize") from exc
        layer = IntQuantLayer(spec, clock, cache_unpacked=cache_unpacked)
        _set_module(unet, name, layer)
        layers[name] = layer
    tensors = load_file(str(weights))
    missing, unexpected = unet.load_state_dict(tensors, strict=False, assign=True)
    if missing or unexpected:
        raise StudioError(f"{weights}: does not match the denoiser (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}); re-run studio quantize")
    meta = [n for n, p in list(unet.named_parameters()) + list(unet.named_buffers()) if p.device.type == "meta"]
    if meta:
        raise StudioError(f"{weights}: no values for {meta[:3]}; re-run studio quantize")
    for layer in layers.values():  # assign=True keeps the file's tensors: the kernels want int32 zero points
        layer.w_zero = layer.w_zero.to(torch.int32)
    unet.eval()
    from studio.quant import fused

    if fused.fusion_enabled():  # the fused block forwards (same function, fewer passes); STUDIO_FUSED=0: plain
        fused.fuse(unet)
    unet.studio_quant_runtime = RuntimeState(clock, layers, marker)
    listen_timestep(unet, clock.set_timestep)
    return unet


def load_quantized(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Any:
    """The whole pipeline of an exported folder, its denoiser on integer kernels."""
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    unet = load_quantized_unet(folder)
    if dtype != torch.float32:
        for name, module in unet.named_modules():  # integer layers keep fp32 scales; the rest takes dtype
            if not isinstance(module, IntQuantLayer):
                for pname, p in module.named_parameters(recurse=False):
                    setattr(module, pname, torch.nn.Parameter(p.to(dtype), requires_grad=False))
    index = json.loads((folder / "model_index.json").read_text())
    kwargs: dict[str, Any] = {"local_files_only": True, "torch_dtype": dtype, "unet": unet}
    if index.get("_class_name") == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        return DiffusionPipeline.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StudioError(f"{folder}: cannot load this quantized model folder ({first[:300]}); "
                          f"re-run studio quantize") from exc
