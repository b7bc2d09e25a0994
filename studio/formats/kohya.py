"""Portable LoRA files: the diffusers/PEFT layout and the kohya (sd-scripts, A1111, ComfyUI) layout.

Two layouts carry the same low-rank adapters of Stable Diffusion 1.x / 2.x / SDXL:

* **diffusers** (``pytorch_lora_weights.safetensors``, what ``save_lora_weights`` writes): PEFT
  names under the component, ``unet.<module>.lora_A.weight`` / ``lora_B.weight``,
  ``text_encoder.<module>…``, ``text_encoder_2.<module>…``; rank and alpha of each component
  ride in the header as the JSON entry ``lora_adapter_metadata`` (a ``LoraConfig`` with
  ``rank_pattern`` / ``alpha_pattern``). Without it diffusers takes alpha = rank.
* **kohya**: one flat name per module, ``lora_unet_<module with dots as underscores>``,
  ``lora_te_text_model_encoder_layers_N_…`` (SDXL: ``lora_te1_`` / ``lora_te2_``), each with
  ``.lora_down.weight``, ``.lora_up.weight`` and a scalar ``.alpha``, plus ``ss_*`` training
  metadata. sd-scripts names SD 1.x/2.x UNet modules like diffusers, but SDXL ones like the
  original LDM UNet (``lora_unet_input_blocks_4_1_…``, ``middle_block_1``, ``output_blocks_…``);
  both are read, mapped through the UNet's config; diffusers-style names are written unless
  ``unet_names="ldm"``.

Community LyCORIS files use the kohya names with other tensors per module: LoCon (LoRA on
convolutions too), LoHa (``hada_w1_a``…) and LoKr (``lokr_w1``…). They load into a pipeline with
:func:`load_lycoris_into` (PEFT's LoRA/LoHa/LoKr tuners); :func:`lycoris_delta` is the pure-torch
weight delta of each, the reference the tuners are checked against.

The scale of a module is ``alpha / rank`` everywhere (LoKr without a low-rank factor: 1, as
LyCORIS, A1111 and ComfyUI do); conversions keep each module's rank and alpha.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from studio.errors import StudioError
from studio.fileio import write_safetensors

log = logging.getLogger(__name__)

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
# diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY: "<component>.<LoraConfig field>" as JSON
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
STUDIO_META_PREFIX = "studio."
LAYOUTS: tuple[str, ...] = ("diffusers", "kohya", "kohya-ldm", "lycoris-loha", "lycoris-lokr", "peft")
FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl")
COMPONENTS: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2")
KINDS: tuple[str, ...] = ("lora", "loha", "lokr")

# the tensors of one module, by kind, under their kohya/LyCORIS names (PEFT's LoHa/LoKr names are the same)
KIND_PARTS: dict[str, tuple[str, ...]] = {
    "lora": ("lora_down.weight", "lora_up.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
_KIND_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}
_PEFT_LORA_PARTS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
_PART_KIND = {part: kind for kind, parts in KIND_PARTS.items() for part in parts}
# tensors of other LyCORIS/kohya variants, named so the error says what the file is
_UNSUPPORTED_PARTS = {
    "lora_mid.weight": "LoCon with a Tucker core (lora_mid)", "dora_scale": "DoRA (dora_scale)",
    "diff": "a full weight difference (LyCORIS 'full')", "diff_b": "a full bias difference",
    "w_norm": "a norm-layer adapter", "b_norm": "a norm-layer adapter", "oft_blocks": "OFT",
    "oft_diag": "OFT", "lora_B.bias": "a LoRA bias (lora_bias=True)",
    "lora_magnitude_vector": "DoRA (lora_magnitude_vector)",
}

# kohya module-name prefixes (sd-scripts networks/lora.py: LORA_PREFIX_*)
KOHYA_UNET = "lora_unet"
KOHYA_TE = "lora_te"
KOHYA_TE1 = "lora_te1"
KOHYA_TE2 = "lora_te2"

# sd-scripts' ss_base_model_version and the SAI model-spec architecture of each family
_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
_MODELSPEC = {  # architecture, implementation, resolution
    "sd1": ("stable-diffusion-v1", "diffusers", "512x512"),
    "sd2": ("stable-diffusion-v2-512", "diffusers", "512x512"),
    "sdxl": ("stable-diffusion-xl-v1-base", "https://github.com/Stability-AI/generative-models", "1024x1024"),
}

# ----------------------------------------------------------------------------------------------
# module names
# ----------------------------------------------------------------------------------------------

# The words of UNet2DConditionModel module paths (those with underscores must stay joined when a
# kohya name's underscores become dots again; digits are indices).
_UNET_WORDS = frozenset({
    "down_blocks", "up_blocks", "mid_block", "attentions", "resnets", "downsamplers", "upsamplers",
    "transformer_blocks", "attn1", "attn2", "to_q", "to_k", "to_v", "to_out", "ff", "net", "proj",
    "proj_in", "proj_out", "conv", "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv_in",
    "conv_out", "time_embedding", "linear_1", "linear_2", "add_embedding", "encoder_hid_proj",
    "class_embedding", "norm", "norm1", "norm2", "norm3", "conv_norm_out", "add_k_proj", "add_v_proj",
})
_MAX_WORD_TOKENS = max(w.count("_") + 1 for w in _UNET_WORDS)

# The LoRA-able parts of a resnet block: diffusers name -> name in the original LDM UNet
# (openaimodel.ResBlock: in_layers = [norm, SiLU, conv], emb_layers = [SiLU, linear], out_layers =
# [norm, SiLU, dropout, conv], skip_connection).
_LDM_RESNET = {"conv1": "in_layers_2", "time_emb_proj": "emb_layers_1", "conv2": "out_layers_3",
               "conv_shortcut": "skip_connection"}
_LDM_RESNET_INV = {v: k for k, v in _LDM_RESNET.items()}
_LDM_STARTS = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_")

# Text encoders, explicitly: sd-scripts names modules after transformers 4's CLIPTextModel,
# ``text_model.encoder.layers.N.<part>``; transformers 5 dropped ``text_model.`` from CLIPTextModel
# (not from CLIPTextModelWithProjection), so the module paths below carry no prefix and the
# model's own layout decides whether ``text_model.`` goes in front.
TEXT_ENCODER_PARTS: dict[str, str] = {  # kohya tail -> module inside encoder layer N
    "self_attn_q_proj": "self_attn.q_proj",
    "self_attn_k_proj": "self_attn.k_proj",
    "self_attn_v_proj": "self_attn.v_proj",
    "self_attn_out_proj": "self_attn.out_proj",
    "mlp_fc1": "mlp.fc1",
    "mlp_fc2": "mlp.fc2",
}
_TE_PARTS_INV = {v: k for k, v in TEXT_ENCODER_PARTS.items()}
_TE_KOHYA = re.compile(r"^text_model_encoder_layers_(\d+)_(" + "|".join(map(re.escape, TEXT_ENCODER_PARTS)) + r")$")
_TE_MODULE = re.compile(r"^(?:text_model\.)?encoder\.layers\.(\d+)\.(" +
                        "|".join(map(re.escape, _TE_PARTS_INV)) + r")$")


def _join_unet_words(name: str) -> str | None:
    """``down_blocks_0_attentions_0_proj_in`` -> ``down_blocks.0.attentions.0.proj_in`` (None: not a UNet path)."""
    tokens = name.split("_")
    out: list[str] = []
    i = 0
    while i < len(tokens):
        for j in range(min(len(tokens), i + _MAX_WORD_TOKENS), i, -1):
            word = "_".join(tokens[i:j])
            if word in _UNET_WORDS or (j == i + 1 and word.isdigit()):
                out.append(word)
                i = j
                break
        else:
            return None
    return ".".join(out)


def _ldm_table(unet_config: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """(LDM name with underscores, diffusers module path, is a resnet), longest LDM name first."""
    from studio.single_file import MappingError, unet_prefixes

    try:
        rows = unet_prefixes(unet_config)
    except (MappingError, KeyError) as exc:
        raise StudioError(f"this UNet config has no original-LDM counterpart ({exc}); "
                          f"use diffusers-style kohya names") from exc
    table = [(ldm.rstrip(".").replace(".", "_"), dif.rstrip("."), resnet) for dif, ldm, resnet in rows]
    return sorted(table, key=lambda row: -len(row[0]))


def text_model_prefix(component: str) -> str:
    """``"text_model."`` when the installed transformers keeps it in this text encoder's module paths."""
    return _text_model_prefix("CLIPTextModelWithProjection" if component == "text_encoder_2" else "CLIPTextModel")


