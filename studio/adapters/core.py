"""Put adapters into a pipeline, save and load them, merge and unmerge them.

Injection, per-adapter bookkeeping, save/load of weights and merging come from PEFT (through
diffusers' and transformers' adapter mixins); this module decides *where* (denoiser, text
encoders), checks the user's settings against the model, and writes files that vanilla
diffusers loads (LoRA, DoRA) or that carry their PEFT config in the header (LoHa, LoKr, ...).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from studio.adapters.methods import TARGET_SETS, TEXT_ATTENTION, AdapterSettings, get_method
from studio.adapters.trigger import TriggerEmbeddings
from studio.errors import StudioError
from studio.fileio import write_safetensors

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name: `pipe.load_lora_weights(folder)` finds it
STUDIO_FILE = "studio_adapter.safetensors"  # methods vanilla diffusers cannot read
META_PREFIX = "studio."


def denoiser(pipe: Any) -> torch.nn.Module:
    """The pipeline's denoiser (UNet, or transformer for DiT families)."""
    model = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if model is None:
        raise StudioError(f"{type(pipe).__name__}: no UNet or transformer to adapt")
    return model


def text_encoders(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's text encoders by component name (text_encoder, text_encoder_2)."""
    out = {}
    for name in ("text_encoder", "text_encoder_2", "bert"):
        te = getattr(pipe, name, None)
        if isinstance(te, torch.nn.Module):
            out[name] = te
    return out


def adapted_models(pipe: Any) -> dict[str, torch.nn.Module]:
    """Component name -> module, for every component that may carry adapters."""
    return {"unet": denoiser(pipe), **text_encoders(pipe)}


def tuner_layers(model: torch.nn.Module) -> Iterator[tuple[str, Any]]:
    """PEFT tuner layers inside ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            yield name, module


def _matching_layers(model: torch.nn.Module, targets: tuple[str, ...]) -> list[tuple[str, torch.nn.Module]]:
    found = []
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if hasattr(module, "get_base_layer"):  # already wrapped by another adapter
            module = module.get_base_layer()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            found.append((name, module))
    return found


def _in_blocks(layers: list[tuple[str, torch.nn.Module]], blocks: Sequence[str]) -> list[tuple[str, torch.nn.Module]]:
    """The layers under any of the module-name prefixes ``blocks``; a prefix that matches none is an error."""
    kept = []
    for b in blocks:
        mine = [(n, m) for n, m in layers if n == b or n.startswith(b + ".")]
        if not mine:
            tops = sorted({".".join(n.split(".")[:2]) if n.split(".")[0].endswith("blocks") else n.split(".")[0]
                           for n, _ in layers})
            raise StudioError(f"--blocks {b}: no adapted layer of the denoiser is under it; blocks with "
                              f"such layers: {', '.join(tops)}")
        kept += [nm for nm in mine if nm not in kept]
    return kept


def _check_rank(settings: AdapterSettings, layers: list[tuple[str, torch.nn.Module]], where: str) -> None:
    if not layers:
        raise StudioError(f"--targets {settings.targets}: no layer of the {where} matches; "
                          f"choose another target set ({', '.join(TARGET_SETS)})")
    name, module = min(layers, key=lambda nm: min(_dims(nm[1])))
    smallest = min(_dims(module))
    if settings.rank > smallest:
        raise StudioError(f"--rank {settings.rank}: larger than the smallest adapted layer of the {where} "
                          f"({name}, {' x '.join(map(str, _dims(module)))}); use --rank {smallest} or less")


def _dims(m: torch.nn.Module) -> tuple[int, int]:
    if isinstance(m, torch.nn.Linear):
        return m.in_features, m.out_features
    return m.in_channels, m.out_channels


def check_settings(pipe: Any, method: str, settings: AdapterSettings) -> tuple[str, ...]:
    """Check ``settings`` against the pipeline without touching it: the method exists, the targets
    and ``--blocks`` match layers, the rank fits the smallest of them (text encoders too when
    they are adapted). Returns the denoiser's PEFT target names. Trainers call it right after
    loading, so a bad setting is said before minutes of caching."""
    get_method(method)
    targets = TARGET_SETS[settings.targets]
    layers = _matching_layers(denoiser(pipe), targets)
    if settings.blocks:
        layers = _in_blocks(layers, settings.blocks)
        targets = tuple(name for name, _ in layers)  # PEFT matches a full module name exactly
    _check_rank(settings, layers, "denoiser")
    if settings.text_encoder:
        for name, te in text_encoders(pipe).items():
            _check_rank(settings, _matching_layers(te, TEXT_ATTENTION), name)
    return targets


def add_adapter(pipe: Any, method: str, settings: AdapterSettings, adapter_name: str = "default") -> list[torch.nn.Parameter]:
    """Inject a new adapter; returns its trainable parameters (the base stays frozen)."""
    m = get_method(method)
    registry = _registry(pipe)
    if adapter_name in registry:
        raise StudioError(f"adapter name {adapter_name!r} is already in use on this pipeline")
    targets = check_settings(pipe, method, settings)
    configs = {"unet": m.make_config(settings, targets)}
    if settings.text_encoder:
        for name in text_encoders(pipe):
            configs[name] = m.make_config(settings, TEXT_ATTENTION)
    models = adapted_models(pipe)
    for comp, cfg in configs.items():
        models[comp].requires_grad_(False)
        _inject(models[comp], cfg, adapter_name)
        if m.after_inject is not None:
            m.after_inject(models[comp], adapter_name, settings, comp)
    registry[adapter_name] = {"method": method, "configs": configs}
    params = []
    for comp in configs:
        for pname, p in models[comp].named_parameters():
            if f".{adapter_name}." in pname or pname.endswith(f".{adapter_name}"):
                p.requires_grad_(True)
                params.append(p)
    return params


def no_decay_groups(groups: list[dict]) -> list[dict]:
    """Optimizer groups with the parameters marked ``no_weight_decay`` moved into twins with weight_decay 0.

    TLoRA's transform cores are marked: decay pulls a parameter towards zero, and a zero transform
    is a zero layer, not the base model.
    """
    out = []
    for g in groups:
        keep = [p for p in g["params"] if not getattr(p, "no_weight_decay", False)]
        free = [p for p in g["params"] if getattr(p, "no_weight_decay", False)]
        if keep or not free:
            out.append({**g, "params": keep})
        if free:
            out.append({**g, "params": free, "weight_decay": 0.0})
    return out


def _inject(model: torch.nn.Module, cfg: Any, adapter_name: str) -> None:
    """diffusers models through their adapter mixin (so set_adapters & co. know the adapter);
    transformers text encoders straight through PEFT (transformers 5's mixin wants peft >= 0.22)."""
    from diffusers import ModelMixin

    if isinstance(model, ModelMixin):
        model.add_adapter(cfg, adapter_name=adapter_name)
    else:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(cfg, model, adapter_name=adapter_name)


def _registry(pipe: Any) -> dict[str, dict]:
    if not hasattr(pipe, "_studio_adapters"):
        pipe._studio_adapters = {}
    return pipe._studio_adapters


def adapter_names(pipe: Any) -> list[str]:
    """Names of the adapters the studio put into this pipeline."""
    return list(_registry(pipe))


def adapter_state_dict(pipe: Any, adapter_name: str = "default") -> dict[str, dict[str, torch.Tensor]]:
    """Component -> PEFT state dict (keys without the adapter name) of one adapter."""
    from peft.utils import get_peft_model_state_dict

    entry = _registry(pipe).get(adapter_name)
    if entry is None:
        raise StudioError(f"no adapter named {adapter_name!r} on this pipeline")
    models = adapted_models(pipe)
    return {comp: get_peft_model_state_dict(models[comp], adapter_name=adapter_name) for comp in entry["configs"]}


def _config_json(cfg: Any) -> str:
    d = cfg.to_dict()
    return json.dumps({k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}, default=str)


def save_adapter(pipe: Any, folder: str | os.PathLike, adapter_name: str = "default",
                 metadata: dict[str, Any] | None = None) -> Path:
    """Write one adapter into ``folder`` atomically; returns the weights file.

    LoRA/DoRA go to ``pytorch_lora_weights.safetensors`` in diffusers' layout (``unet.…``,
    ``text_encoder.…``) with diffusers' adapter metadata, so ``pipe.load_lora_weights(folder)``
    of vanilla diffusers reads them; other methods go to ``studio_adapter.safetensors``. The
    studio's metadata (method, trigger, base, training config…) rides in the header as
    ``studio.*`` string entries.
    """
    entry = _registry(pipe)[adapter_name]
    method = get_method(entry["method"])
    states = adapter_state_dict(pipe, adapter_name)
    tensors: dict[str, torch.Tensor] = {}
    for comp, sd in states.items():
        for k, v in sd.items():
            tensors[f"{comp}.{k}"] = v.detach().to("cpu").contiguous()
    header: dict[str, str] = {f"{META_PREFIX}method": entry["method"]}
    for comp, cfg in entry["configs"].items():
        header[f"{META_PREFIX}peft_config.{comp}"] = _config_json(cfg)
    if method.diffusers_loadable:
        # diffusers reads rank/alpha of each component from this entry (diffusers >= 0.34)
        header["lora_adapter_metadata"] = json.dumps(
            {f"{comp}.{k}": v for comp, cfg in entry["configs"].items() for k, v in json.loads(_config_json(cfg)).items()}
        )
        header["format"] = "pt"
    trig = entry.get("trigger")
    if trig is not None:
        tensors.update(trig.tensors())
        header.update(trig.header(pipe))
    for k, v in (metadata or {}).items():
        header[f"{META_PREFIX}{k}"] = v if isinstance(v, str) else json.dumps(v, default=str)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (LORA_FILE if method.diffusers_loadable else STUDIO_FILE)
    return write_safetensors(path, tensors, header)


def adapter_file(path: str | os.PathLike) -> Path:
    """The weights file of an adapter folder or file path."""
    p = Path(path)
    if p.is_dir():
        for name in (LORA_FILE, STUDIO_FILE):
            if (p / name).is_file():
                return p / name
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise StudioError(f"{p}: no adapter file ({LORA_FILE} or {STUDIO_FILE}) in this folder")
    if not p.is_file():
        raise StudioError(f"{p}: no such adapter file or folder")
    if p.suffix != ".safetensors":
        raise StudioError(f"{p}: adapters are read from .safetensors files; convert it first")
    return p


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors header metadata of an adapter (all keys, studio.* included)."""
    f = adapter_file(path)
    try:
        with safe_open(str(f), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds on a bad header
        raise StudioError(f"{f}: not a valid .safetensors file ({exc})") from exc


def _peft_config_from_json(text: str) -> Any:
    from peft import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    d = json.loads(text)
    cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(d.get("peft_type"), PeftConfig)
    fields = getattr(cls, "__dataclass_fields__", {})
    return cls(**{k: v for k, v in d.items() if k in fields and k not in ("peft_type", "auto_mapping")})


def load_adapter(pipe: Any, path: str | os.PathLike, adapter_name: str = "default", trigger: bool = True) -> str:
    """Load an adapter written by :func:`save_adapter` (any method) into the pipeline.

    ``trigger=False`` leaves a learned trigger embedding out (the mixer installs those itself).

    Files the studio did not write (community diffusers or kohya LoRAs) go through diffusers'
    own ``load_lora_weights``, which converts the common layouts.
    """
    from peft.utils import set_peft_model_state_dict

    f = adapter_file(path)
    meta = read_metadata(f)
    if adapter_name in _registry(pipe):
        raise StudioError(f"adapter name {adapter_name!r} is already in use on this pipeline")
    if f"{META_PREFIX}method" not in meta:
        try:
            pipe.load_lora_weights(str(f), adapter_name=adapter_name)
        except Exception as exc:  # noqa: BLE001
            raise StudioError(f"{f}: could not be loaded as a LoRA ({str(exc).splitlines()[0][:200]})") from exc
        _registry(pipe)[adapter_name] = {"method": "lora", "configs": {}}
        return adapter_name
    tensors = load_file(str(f))
    models = adapted_models(pipe)
    configs = {}
    for key, text in meta.items():
        if not key.startswith(f"{META_PREFIX}peft_config."):
            continue
        comp = key.split(".", 2)[2]
        if comp not in models:
            raise StudioError(f"{f}: adapter has weights for {comp}, which this base model does not have")
        configs[comp] = _peft_config_from_json(text)
    if not configs:
        raise StudioError(f"{f}: studio adapter without a PEFT config in its header; the file is damaged")
    for comp, cfg in configs.items():
        sd = {k[len(comp) + 1 :]: v for k, v in tensors.items() if k.startswith(comp + ".")}
        _inject(models[comp], cfg, adapter_name)
        result = set_peft_model_state_dict(models[comp], sd, adapter_name=adapter_name)
        unexpected = getattr(result, "unexpected_keys", None) or []
        if unexpected:
            _delete(models, configs, adapter_name)
            raise StudioError(f"{f}: {len(unexpected)} weights do not fit this base model (e.g. {unexpected[0]}); "
                              f"was it trained on another model family?")
        models[comp].requires_grad_(False)
    entry = {"method": meta[f"{META_PREFIX}method"], "configs": configs}
    trig = TriggerEmbeddings.from_file_parts(tensors, meta) if trigger else None
    if trig is not None:
        try:
            entry["trigger"] = trig.install(pipe)
        except StudioError:
            _delete(models, configs, adapter_name)
            raise
    _registry(pipe)[adapter_name] = entry
    return adapter_name


def add_trigger_embedding(pipe: Any, trigger: str, adapter_name: str = "default",
                          init_word: str = "") -> list[torch.nn.Parameter]:
    """Learn the trigger word's input embedding with the adapter (see :mod:`studio.adapters.trigger`).

    ``init_word``: start from that word's embedding instead of the trigger's own.
    Returns the trainable rows; :func:`save_adapter` writes them into the adapter file.
    """
    entry = _registry(pipe).get(adapter_name)
    if entry is None:
        raise StudioError(f"no adapter named {adapter_name!r} on this pipeline")
    if entry.get("trigger") is not None:
        entry["trigger"].remove()
    entry["trigger"] = TriggerEmbeddings.from_base(pipe, trigger, init_word).install(pipe)
    return entry["trigger"].parameters()


def trigger_embeddings(pipe: Any, adapter_name: str = "default") -> TriggerEmbeddings | None:
    """The learned trigger embedding of an adapter on ``pipe``, or None."""
    return (_registry(pipe).get(adapter_name) or {}).get("trigger")


def _delete(models: dict, configs: dict, adapter_name: str) -> None:
    for comp in configs:
        _delete_from(models[comp], adapter_name)


def _delete_from(model: torch.nn.Module, adapter_name: str) -> None:
    for _, layer in tuner_layers(model):
        if adapter_name in layer.scaling or adapter_name in getattr(layer, "r", {}):
            layer.delete_adapter(adapter_name)
    cfgs = getattr(model, "peft_config", None)
    if isinstance(cfgs, dict):
        cfgs.pop(adapter_name, None)


def remove_adapter(pipe: Any, adapter_name: str) -> None:
    """Take an adapter out of the pipeline entirely."""
    entry = _registry(pipe).pop(adapter_name, None)
    if entry is None:
        raise StudioError(f"no adapter named {adapter_name!r} on this pipeline")
    if entry.get("trigger") is not None:
        entry["trigger"].remove()
    for model in adapted_models(pipe).values():
        _delete_from(model, adapter_name)


def set_enabled(pipe: Any, enabled: bool) -> None:
    """Switch every adapter of the pipeline on or off (off == the base model).

    Every parameter keeps its ``requires_grad``: PEFT's switch also flips it, which would
    unfreeze a loaded adapter, or freeze a training one, as a side effect.
    """
    for model in adapted_models(pipe).values():
        for _, layer in tuner_layers(model):
            grads = [(p, p.requires_grad) for p in layer.parameters()]
            layer.enable_adapters(enabled)
            for p, g in grads:
                p.requires_grad_(g)
    for entry in _registry(pipe).values():
        if entry.get("trigger") is not None:
            entry["trigger"].weight = 1.0 if enabled else 0.0


def set_active(pipe: Any, names: list[str]) -> None:
    """Make exactly ``names`` active (PEFT layers sum the active adapters' deltas)."""
    for model in adapted_models(pipe).values():
        for _, layer in tuner_layers(model):
            present = [n for n in names if n in layer.scaling or n in getattr(layer, "r", {})]
            layer.set_adapter(present or names[:1])
            if not present:
                layer.enable_adapters(False)
    for name, entry in _registry(pipe).items():
        if entry.get("trigger") is not None:
            entry["trigger"].weight = 1.0 if name in names else 0.0


def merge(pipe: Any, names: list[str] | None = None, safe: bool = True) -> None:
    """Fuse adapters into the base weights (``safe`` checks for non-finite results)."""
    for model in adapted_models(pipe).values():
        for _, layer in tuner_layers(model):
            wanted = [n for n in (names or list(layer.active_adapters)) if n in getattr(layer, "scaling", {}) or n in getattr(layer, "r", {})]
            if wanted:
                layer.merge(safe_merge=safe, adapter_names=wanted)


def unmerge(pipe: Any) -> None:
    """Undo every merge: the base weights come back (to float precision)."""
    for model in adapted_models(pipe).values():
        for _, layer in tuner_layers(model):
            while layer.merged:
                layer.unmerge()
