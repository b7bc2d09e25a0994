"""TLoRA -> plain LoRA by truncated SVD, for tools that only know LoRA (`studio convert --to diffusers|kohya`).

Each adapted layer's whole update ``U = W0 T + s Delta - W0`` (which needs the base weights, so
the base model is loaded) is cut to its best rank-``r`` approximation ``U_r`` (Eckart-Young),
written as ``up = U_r-side * sqrt(S)``, ``down = sqrt(S) * V-side`` with alpha = rank (scale 1).
The relative error ``||U - U_r||_F / ||U||_F`` of every layer is returned for the caller to print.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from studio.errors import StudioError


@dataclasses.dataclass(frozen=True)
class LayerError:
    """The SVD approximation of one layer's update."""

    layer: str  # component.module
    rank: int
    rel_error: float


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down (r x in'), up (out x r), relative Frobenius error) of the best rank-``r`` approximation of
    ``delta`` flattened to (out x in'); ``r`` is cut to the matrix's own rank bound."""
    m = delta.reshape(delta.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    r = min(rank, s.shape[0])
    root = s[:r].sqrt()
    up, down = u[:, :r] * root, root[:, None] * vh[:r]
    norm = torch.linalg.norm(m)
    err = float(torch.linalg.norm(m - up @ down) / norm) if norm > 0 else 0.0
    return down.float(), up.float(), err


def export_lora(adapter: str | os.PathLike, out: str | os.PathLike, *, to: str = "diffusers", rank: int = 16,
                base: str | None = None) -> tuple[Path, list[LayerError]]:
    """Write a TLoRA adapter as a LoRA of ``rank`` in the diffusers or kohya layout; returns (path, errors)."""
    from peft import LoraConfig

    from studio.adapters import core
    from studio.adapters.tlora.layer import TLoraLayer
    from studio.loading import load_pipeline

    if rank <= 0:
        raise StudioError(f"--rank {rank}: must be a positive integer")
    meta = core.read_metadata(adapter)
    if meta.get(f"{core.META_PREFIX}method") != "tlora":
        raise StudioError(f"{adapter}: not a TLoRA adapter")
    spec = base or meta.get(f"{core.META_PREFIX}base")
    if not spec:
        raise StudioError(f"{adapter}: the file does not name its base model; pass --base")
    pipe = load_pipeline(spec, device="cpu", dtype="fp32")
    core.load_adapter(pipe, adapter, "tlora")
    models = core.adapted_models(pipe)
    pairs: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    errors: list[LayerError] = []
    with torch.no_grad():
        for comp, model in models.items():
            for name, layer in core.tuner_layers(model):
                if isinstance(layer, TLoraLayer) and "tlora" in layer.tlora_T:
                    down, up, err = svd_factors(layer.get_delta_weight("tlora").float(), rank)
                    pairs.setdefault(comp, {})[name] = (down, up)
                    errors.append(LayerError(f"{comp}.{name}", down.shape[0], err))
    trigger = core._registry(pipe)["tlora"].get("trigger")
    core._registry(pipe)["tlora"].pop("trigger", None)  # it moves to the LoRA below
    core.remove_adapter(pipe, "tlora")
    for model in models.values():  # PEFT leaves the emptied wrappers in place; the LoRA goes on the bare layers
        for name, layer in list(core.tuner_layers(model)):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, layer.get_base_layer())
    configs = {}
    for comp, layers in pairs.items():
        ranks = {n: d.shape[0] for n, (d, _) in layers.items()}
        cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(layers),
                         rank_pattern={_exact(n): r for n, r in ranks.items() if r != rank},
                         alpha_pattern={_exact(n): r for n, r in ranks.items() if r != rank})
        core._inject(models[comp], cfg, "svd")
        configs[comp] = cfg
        for name, (down, up) in layers.items():
            lyr = models[comp].get_submodule(name)
            shape = lyr.lora_A["svd"].weight.shape
            lyr.lora_A["svd"].weight.data.copy_(down.reshape(shape))
            lyr.lora_B["svd"].weight.data.copy_(up.reshape(lyr.lora_B["svd"].weight.shape))
    entry = {"method": "lora", "configs": configs}
    if trigger is not None:
        entry["trigger"] = trigger
    core._registry(pipe)["svd"] = entry
    keep = {k[len(core.META_PREFIX):]: v for k, v in meta.items()
            if k.startswith(core.META_PREFIX) and not k.startswith(f"{core.META_PREFIX}peft_config")
            and k != f"{core.META_PREFIX}method" and not k.startswith(f"{core.META_PREFIX}trigger")}
    keep.update({"converted_from": "tlora", "svd_rank": str(rank),
                 "svd_max_rel_error": f"{max((e.rel_error for e in errors), default=0.0):.6f}"})
    with tempfile.TemporaryDirectory(prefix="studio-tlora-svd-") as tmp:
        written = core.save_adapter(pipe, tmp, "svd", metadata=keep)
        out = Path(out)
        if to == "kohya":
            from studio.formats.kohya import to_kohya

            unet = core.denoiser(pipe)
            family = getattr(getattr(pipe, "studio_source", None), "family", None)
            path = to_kohya(written, out if out.suffix == ".safetensors" else out / f"{Path(adapter).stem}.safetensors",
                            family=family, unet_config=dict(unet.config))
        elif to == "diffusers":
            path = out if out.suffix == ".safetensors" else out / core.LORA_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(written, path)
        else:
            raise StudioError(f"--to {to}: choose diffusers or kohya")
    return path, errors


def _exact(name: str) -> str:
    # PEFT reads rank_pattern keys as regexes matched at the end of a module name
    import re

    return re.escape(name)


def summary(errors: list[LayerError]) -> dict[str, Any]:
    """Mean and worst relative error over the layers."""
    vals = [e.rel_error for e in errors]
    return {"layers": len(vals), "mean": sum(vals) / len(vals) if vals else 0.0, "max": max(vals, default=0.0)}