@functools.lru_cache(maxsize=None)
def _text_model_prefix(class_name: str) -> str:
    import transformers

    cfg = transformers.CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                                      projection_dim=8, vocab_size=8, max_position_embeddings=4, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1)
    with torch.device("meta"):
        model = getattr(transformers, class_name)(cfg)
    names = {n for n, _ in model.named_modules()}
    return "text_model." if "text_model.encoder.layers.0.mlp.fc1" in names else ""


class KohyaNames:
    """kohya module names <-> (component, diffusers module path).

    ``unet_config``: the UNet's config, needed for original-LDM names (reading them, or writing
    them with ``unet_names="ldm"``). ``dual_text_encoders``: SDXL naming (``lora_te1_``/``lora_te2_``).
    Text-encoder module paths are given without ``text_model.``.
    """

    def __init__(self, *, unet_config: Mapping[str, Any] | None = None, dual_text_encoders: bool = False,
                 unet_names: str = "diffusers") -> None:
        if unet_names not in ("diffusers", "ldm"):
            raise StudioError(f"unet_names={unet_names!r}: choose 'diffusers' or 'ldm'")
        if unet_names == "ldm" and unet_config is None:
            raise StudioError("original-LDM kohya names need the UNet's config (pass the family or a unet config)")
        self.unet_config = unet_config
        self.dual = dual_text_encoders
        self.unet_names = unet_names

    @functools.cached_property
    def _table(self) -> list[tuple[str, str, bool]]:
        if self.unet_config is None:
            raise StudioError("original-LDM UNet names (input_blocks_…, middle_block_…, output_blocks_…) need the "
                              "UNet's config: pass --family sd1|sd2|sdxl (or the pipeline)")
        return _ldm_table(self.unet_config)

    # writing -------------------------------------------------------------------------------
    def name(self, component: str, module: str) -> str:
        """The kohya name of a module (no tensor suffix)."""
        if component == "unet":
            return f"{KOHYA_UNET}_{self._unet_name(module)}"
        if component not in ("text_encoder", "text_encoder_2"):
            raise StudioError(f"component {component!r} has no kohya name (only unet and text encoders)")
        m = _TE_MODULE.match(module)
        if not m:
            raise StudioError(f"{component} module {module!r} has no kohya name: sd-scripts adapts only the "
                              f"attention and MLP projections of the encoder layers")
        prefix = KOHYA_TE2 if component == "text_encoder_2" else (KOHYA_TE1 if self.dual else KOHYA_TE)
        return f"{prefix}_text_model_encoder_layers_{m.group(1)}_{_TE_PARTS_INV[m.group(2)]}"

    def _unet_name(self, module: str) -> str:
        if self.unet_names == "diffusers":
            if _join_unet_words(module.replace(".", "_")) != module:
                raise StudioError(f"unet module {module!r} has no unambiguous kohya name")
            return module.replace(".", "_")
        for ldm, dif, resnet in self._table:
            if module == dif or module.startswith(dif + "."):
                tail = module[len(dif) + 1:]
                if resnet:
                    if tail not in _LDM_RESNET:
                        raise StudioError(f"unet module {module!r}: resnet part {tail!r} has no LDM name")
                    tail = _LDM_RESNET[tail]
                return ldm + ("_" + tail.replace(".", "_") if tail else "")
        raise StudioError(f"unet module {module!r} has no place in the original LDM UNet")

    # reading -------------------------------------------------------------------------------
    def parse(self, name: str) -> tuple[str, str]:
        """(component, module path) of a kohya module name; StudioError when it names nothing known."""
        for prefix, component in ((KOHYA_UNET, "unet"), (KOHYA_TE1, "text_encoder"), (KOHYA_TE2, "text_encoder_2"),
                                  (KOHYA_TE, "text_encoder")):
            if name.startswith(prefix + "_"):
                rest = name[len(prefix) + 1:]
                break
        else:
            raise StudioError(f"{name!r} is not a kohya module name (lora_unet_…, lora_te_…, lora_te1_…, lora_te2_…)")
        if component == "unet":
            return component, self._parse_unet(rest, name)
        m = _TE_KOHYA.match(rest)
        if not m:
            raise StudioError(f"{name!r}: unknown text-encoder module (expected text_model_encoder_layers_N_"
                              f"{{{','.join(TEXT_ENCODER_PARTS)}}})")
        return component, f"encoder.layers.{m.group(1)}.{TEXT_ENCODER_PARTS[m.group(2)]}"

    def _parse_unet(self, rest: str, name: str) -> str:
        if rest.startswith(_LDM_STARTS):
            for ldm, dif, resnet in self._table:
                if rest == ldm:
                    tail = ""
                elif rest.startswith(ldm + "_"):
                    tail = rest[len(ldm) + 1:]
                else:
                    continue
                if resnet:
                    part = _LDM_RESNET_INV.get(tail)
                else:
                    part = _join_unet_words(tail) if tail else ""
                if part is None:
                    raise StudioError(f"{name!r}: unknown part {tail!r} of LDM block {ldm!r}")
                return dif + ("." + part if part else "")
            raise StudioError(f"{name!r}: no such block in this UNet (original-LDM names are mapped through the "
                              f"UNet's config: is the family right?)")
        module = _join_unet_words(rest)
        if module is None:
            raise StudioError(f"{name!r}: unknown UNet module")
        return module


def is_ldm_name(name: str) -> bool:
    """Whether a kohya UNet name uses the original LDM block names."""
    return name.startswith(KOHYA_UNET + "_") and name[len(KOHYA_UNET) + 1:].startswith(_LDM_STARTS[:3])


# ----------------------------------------------------------------------------------------------
# the math (pure torch, LyCORIS conventions)
# ----------------------------------------------------------------------------------------------


def module_rank(tensors: Mapping[str, torch.Tensor], kind: str) -> int | None:
    """The rank whose ``alpha / rank`` scales the module (LoKr without a low-rank factor: None)."""
    t = {k.removesuffix(".weight"): v for k, v in tensors.items()}
    if kind == "lora":
        return int(t["lora_down"].shape[0])
    if kind == "loha":
        return int(t["hada_w1_b"].shape[0])
    if kind == "lokr":
        for key in ("lokr_w1_b", "lokr_w2_b"):
            if key in t:
                return int(t[key].shape[0])
        return None
    raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")


def module_scale(tensors: Mapping[str, torch.Tensor], kind: str, alpha: float | None) -> float:
    """``alpha / rank``; 1 without alpha (sd-scripts, LyCORIS, A1111) or without a rank (full LoKr factors)."""
    rank = module_rank(tensors, kind)
    if alpha is None or rank is None:
        return 1.0
    return float(alpha) / rank


def lycoris_delta(tensors: Mapping[str, torch.Tensor], kind: str, alpha: float | None = None, *,
                  shape: tuple[int, ...] | torch.Size | None = None) -> torch.Tensor:
    """The weight difference one module adds to ``W`` (float32), from its file tensors.

    ``tensors``: kohya/LyCORIS names without the module prefix (``lora_down.weight``,
    ``hada_w1_a``, ``lokr_w1``, …; ``.weight`` optional). LoRA: ``up @ down * alpha/rank``
    (convolution kernels flattened, then restored); LoHa: ``(w1a @ w1b) * (w2a @ w2b) * alpha/rank``
    (Tucker form with ``hada_t1/t2``); LoKr: ``kron(w1, w2) * alpha/rank`` with each factor full or
    ``a @ b`` (``lokr_t2``: Tucker form of w2). ``shape``: reshape to the base weight's shape.
    """
    t = {k.removesuffix(".weight"): v.detach().float() for k, v in tensors.items()}
    if kind == "lora":
        down, up = t["lora_down"], t["lora_up"]
        delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        if down.dim() > 2:
            delta = delta.reshape(up.shape[0], *down.shape[1:])
    elif kind == "loha":
        if "hada_t1" in t:
            w1 = torch.einsum("i j k l, i p, j r -> p r k l", t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
            w2 = torch.einsum("i j k l, i p, j r -> p r k l", t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        else:
            w1 = t["hada_w1_a"] @ t["hada_w1_b"]
            w2 = t["hada_w2_a"] @ t["hada_w2_b"]
        delta = w1 * w2
    elif kind == "lokr":
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = torch.einsum("i j k l, i p, j r -> p r k l", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1.contiguous(), w2.contiguous())  # kron views its inputs
    else:
        raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")
    delta = delta * module_scale(tensors, kind, alpha)
    return delta.reshape(tuple(shape)) if shape is not None else delta


def delta_size(tensors: Mapping[str, torch.Tensor], kind: str) -> tuple[int, int]:
    """(output channels, number of elements) of the module's delta, from the shapes alone."""
    t = {k.removesuffix(".weight"): v.shape for k, v in tensors.items()}
    if kind == "lora":
        out = t["lora_up"][0]
        return out, out * math.prod(t["lora_down"][1:])
    if kind == "loha":
        if "hada_t1" in t:
            out = t["hada_w1_a"][1]
            return out, out * t["hada_w1_b"][1] * math.prod(t["hada_t1"][2:])
        out = t["hada_w1_a"][0]
        return out, out * t["hada_w1_b"][1]
    if kind == "lokr":
        a, c = (t["lokr_w1"][0], t["lokr_w1"][1]) if "lokr_w1" in t else (t["lokr_w1_a"][0], t["lokr_w1_b"][1])
        if "lokr_w2" in t:
            b, rest = t["lokr_w2"][0], math.prod(t["lokr_w2"][1:])
        elif "lokr_t2" in t:
            b, rest = t["lokr_w2_a"][1], t["lokr_w2_b"][1] * math.prod(t["lokr_t2"][2:])
        else:
            b, rest = t["lokr_w2_a"][0], t["lokr_w2_b"][1]
        return a * b, a * b * c * rest
    raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModuleWeights:
    """One adapted module: where it is, its kind, its tensors (kohya/LyCORIS names) and alpha."""

    component: str
    module: str  # diffusers module path inside the component (text encoders: no ``text_model.``)
    kind: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None  # None: the file has none (scale 1)

    @property
    def rank(self) -> int | None:
        return module_rank(self.tensors, self.kind)

    @property
    def scale(self) -> float:
        return module_scale(self.tensors, self.kind, self.alpha)


@dataclasses.dataclass
class LoraFile:
    """A LoRA (or LyCORIS) file read into modules, whatever its layout."""

    path: Path
    layout: str
    modules: list[ModuleWeights]
    metadata: dict[str, str]
    family: str | None = None

    @property
    def kinds(self) -> set[str]:
        return {m.kind for m in self.modules}


def _has(keys: Iterable[str], *needles: str) -> bool:
    return any(n in k for k in keys for n in needles)


def detect_lora_format(keys: Iterable[str]) -> str | None:
    """The layout of a state dict's keys: one of :data:`LAYOUTS`, or None.

    ``lycoris-loha`` / ``lycoris-lokr``: any LoHa/LoKr module (kohya or PEFT names); ``kohya-ldm``:
    kohya names with original-LDM UNet blocks; ``kohya``: other kohya names (LoRA and LoCon);
    ``diffusers``: PEFT names under ``unet.``/``text_encoder.``/``text_encoder_2.``; ``peft``: PEFT
    names of a single model (``get_peft_model_state_dict`` / ``adapter_model.safetensors``).
    """
    keys = list(keys)
    if _has(keys, ".hada_w1_a", ".hada_w1_b"):
        return "lycoris-loha"
    if _has(keys, ".lokr_w1", ".lokr_w2"):
        return "lycoris-lokr"
    kohya = [k for k in keys if k.startswith((KOHYA_UNET + "_", KOHYA_TE + "_", KOHYA_TE1 + "_", KOHYA_TE2 + "_"))
             and (".lora_down." in k or ".lora_up." in k)]
    if kohya:
        return "kohya-ldm" if any(is_ldm_name(k.split(".", 1)[0]) for k in kohya) else "kohya"
    peft = [k for k in keys if ".lora_A." in k or ".lora_B." in k]
    if peft:
        if all(k.split(".", 1)[0] in COMPONENTS for k in peft):
            return "diffusers"
        if not any(k.split(".", 1)[0] in COMPONENTS for k in peft):
            return "peft"
    return None


def lora_weight_file(path: str | os.PathLike) -> Path:
    """The weights file of a LoRA path: the file itself, or a folder's diffusers/PEFT weights file."""
    p = Path(path)
    if p.is_dir():
        for name in (DIFFUSERS_WEIGHT_NAME, PEFT_WEIGHT_NAME):
            if (p / name).is_file():
                return p / name
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise StudioError(f"{p}: no {DIFFUSERS_WEIGHT_NAME} (or single .safetensors file) in this folder; "
                          f"pass the LoRA file itself")
    if not p.exists():
        raise StudioError(f"{p}: no such LoRA file or folder")
    if p.suffix.lower() != ".safetensors":
        raise StudioError(f"{p}: LoRA files are read from .safetensors only (pickled .pt/.bin/.ckpt files can run "
                          f"code); convert it to safetensors first")
    return p


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds on a damaged file
        raise StudioError(f"{path}: not a readable .safetensors file ({exc}); is the download complete?") from exc
    return tensors, metadata


def _component_configs(metadata: Mapping[str, str], source: Path) -> dict[str, dict[str, Any]]:
    """Per component, the PEFT config the header carries (diffusers' entry, else the studio's)."""
    out: dict[str, dict[str, Any]] = {}
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if raw:
        try:
            packed = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise StudioError(f"{source}: header entry {ADAPTER_METADATA_KEY} is not JSON ({exc})") from exc
        for key, value in packed.items():
            comp, _, field = key.partition(".")
            out.setdefault(comp, {})[field] = value
    for comp in COMPONENTS:
        raw = metadata.get(f"{STUDIO_META_PREFIX}peft_config.{comp}")
        if raw and comp not in out:
            try:
                out[comp] = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise StudioError(f"{source}: header entry studio.peft_config.{comp} is not JSON ({exc})") from exc
    return out


def _config_alpha(cfg: Mapping[str, Any] | None, module: str, kind: str) -> tuple[float, float] | None:
    """(alpha, divisor) of a module from its PEFT config, scale = alpha / divisor; None without a config."""
    if not cfg:
        return None
    from peft.utils.other import get_pattern_key

    r = cfg.get("r")
    alpha = cfg.get("lora_alpha" if kind == "lora" else "alpha", r)
    apat, rpat = cfg.get("alpha_pattern") or {}, cfg.get("rank_pattern") or {}
    key = get_pattern_key(list(apat), module)
    if key in apat:
        alpha = apat[key]
    key = get_pattern_key(list(rpat), module)
    if key in rpat:
        r = rpat[key]
    if alpha is None or not r:
        return None
    return float(alpha), (math.sqrt(r) if kind == "lora" and cfg.get("use_rslora") else float(r))


def _peft_module(component: str, module: str, kind: str, tensors: dict[str, torch.Tensor],
                 cfg: Mapping[str, Any] | None, source: Path) -> ModuleWeights:
    """A module from PEFT names: PEFT's scale (from the config) expressed as a kohya alpha."""
    parts = _config_alpha(cfg, module, kind)
    if component != "unet":
        if not _TE_MODULE.match(module):
            raise StudioError(f"{source}: {component} module {module!r} is not an attention or MLP projection of "
                              f"a CLIP encoder layer; it has no kohya name")
        module = module.removeprefix("text_model.")
    rank = module_rank(tensors, kind)
    alpha: float | None = None  # no config: alpha = rank, as diffusers assumes
    if parts is not None:
        cfg_alpha, divisor = parts
        if rank is None:  # LoKr without low-rank factors: kohya readers use scale 1, so bake PEFT's in
            scale = cfg_alpha / divisor
            if scale != 1.0:
                key = "lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a"
                tensors = {**tensors, key: tensors[key] * scale}
        else:
            alpha = cfg_alpha if divisor == rank else cfg_alpha * rank / divisor
    return ModuleWeights(component, module, kind, tensors, alpha)


_DIFFUSERS_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.(lora_A\.weight|lora_B\.weight|"
                            r"hada_\w+|lokr_\w+)$")
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_A\.weight|lora_B\.weight|hada_\w+|lokr_\w+)$")


def _unsupported(key: str) -> str | None:
    for part, what in _UNSUPPORTED_PARTS.items():
        if key.endswith("." + part):
            return what
    return None


def _group_peft(tensors: Mapping[str, torch.Tensor], pattern: re.Pattern[str], source: Path,
                component: str | None) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, value in tensors.items():
        m = pattern.match(key)
        if not m:
            what = _unsupported(key)
            raise StudioError(f"{source}: tensor {key!r} " + (f"is {what}, which this converter does not support"
                                                             if what else "is not part of a LoRA/LoHa/LoKr module"))
        if component is None:
            comp, module, part = m.groups()
        else:
            comp, (module, part) = component, m.groups()
        groups[(comp, module)][_PEFT_LORA_PARTS.get(part, part)] = value
    return groups


def _kind_of(parts: Iterable[str], where: str) -> str:
    kinds = {_PART_KIND.get(p) for p in parts}
    if None in kinds or len(kinds) != 1:
        raise StudioError(f"{where}: tensors {sorted(parts)} do not form one LoRA, LoHa or LoKr module")
    kind = kinds.pop()
    p = set(parts)
    ok = {
        "lora": {"lora_down.weight", "lora_up.weight"} <= p,
        "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= p and ("hada_t1" in p) == ("hada_t2" in p),
        "lokr": (("lokr_w1" in p) != ({"lokr_w1_a", "lokr_w1_b"} <= p))
        and (("lokr_w2" in p) != ({"lokr_w2_a", "lokr_w2_b"} <= p)) and not ("lokr_t2" in p and "lokr_w2" in p),
    }[kind]
    if not ok:
        raise StudioError(f"{where}: incomplete {kind} module (has {', '.join(sorted(p))})")
    return kind


def _guess_te_component(module: str) -> str | None:
    return "text_encoder" if _TE_MODULE.match(module) else None


def guess_family(lora: LoraFile) -> str | None:
    """sd1 / sd2 / sdxl from the header, the text encoders and the layer widths; None when unsure."""
    md = lora.metadata
    fam = md.get(f"{STUDIO_META_PREFIX}family")
    if fam in FAMILIES:
        return fam
    version = md.get("ss_base_model_version", "")
    arch = md.get("modelspec.architecture", "")
    if version.startswith("sdxl") or arch.startswith("stable-diffusion-xl"):
        return "sdxl"
    if version.startswith("sd_v2") or arch.startswith("stable-diffusion-v2") or md.get("ss_v2") == "True":
        return "sd2"
    if version.startswith("sd_v1") or arch.startswith("stable-diffusion-v1"):
        return "sd1"
    if any(m.component == "text_encoder_2" for m in lora.modules):
        return "sdxl"
    widths = {"sd1": 768, "sd2": 1024, "sdxl": 2048}
    for m in lora.modules:  # the cross-attention width says it
        if m.component == "unet" and m.module.endswith("attn2.to_k") and m.kind == "lora":
            width = m.tensors["lora_down.weight"].shape[1]
            for fam, w in widths.items():
                if width == w:
                    return fam
    for m in lora.modules:  # the text encoder width: CLIP-L 768 (SD 1.x), OpenCLIP-H 1024 (SD 2.x)
        if m.component == "text_encoder" and m.module.endswith("mlp.fc1") and m.kind == "lora":
            width = m.tensors["lora_down.weight"].shape[1]
            return {768: "sd1", 1024: "sd2"}.get(width)
    return None


def bundled_unet_config(family: str) -> dict[str, Any]:
    """The UNet config of a family's reference model, from the bundled configs."""
    from studio.single_file import CONFIGS_DIR, FAMILY_CONFIGS

    if family not in FAMILIES:
        raise StudioError(f"family {family!r}: choose one of {', '.join(FAMILIES)}")
    path = CONFIGS_DIR / FAMILY_CONFIGS[family] / "unet" / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StudioError(f"{path}: bundled UNet config unreadable ({exc}); reinstall the studio") from exc


def _family_hint(keys: Iterable[str], metadata: Mapping[str, str]) -> str | None:
    """The family from the header or the text encoders' prefixes, before the modules are parsed."""
    probe = LoraFile(Path("."), "", [], dict(metadata))
    fam = guess_family(probe)
    if fam:
        return fam
    if any(k.startswith((KOHYA_TE1 + "_", KOHYA_TE2 + "_")) for k in keys):
        return "sdxl"
    return None


def read_lora(path: str | os.PathLike, *, family: str | None = None,
              unet_config: Mapping[str, Any] | None = None) -> LoraFile:
    """Read a LoRA / LyCORIS file (or a folder holding one) in any known layout.

    ``unet_config`` (or ``family``, through the bundled configs) maps original-LDM kohya names.
    """
    from studio.adapters.trigger import KEY_PREFIX as TRIGGER_KEY

    source = lora_weight_file(path)
    tensors, metadata = _load(source)
    trigger = [k for k in tensors if k.startswith(TRIGGER_KEY)]
    if trigger:  # a learned trigger embedding, not a layer: studio.adapters.trigger reads it
        log.info("%s: carries a trigger embedding (%s); the layer reader leaves it aside", source, ", ".join(trigger))
        tensors = {k: v for k, v in tensors.items() if k not in trigger}
    layout = detect_lora_format(tensors)
    if layout is None:
        if _has(tensors, "lora", "hada_", "lokr_", "alpha"):
            sample = ", ".join(sorted(tensors)[:3])
            raise StudioError(f"{source}: unknown LoRA layout (keys like {sample}); known layouts: "
                              f"{', '.join(LAYOUTS)}")
        raise StudioError(f"{source}: not a LoRA file (no LoRA, LoHa or LoKr weights among its {len(tensors)} "
                          f"tensors); is it a full model checkpoint?")
    if family is not None and family not in FAMILIES:
        raise StudioError(f"family {family!r}: choose one of {', '.join(FAMILIES)}")
    kohya_named = any(k.startswith((KOHYA_UNET + "_", KOHYA_TE + "_", KOHYA_TE1 + "_", KOHYA_TE2 + "_"))
                      for k in tensors)
    if kohya_named:
        modules = _read_kohya(tensors, metadata, source, family, unet_config)
    elif not all(k.split(".", 1)[0] in COMPONENTS for k in tensors):
        modules = _read_peft(tensors, source)
    else:
        configs = _component_configs(metadata, source)
        modules = [_peft_module(comp, module, _kind_of(parts, f"{source}: {comp}.{module}"), parts, configs.get(comp),
                               source)
                   for (comp, module), parts in _group_peft(tensors, _DIFFUSERS_KEY, source, None).items()]
        if not configs:
            log.info("%s: no adapter config in the header; taking alpha = rank (as diffusers does)", source)
    lora = LoraFile(source, layout, modules, metadata)
    lora.family = family or guess_family(lora)
    return lora


def _read_peft(tensors: Mapping[str, torch.Tensor], source: Path) -> list[ModuleWeights]:
    cfg = None
    config_file = source.with_name(PEFT_CONFIG_NAME)
    if config_file.is_file():
        try:
            cfg = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise StudioError(f"{config_file}: not JSON ({exc})") from exc
    groups = _group_peft(tensors, _PEFT_KEY, source, "?")
    te = {_guess_te_component(module) for _, module in groups}
    component = "text_encoder" if te == {"text_encoder"} else "unet"
    if component == "unet" and "text_encoder" in te:
        raise StudioError(f"{source}: PEFT file mixes text-encoder and UNet modules without component prefixes")
    log.info("%s: PEFT layout, read as the %s's adapter", source, component)
    return [_peft_module(component, module, _kind_of(parts, f"{source}: {module}"), parts, cfg, source)
            for (_, module), parts in groups.items()]


def _read_kohya(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: Path,
                family: str | None, unet_config: Mapping[str, Any] | None) -> list[ModuleWeights]:
    groups: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, value in tensors.items():
        name, _, part = key.partition(".")
        if not part:
            raise StudioError(f"{source}: tensor {key!r} is not a kohya module tensor (name.part)")
        groups[name][part] = value
    needs_ldm = any(is_ldm_name(n) for n in groups)
    if needs_ldm and unet_config is None:
        fam = family or _family_hint(tensors, metadata)
        if fam is None:
            raise StudioError(f"{source}: original-LDM UNet names (input_blocks_…) are mapped through the UNet's "
                              f"config, and the family of this file is unknown: pass --family sd1|sd2|sdxl")
        unet_config = bundled_unet_config(fam)
    names = KohyaNames(unet_config=unet_config)
    modules = []
    for name, parts in groups.items():
        alpha_t = parts.pop("alpha", None)
        for part in parts:
            what = _unsupported(f"{name}.{part}")
            if what:
                raise StudioError(f"{source}: {name} is {what}, which this converter does not support")
        kind = _kind_of(parts, f"{source}: {name}")
        component, module = names.parse(name)
        alpha = None if alpha_t is None else float(alpha_t.float().item())
        modules.append(ModuleWeights(component, module, kind, dict(parts), alpha))
    seen: dict[tuple[str, str], str] = {}
    for m, name in zip(modules, groups):
        if (m.component, m.module) in seen:
            raise StudioError(f"{source}: {name} and {seen[(m.component, m.module)]} name the same module "
                              f"{m.component}.{m.module}")
        seen[(m.component, m.module)] = name
    return modules


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------


def _output_file(out_path: str | os.PathLike, default_name: str, source: Path) -> Path:
    out = Path(out_path)
    if out.suffix.lower() != ".safetensors":  # a folder (made if missing)
        if out.exists() and not out.is_dir():
            raise StudioError(f"{out}: exists and is not a folder; give a .safetensors file name or a folder")
        out = out / default_name
    if out.resolve() == source.resolve():
        raise StudioError(f"{out}: is the input file; write the conversion to another path")
    return out


def _most_common(values: Iterable[Any]) -> Any:
    return collections.Counter(values).most_common(1)[0][0]


def _fmt_num(value: float | int) -> str:
    """A number as sd-scripts' network args spell it: 4, 0.5."""
    return str(int(value)) if float(value).is_integer() else str(float(value))


def _sshs_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """sd-scripts' sshs_model_hash (sha256 of the tensor data) and sshs_legacy_hash (A1111's old one)."""
    from safetensors.torch import save

    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, ss)
    n = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + n:]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def _kohya_metadata(lora: LoraFile, family: str | None, modules: list[ModuleWeights], out: Path) -> dict[str, str]:
    md = {k: v for k, v in lora.metadata.items()
          if not k.startswith("sshs_") and k not in (ADAPTER_METADATA_KEY, "format")}
    ranks = [m.rank for m in modules if m.rank is not None]
    alphas = [m.alpha if m.alpha is not None else m.rank for m in modules if m.rank is not None]
    kinds = {m.kind for m in modules}
    if kinds == {"lora"}:
        md["ss_network_module"] = "networks.lora"
        conv = [m for m in modules if m.tensors["lora_down.weight"].dim() == 4
                and tuple(m.tensors["lora_down.weight"].shape[2:]) != (1, 1)]
        if conv:  # LoCon: sd-scripts records conv_dim/conv_alpha in the network args
            md["ss_network_args"] = json.dumps({"conv_dim": str(_most_common(m.rank for m in conv)),
                                                "conv_alpha": _fmt_num(_most_common(
                                                    m.alpha if m.alpha is not None else m.rank for m in conv))})
    else:
        md.setdefault("ss_network_module", "lycoris.kohya")
        if "ss_network_args" not in md:
            md["ss_network_args"] = json.dumps({"algo": sorted(kinds - {"lora"})[0]})
    if ranks:
        md["ss_network_dim"] = str(_most_common(ranks))
        md["ss_network_alpha"] = str(float(_most_common(alphas)))  # sd-scripts: str(float), e.g. "8.0"
    if family:
        if not md.get("ss_base_model_version", "").startswith(_BASE_MODEL_VERSION[family]):  # keeps e.g. sd_v2_v
            md["ss_base_model_version"] = _BASE_MODEL_VERSION[family]
        md["ss_v2"] = str(family == "sd2")
        arch, impl, reso = _MODELSPEC[family]
        md.setdefault("modelspec.sai_model_spec", "1.0.0")
        md.setdefault("modelspec.architecture", f"{arch}/lora")
        md.setdefault("modelspec.implementation", impl)
        md.setdefault("modelspec.resolution", reso)
    md["ss_output_name"] = out.stem
    md.setdefault("modelspec.title", out.stem)
    md.setdefault("ss_training_comment", f"converted by diffusion-studio from {lora.path.name} ({lora.layout} layout)")
    return md


def _unet_layout_mismatch(lora: Any, family: str) -> str | None:
    """Why the LoRA's UNet modules do not fit the family's reference UNet (None when they all do)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # the layout only: no memory, no weights
        unet = UNet2DConditionModel.from_config(bundled_unet_config(family))
    shapes = {n: tuple(m.weight.shape[:2]) for n, m in unet.named_modules()
              if isinstance(getattr(m, "weight", None), torch.Tensor)}
    for m in lora.modules:
        if m.component != "unet":
            continue
        if m.module not in shapes:
            return f"it has no module {m.module}"
        down, up = m.tensors.get("lora_down.weight"), m.tensors.get("lora_up.weight")
        if down is not None and up is not None and (up.shape[0], down.shape[1]) != shapes[m.module]:
            return (f"{m.module} maps {down.shape[1]} to {up.shape[0]} channels, SDXL base's "
                    f"{shapes[m.module][1]} to {shapes[m.module][0]}")
    return None


def _kohya_tensors(lora: Any, fam: str | None, unet_names: str, unet_config: Mapping[str, Any] | None,
                   dual: bool) -> dict[str, torch.Tensor]:
    """The kohya-named tensors of ``lora`` (``unet_names``: diffusers or ldm)."""
    if unet_names == "ldm" and unet_config is None:
        if fam is None:
            raise StudioError(f"{lora.path}: original-LDM names need the family's UNet config: pass --family")
        unet_config = bundled_unet_config(fam)
    names = KohyaNames(unet_config=unet_config, dual_text_encoders=dual, unet_names=unet_names)
    tensors: dict[str, torch.Tensor] = {}
    for m in lora.modules:
        base = names.name(m.component, m.module)
        if f"{base}.{next(iter(m.tensors))}" in tensors:
            raise StudioError(f"{lora.path}: two modules map to the kohya name {base}")
        for part, value in m.tensors.items():
            tensors[f"{base}.{part}"] = value
        alpha = m.alpha if m.alpha is not None else m.rank  # sd-scripts always writes alpha
        if alpha is not None:
            tensors[f"{base}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return tensors


def to_kohya(in_path: str | os.PathLike, out_path: str | os.PathLike, *, family: str | None = None,
             unet_names: str = "auto", unet_config: Mapping[str, Any] | None = None) -> Path:
    """Write a LoRA/LyCORIS file in the kohya layout (A1111, ComfyUI, sd-scripts); returns the path.

    ``in_path``: a file or a folder holding ``pytorch_lora_weights.safetensors``; any layout
    :func:`detect_lora_format` knows. ``out_path``: a ``.safetensors`` file, or a folder (the
    file is then named after the input). ``family`` (sd1, sd2, sdxl; guessed when None) sets the
    ``ss_*`` metadata and, for ``unet_names="ldm"`` (sd-scripts' SDXL naming), the bundled UNet
    config; ``unet_config`` overrides that config (e.g. a test model's). ``unet_names="auto"``
    names the UNet as sd-scripts does: original-LDM names for SDXL (diffusers-style ones when the
    UNet does not have SDXL base's layout, with a warning), diffusers-style names for SD 1.x/2.x.
    """
    lora = read_lora(in_path, family=family, unet_config=unet_config)
    fam = family or lora.family
    if fam is None:
        log.warning("%s: base family unknown (sd1, sd2 or sdxl?): ss_base_model_version left out; pass --family",
                    lora.path)
    dual = fam == "sdxl" or any(m.component == "text_encoder_2" for m in lora.modules)
    if unet_names == "auto":
        unet_names = "diffusers"
        if fam == "sdxl":
            # LDM names are computed from SDXL base's block layout: a LoRA of another UNet (a distilled
            # SDXL, a test model) would get names of the wrong layers, so its shapes are checked first
            why = _unet_layout_mismatch(lora, fam) if unet_config is None else None
            if why:
                log.warning("%s: kept diffusers-style UNet names (sd-scripts uses original-LDM names for SDXL, but "
                            "this LoRA does not fit SDXL base's UNet: %s)", lora.path, why)
            else:
                unet_names = "ldm"
    tensors = _kohya_tensors(lora, fam, unet_names, unet_config, dual)
    src_name = lora.path.parent.name if lora.path.name in (DIFFUSERS_WEIGHT_NAME, PEFT_WEIGHT_NAME) else lora.path.stem
    out = _output_file(out_path, f"{src_name}.safetensors", lora.path)
    metadata = _kohya_metadata(lora, fam, lora.modules, out)
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = _sshs_hashes(tensors, metadata)
    write_safetensors(out, tensors, metadata)
    log.info("wrote %s (kohya, %d modules, from %s layout)", out, len(lora.modules), lora.layout)
    return out


def _lora_config_dict(modules: list[ModuleWeights], prefix: str) -> dict[str, Any]:
    """diffusers' per-component adapter metadata: a LoraConfig's fields, patterns for the exceptions."""
    ranks = {prefix + m.module: int(m.rank) for m in modules}
    alphas = {prefix + m.module: (m.alpha if m.alpha is not None else m.rank) for m in modules}
    r = _most_common(ranks.values())
    alpha = _most_common(alphas.values())
    # only the fields that say where and how large: diffusers calls LoraConfig(**these), and a full
    # to_dict() of a newer PEFT carries fields an older PEFT rejects
    return {
        "r": r, "lora_alpha": alpha, "target_modules": sorted(ranks),
        "rank_pattern": {f"^{name}": v for name, v in ranks.items() if v != r},
        "alpha_pattern": {f"^{name}": v for name, v in alphas.items() if v != alpha},
        "use_dora": False, "use_rslora": False, "lora_bias": False,
    }


def to_diffusers(in_path: str | os.PathLike, out_path: str | os.PathLike, *, family: str | None = None,
                 unet_config: Mapping[str, Any] | None = None) -> Path:
    """Write a LoRA in diffusers' layout (``pipe.load_lora_weights`` reads it); returns the path.

    ``out_path``: a folder (gets ``pytorch_lora_weights.safetensors``) or a ``.safetensors`` file.
    LoHa/LoKr are no plain LoRA: they raise (load them with :func:`load_lycoris_into`).
    """
    lora = read_lora(in_path, family=family, unet_config=unet_config)
    other = sorted(lora.kinds - {"lora"})
    if other:
        raise StudioError(f"{lora.path}: a {'/'.join(_KIND_NAMES[k] for k in other)} file is not "
                          f"representable as a plain LoRA in the diffusers layout; keep it in the kohya layout "
                          f"and load it with studio.formats.load_lycoris_into")
    tensors: dict[str, torch.Tensor] = {}
    by_comp: dict[str, list[ModuleWeights]] = collections.defaultdict(list)
    for m in lora.modules:
        prefix = text_model_prefix(m.component) if m.component != "unet" else ""
        key = f"{m.component}.{prefix}{m.module}"
        tensors[f"{key}.lora_A.weight"] = m.tensors["lora_down.weight"]
        tensors[f"{key}.lora_B.weight"] = m.tensors["lora_up.weight"]
        by_comp[m.component].append(m)
    adapter_md: dict[str, Any] = {}
    for comp, mods in by_comp.items():
        prefix = text_model_prefix(comp) if comp != "unet" else ""
        for field, value in _lora_config_dict(mods, prefix).items():
            adapter_md[f"{comp}.{field}"] = value
    metadata = {k: v for k, v in lora.metadata.items()
                if k.startswith((STUDIO_META_PREFIX, "ss_", "modelspec.")) and not k.startswith("sshs_")}
    metadata["format"] = "pt"
    metadata[ADAPTER_METADATA_KEY] = json.dumps(adapter_md, indent=2, sort_keys=True)
    if lora.family and f"{STUDIO_META_PREFIX}family" not in metadata:
        metadata[f"{STUDIO_META_PREFIX}family"] = lora.family
    out = _output_file(out_path, DIFFUSERS_WEIGHT_NAME, lora.path)
    write_safetensors(out, tensors, metadata)
    log.info("wrote %s (diffusers, %d modules, from %s layout)", out, len(lora.modules), lora.layout)
    return out


# ----------------------------------------------------------------------------------------------
# loading into a pipeline
# ----------------------------------------------------------------------------------------------


def _resolve(model: torch.nn.Module, m: ModuleWeights) -> str | None:
    """The module's path in ``model`` (text encoders with or without ``text_model.``), None if absent."""
    names = (m.module,) if m.component == "unet" else (m.module, "text_model." + m.module)
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            continue
        return name
    return None


def _base(module: torch.nn.Module) -> torch.nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _check_fits(base: torch.nn.Module, m: ModuleWeights) -> str | None:
    """Why the module's tensors do not fit the layer, or None."""
    if not isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
        return f"is a {type(base).__name__}, not a Linear or Conv2d layer"
    weight = base.weight
    out, numel = delta_size(m.tensors, m.kind)
    if out != weight.shape[0] or numel != weight.numel():
        return f"weight {tuple(weight.shape)} does not match the file's {m.kind} factors"
    if m.kind == "lora":
        down = m.tensors["lora_down.weight"]
        if isinstance(base, torch.nn.Conv2d) and down.dim() == 4 and tuple(down.shape[2:]) != tuple(base.kernel_size):
            return f"kernel {tuple(base.kernel_size)} does not match lora_down {tuple(down.shape)}"
    return None


def _lora_tensors(base: torch.nn.Module, m: ModuleWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_down/lora_up shaped for PEFT's layer over ``base`` (1x1 convolutions <-> linear)."""
    down, up = m.tensors["lora_down.weight"], m.tensors["lora_up.weight"]
    if isinstance(base, torch.nn.Linear):
        return down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)
    if down.dim() == 2:
        down = down[:, :, None, None]
    if up.dim() == 2:
        up = up[:, :, None, None]
    return down, up


def _peft_rank_alpha(m: ModuleWeights, weight: float) -> tuple[int, float]:
    """(r, alpha) for PEFT so that its scale alpha/r is the file's scale times ``weight``."""
    rank = m.rank
    if rank is None:  # LoKr with full factors: any r; PEFT then builds full factors when r is large
        w2 = m.tensors.get("lokr_w2")
        rank = max(w2.shape[:2]) if w2 is not None else int(m.tensors["lokr_w2_a"].shape[1])
    return int(rank), m.scale * weight * rank


def _peft_config(kind: str, items: list[tuple[str, ModuleWeights]], weight: float) -> Any:
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    ra = {name: _peft_rank_alpha(m, weight) for name, m in items}
    r = _most_common(v[0] for v in ra.values())
    alpha = _most_common(v[1] for v in ra.values())
    common = dict(
        target_modules=sorted(ra),
        rank_pattern={f"^{re.escape(n)}": v[0] for n, v in ra.items() if v[0] != r},
        alpha_pattern={f"^{re.escape(n)}": v[1] for n, v in ra.items() if v[1] != alpha},
    )
    if kind == "lora":
        return LoraConfig(r=r, lora_alpha=alpha, **common)
    if kind == "loha":
        return LoHaConfig(r=r, alpha=alpha, use_effective_conv2d=any("hada_t1" in m.tensors for _, m in items),
                          **common)
    return LoKrConfig(r=r, alpha=alpha, decompose_both=any("lokr_w1_a" in m.tensors for _, m in items),
                      use_effective_conv2d=any("lokr_t2" in m.tensors for _, m in items), **common)


def _conform(layer: Any, adapter_name: str, m: ModuleWeights) -> None:
    """Make a PEFT LoHa/LoKr layer hold exactly the file's factors (PEFT picks its own factorization)."""
    weight = _base(layer).weight
    for pname in layer.adapter_layer_names:
        pdict = getattr(layer, pname)
        if pname in m.tensors:
            shape = m.tensors[pname].shape
            if adapter_name not in pdict or pdict[adapter_name].shape != shape:
                pdict[adapter_name] = torch.nn.Parameter(torch.zeros(shape, dtype=weight.dtype, device=weight.device),
                                                         requires_grad=False)
        elif adapter_name in pdict:
            del pdict[adapter_name]


def _rollback(model: torch.nn.Module, adapter_name: str) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "r", {}):
            module.delete_adapter(adapter_name)
    getattr(model, "peft_config", {}).pop(adapter_name, None)


def load_lycoris_into(pipe: Any, path: str | os.PathLike, adapter_name: str = "default",
                      weight: float = 1.0) -> dict[str, int]:
    """Inject a kohya-layout LoRA/LoCon/LoHa/LoKr file (or a diffusers one) into ``pipe`` as PEFT tuners.

    Each module becomes PEFT's LoRA, LoHa or LoKr layer with the file's rank and ``alpha * weight``
    (``weight`` is the A1111 multiplier), so ``pipe`` generates as with ``W + weight * delta``
    (:func:`lycoris_delta`). Every module must exist in the pipeline with matching shapes, else
    nothing is injected. Returns {component: modules injected}.
    """
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    unet = getattr(pipe, "unet", None)
    lora = read_lora(path, unet_config=dict(unet.config) if unet is not None else None)
    plan: dict[str, list[tuple[str, ModuleWeights]]] = collections.defaultdict(list)
    problems: list[str] = []
    for m in lora.modules:
        model = getattr(pipe, m.component, None)
        if not isinstance(model, torch.nn.Module):
            problems.append(f"{m.component}.{m.module}: this pipeline has no {m.component}")
            continue
        name = _resolve(model, m)
        if name is None:
            problems.append(f"{m.component}.{m.module}: no such module")
            continue
        why = _check_fits(_base(model.get_submodule(name)), m)
        if why:
            problems.append(f"{m.component}.{name}: {why}")
            continue
        plan[m.component].append((name, m))
    if problems:
        raise StudioError(f"{lora.path}: {len(problems)} of {len(lora.modules)} modules do not fit this "
                          f"{type(pipe).__name__} (a LoRA for another base model?): " + "; ".join(problems[:4]))
    for comp, items in plan.items():
        kinds = {m.kind for _, m in items}
        if len(kinds) > 1:
            raise StudioError(f"{lora.path}: the {comp} mixes {' and '.join(sorted(kinds))} modules; one kind per "
                              f"model is supported")
        model = getattr(pipe, comp)
        if adapter_name in getattr(model, "peft_config", {}):
            raise StudioError(f"adapter name {adapter_name!r} is already in use in the {comp}; choose another")
    done: list[torch.nn.Module] = []
    try:
        for comp, items in plan.items():
            model = getattr(pipe, comp)
            kind = items[0][1].kind
            config = _peft_config(kind, items, weight)
            inject_adapter_in_model(config, model, adapter_name=adapter_name)
            done.append(model)
            state: dict[str, torch.Tensor] = {}
            for name, m in items:
                layer = model.get_submodule(name)
                if kind == "lora":
                    down, up = _lora_tensors(_base(layer), m)
                    state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = down, up
                else:
                    _conform(layer, adapter_name, m)
                    state.update({f"{name}.{part}": t for part, t in m.tensors.items()})
            result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
            ours = (f".{adapter_name}.", f".{adapter_name}")  # PEFT keys: ….lora_A.<name>.weight, ….hada_w1_a.<name>
            missing = [k for k in result.missing_keys if ours[0] in k or k.endswith(ours[1])]
            if result.unexpected_keys or missing:
                raise StudioError(f"{lora.path}: {comp} did not take the file's tensors (unexpected: "
                                  f"{result.unexpected_keys[:3]}, missing: {missing[:3]})")
            if hasattr(model, "_hf_peft_config_loaded"):  # diffusers' adapter mixin then knows the adapter
                model._hf_peft_config_loaded = True
    except BaseException:
        for model in done:
            _rollback(model, adapter_name)
        raise
    counts = {comp: len(items) for comp, items in plan.items()}
    log.info("loaded %s as adapter %r (%s) with weight %g", lora.path, adapter_name,
             ", ".join(f"{c}: {n} {items[0][1].kind}" for (c, n), items in zip(counts.items(), plan.values())), weight)
    return counts


__all__ = [
    "ADAPTER_METADATA_KEY", "COMPONENTS", "DIFFUSERS_WEIGHT_NAME", "FAMILIES", "KIND_PARTS", "KINDS", "KohyaNames",
    "LAYOUTS", "LoraFile", "ModuleWeights", "TEXT_ENCODER_PARTS", "bundled_unet_config", "delta_size",
    "detect_lora_format", "guess_family", "is_ldm_name", "load_lycoris_into", "lora_weight_file", "lycoris_delta",
    "module_rank", "module_scale", "read_lora", "text_model_prefix", "to_diffusers", "to_kohya",
]
