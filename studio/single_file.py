"""Single-file checkpoints in the original CompVis / A1111 / ComfyUI layout.

One ``.safetensors`` file holds the whole model under the names of the original LDM code:
``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE), and the text encoder(s):
``cond_stage_model.transformer.text_model.*`` (SD 1.x, Hugging Face CLIP),
``cond_stage_model.model.*`` (SD 2.x, OpenCLIP) or ``conditioner.embedders.{0,1}.*`` (SDXL).

:func:`save_single_file` writes a diffusers SD 1.x / SD 2.x / SDXL pipeline in that layout and,
by default, embeds every component's diffusers config and the tokenizer files in the header
metadata (keys ``studio.*``), so that :func:`load_single_file` rebuilds any architecture offline.
Files from elsewhere load with the configs bundled in ``assets/configs`` or a ``--config`` folder.

The name maps are explicit and built from each model's config (blocks, layers per block, which
blocks have attention, transformer depth), so tiny test models and the real ones share one code
path. Each map entry is one tensor in the file and one or more tensors in diffusers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import struct
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from studio.errors import StudioError

log = logging.getLogger(__name__)

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "assets" / "configs"
FAMILY_CONFIGS: dict[str, str] = {"sd1": "sd15", "sd2": "sd21", "sd2-v": "sd21-v", "sdxl": "sdxl"}
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# per family: component -> (text-encoder layout, key prefix in the single file)
TEXT_LAYOUTS: dict[str, dict[str, tuple[str, str]]] = {
    "sd1": {"text_encoder": ("clip", "cond_stage_model.transformer.")},
    "sd2": {"text_encoder": ("openclip", "cond_stage_model.model.")},
    "sdxl": {
        "text_encoder": ("clip", "conditioner.embedders.0.transformer."),
        "text_encoder_2": ("openclip", "conditioner.embedders.1.model."),
    },
}
PIPELINES: dict[str, str] = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                             "sdxl": "StableDiffusionXLPipeline"}
META = "studio."
FORMAT_VERSION = "1"
TOKENIZER_FILES: tuple[str, ...] = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")
MAX_HEADER = 100_000_000  # safetensors' own limit
# caches of CLIP BPE vocabularies (all SD tokenizers share one vocabulary), tried offline only
_CACHED_VOCABS: tuple[tuple[str, str], ...] = (
    ("openai/clip-vit-large-patch14", ""),
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
    ("runwayml/stable-diffusion-v1-5", "tokenizer"),
    ("stabilityai/stable-diffusion-2-1", "tokenizer"),
    ("stabilityai/stable-diffusion-2-1-base", "tokenizer"),
    ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),
    ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", ""),
)
_REAL_TOKENIZER_REPOS: dict[str, str] = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd21": "stabilityai/stable-diffusion-2-1-base",
    "sd21-v": "stabilityai/stable-diffusion-2-1", "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}


# ----------------------------------------------------------------------------------------------
# name maps
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of the single file and the diffusers tensor(s) it is made of.

    ``kind``: ``copy``; ``conv1x1`` (a linear weight stored as a 1x1 convolution);
    ``transpose`` (OpenCLIP's text projection is stored as ``x @ P``); ``concat`` (OpenCLIP's
    fused q/k/v ``in_proj`` is the three diffusers projections stacked along dim 0).
    """

    ldm: str
    diffusers: tuple[str, ...]
    kind: str = "copy"


class MappingError(ValueError):
    """A diffusers key that has no place in the original layout."""


_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _per_block(value: Any, n: int) -> list[int]:
    """``layers_per_block`` as one count per level (diffusers allows an int or a tuple)."""
    return [int(value)] * n if isinstance(value, int) else [int(v) for v in value]


def unet_prefixes(config: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, LDM prefix, is a resnet) for a UNet2DConditionModel config.

    Follows openaimodel.UNetModel: ``input_blocks.0`` is conv_in; then per level its resnets
    (``.0``) with attention (``.1``) and a downsampler (``.0.op``) except at the last level; the
    middle block is resnet/attention/resnet; output blocks mirror the levels with one resnet more
    and the upsampler after the attention (``.2.conv``) or after the resnet (``.1.conv``).
    """
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    n = len(down)
    if len(up) != n:
        raise MappingError(f"{n} down blocks but {len(up)} up blocks")
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid != "UNetMidBlock2DCrossAttn":
        raise MappingError(f"mid_block_type {mid} has no counterpart in the original UNet")
    lpb = _per_block(config["layers_per_block"], n)
    table: list[tuple[str, str, bool]] = [
        ("time_embedding.linear_1.", "time_embed.0.", False),
        ("time_embedding.linear_2.", "time_embed.2.", False),
        ("conv_in.", "input_blocks.0.0.", False),
        ("conv_norm_out.", "out.0.", False),
        ("conv_out.", "out.2.", False),
        ("mid_block.resnets.0.", "middle_block.0.", True),
        ("mid_block.attentions.0.", "middle_block.1.", False),
        ("mid_block.resnets.1.", "middle_block.2.", True),
    ]
    if config.get("addition_embed_type") == "text_time":
        table += [("add_embedding.linear_1.", "label_emb.0.0.", False),
                  ("add_embedding.linear_2.", "label_emb.0.2.", False)]
    k = 1
    for i in range(n):
        for j in range(lpb[i]):
            table.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", True))
            table.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.", False))
            k += 1
        if i < n - 1:
            table.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{k}.0.op.", False))
            k += 1
    k = 0
    for i, (block, layers) in enumerate(zip(up, reversed(lpb))):
        for j in range(layers + 1):
            table.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", True))
            table.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.", False))
            if j == layers and i < n - 1:
                slot = 2 if "CrossAttn" in block else 1
                table.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{k}.{slot}.conv.", False))
            k += 1
    return table


def unet_entries(keys: Iterable[str], config: Mapping[str, Any], prefix: str = UNET_PREFIX) -> list[Entry]:
    """Map a UNet2DConditionModel state dict's keys to the original UNet's names."""
    table = unet_prefixes(config)
    entries = []
    for key in keys:
        for dp, lp, resnet in table:
            if key.startswith(dp):
                rest = key[len(dp):]
                if resnet:
                    head, _, tail = rest.partition(".")
                    if head not in _UNET_RESNET:
                        raise MappingError(f"unet weight {key}: unknown resnet part '{head}'")
                    rest = f"{_UNET_RESNET[head]}.{tail}"
                entries.append(Entry(prefix + lp + rest, (key,)))
                break
        else:
            raise MappingError(f"unet weight {key} has no place in the original UNet layout")
    return entries


_VAE_BLOCK = re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$")
_VAE_MID = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")
_VAE_TOP = re.compile(r"^((?:encoder|decoder)\.(?:conv_in|conv_out|conv_norm_out)|quant_conv|post_quant_conv)\.(weight|bias)$")


def vae_entries(keys: Iterable[str], config: Mapping[str, Any], prefix: str = VAE_PREFIX) -> list[Entry]:
    """Map an AutoencoderKL state dict's keys to the original VAE's names (decoder levels reversed)."""
    n_up = len(config["up_block_types"])
    entries = []
    for key in keys:
        kind = "copy"
        if m := _VAE_BLOCK.match(key):
            part, blocks, i, sub, j, rest = m.groups()
            level = int(i) if blocks == "down_blocks" else n_up - 1 - int(i)
            name = "down" if blocks == "down_blocks" else "up"
            if sub == "resnets":
                ldm = f"{part}.{name}.{level}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            elif rest.startswith("conv."):
                ldm = f"{part}.{name}.{level}.{'downsample' if sub == 'downsamplers' else 'upsample'}.{rest}"
            else:
                raise MappingError(f"vae weight {key} has no place in the original VAE layout")
        elif m := _VAE_MID.match(key):
            part, sub, i, rest = m.groups()
            if sub == "resnets":
                ldm = f"{part}.mid.block_{int(i) + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                head, _, tail = rest.rpartition(".")
                if head not in _VAE_ATTN or i != "0":
                    raise MappingError(f"vae weight {key} has no place in the original VAE layout")
                ldm = f"{part}.mid.attn_1.{_VAE_ATTN[head]}.{tail}"
                kind = "conv1x1" if tail == "weight" and head != "group_norm" else "copy"
        elif _VAE_TOP.match(key):
            ldm = key.replace(".conv_norm_out.", ".norm_out.")
        else:
            raise MappingError(f"vae weight {key} has no place in the original VAE layout")
        entries.append(Entry(prefix + ldm, (key,), kind))
    return entries


def clip_entries(keys: Iterable[str], prefix: str) -> list[Entry]:
    """Hugging Face CLIP text layout (SD 1.x, SDXL's first encoder): ``<prefix>text_model.*``.

    transformers 5 dropped ``text_model.`` from CLIPTextModel's own names (CLIPTextModelWithProjection
    keeps it), so the file name is built from the bare module path, never from the state-dict key.
    """
    entries = []
    for key in keys:
        bare = key.removeprefix("text_model.")
        if bare.startswith(("embeddings.", "encoder.layers.", "final_layer_norm.")):
            entries.append(Entry(f"{prefix}text_model.{bare}", (key,)))
        else:
            raise MappingError(f"text encoder weight {key} has no place in the CLIP text layout")
    return entries


_OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPENCLIP_QKV = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
_OPENCLIP_OTHER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def openclip_entries(keys: Iterable[str], prefix: str) -> list[Entry]:
    """OpenCLIP text layout (SD 2.x, SDXL's second encoder): ``<prefix>transformer.resblocks.N.*``."""
    full = {k.removeprefix("text_model."): k for k in keys}
    entries, fused = [], {}
    for bare, key in full.items():
        if key == "text_projection.weight":
            entries.append(Entry(prefix + "text_projection", (key,), "transpose"))
        elif bare in _OPENCLIP_TOP:
            entries.append(Entry(prefix + _OPENCLIP_TOP[bare], (key,)))
        elif m := _OPENCLIP_QKV.match(bare):
            fused.setdefault((int(m[1]), m[3]), {})[m[2]] = key
        elif (m := _OPENCLIP_OTHER.match(bare)) and m[2] in _OPENCLIP_LAYER:
            entries.append(Entry(f"{prefix}transformer.resblocks.{m[1]}.{_OPENCLIP_LAYER[m[2]]}.{m[3]}", (key,)))
        else:
            raise MappingError(f"text encoder weight {key} has no place in the OpenCLIP text layout")
    for (layer, what), parts in sorted(fused.items()):
        if set(parts) != {"q", "k", "v"}:
            raise MappingError(f"text encoder layer {layer}: q/k/v {what} projections incomplete")
        entries.append(Entry(f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{what}",
                             (parts["q"], parts["k"], parts["v"]), "concat"))
    return entries


def component_entries(name: str, keys: Iterable[str], config: Mapping[str, Any], family: str) -> list[Entry]:
    """The map of one pipeline component (unet, vae, text_encoder, text_encoder_2) for ``family``."""
    if name == "unet":
        return unet_entries(keys, config)
    if name == "vae":
        return vae_entries(keys, config)
    layout, prefix = TEXT_LAYOUTS[family][name]
    return clip_entries(keys, prefix) if layout == "clip" else openclip_entries(keys, prefix)


def _component_config(model: Any) -> dict[str, Any]:
    """A diffusers or transformers component's config as a plain dict."""
    cfg = model.config
    return dict(cfg) if isinstance(cfg, Mapping) else cfg.to_dict()


def _to_ldm(entry: Entry, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The single-file tensor of one entry, from the diffusers state dict."""
    tensors = [state[k] for k in entry.diffusers]
    if entry.kind == "concat":
        out = torch.cat(tensors, 0)
    elif entry.kind == "transpose":
        out = tensors[0].T
    elif entry.kind == "conv1x1":
        out = tensors[0].reshape(*tensors[0].shape, 1, 1) if tensors[0].ndim == 2 else tensors[0]
    else:
        out = tensors[0]
    return out.detach().contiguous()


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------


def pipeline_family(pipe: Any) -> str:
    """The single-file layout of a pipeline: sdxl, sd2 (OpenCLIP text encoder, gelu) or sd1."""
    comps = getattr(pipe, "components", {})
    if "vqvae" in comps or "bert" in comps or type(pipe).__name__.startswith("LDM"):
        raise StudioError(f"{type(pipe).__name__}: LDM has no standard single-file format; "
                          f"save it as a diffusers folder (pipe.save_pretrained(DIR)) and load that folder")
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer") if comps.get(c) is None]
    if missing:
        raise StudioError(f"{type(pipe).__name__}: cannot write a single file without {', '.join(missing)}; "
                          f"only Stable Diffusion 1.x, 2.x and SDXL pipelines are supported")
    if comps.get("text_encoder_2") is not None:
        return "sdxl"
    act = getattr(comps["text_encoder"].config, "hidden_act", "quick_gelu")
    return "sd2" if act == "gelu" else "sd1"


def _model_names(family: str) -> tuple[str, ...]:
    """The weight-bearing components of ``family``, in file order."""
    return ("unet", "vae", *TEXT_LAYOUTS[family])


def convert_to_ldm(components: Mapping[str, Any], family: str,
                   dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The original-layout state dict of ``components`` (works on meta tensors too)."""
    out: dict[str, torch.Tensor] = {}
    for name in _model_names(family):
        model = components[name]
        state = model.state_dict()
        adapters = [k for k in state if ".base_layer." in k or ".lora_" in k]
        if adapters:
            raise StudioError(f"{name}: carries unmerged adapter layers (e.g. {adapters[0]}); fuse them "
                              f"(pipe.fuse_lora(); pipe.unload_lora_weights()) before writing a single file")
        try:
            entries = component_entries(name, state.keys(), _component_config(model), family)
        except MappingError as exc:
            raise StudioError(f"{name}: cannot be written in the original single-file layout ({exc})") from exc
        for entry in entries:
            tensor = _to_ldm(entry, state)
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            out[entry.ldm] = tensor
        if name.startswith("text_encoder") and TEXT_LAYOUTS[family][name][0] == "clip":
            # real SD 1.x / SDXL files carry CLIP's position_ids buffer; tools that load strictly expect it
            positions = model.config.max_position_embeddings
            out[f"{TEXT_LAYOUTS[family][name][1]}text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return out


def _tokenizer_files(tok: Any) -> dict[str, str]:
    """vocab.json, merges.txt and the tokenizer config of a CLIP BPE tokenizer, as text."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise StudioError(f"{type(tok).__name__}: not a fast BPE tokenizer; cannot embed it in a single file")
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE":
        raise StudioError(f"{type(tok).__name__}: a {model.get('type')} tokenizer, not BPE; cannot embed it")
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    files = {"vocab.json": json.dumps(model["vocab"], ensure_ascii=False),
             "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n"}
    with tempfile.TemporaryDirectory(prefix="studio-tok-") as tmp:
        tok.save_pretrained(tmp)
        for name in TOKENIZER_FILES[2:]:
            if (Path(tmp) / name).is_file():
                data = json.loads((Path(tmp) / name).read_text())
                for transient in ("is_local", "local_files_only", "name_or_path", "tokenizer_file"):
                    data.pop(transient, None)
                files[name] = json.dumps(data, ensure_ascii=False)
    return files


def _jsonable(value: Any) -> Any:
    """Config values as JSON types (tuples to lists, dtypes to names)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return value


def studio_metadata(pipe: Any, family: str) -> dict[str, str]:
    """The ``studio.*`` header entries that let the studio rebuild ``pipe`` offline."""
    meta = {f"{META}format_version": FORMAT_VERSION, f"{META}family": family,
            f"{META}pipeline": PIPELINES[family]}
    index = {k: _jsonable(v) for k, v in dict(pipe.config).items() if not k.startswith("_")}
    meta[f"{META}model_index"] = json.dumps(index)
    for name in (*_model_names(family), "scheduler"):
        component = pipe.components[name]
        cfg = {k: v for k, v in _component_config(component).items() if not k.startswith("_")}
        if name in ("unet", "vae", "scheduler"):
            cfg["_class_name"] = type(component).__name__
        meta[f"{META}config.{name}"] = json.dumps(_jsonable(cfg))
    first: dict[str, str] = {}
    for name in ("tokenizer", "tokenizer_2"):
        tok = pipe.components.get(name)
        if tok is None:
            continue
        for fname, text in _tokenizer_files(tok).items():
            if name != "tokenizer" and first.get(fname) == text and fname in ("vocab.json", "merges.txt"):
                meta[f"{META}{name}.{fname}"] = "@tokenizer"  # same vocabulary: stored once
                continue
            meta[f"{META}{name}.{fname}"] = text
            if name == "tokenizer":
                first[fname] = text
    return meta


def save_single_file(pipe: Any, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                     embed_config: bool = True) -> Path:
    """Write an SD 1.x / SD 2.x / SDXL pipeline as one original-layout ``.safetensors`` file.

    ``dtype`` casts floating-point weights (e.g. ``torch.float16`` halves the file); ``embed_config``
    stores the diffusers configs and tokenizer files in the header so the studio can load the file
    offline whatever its architecture. The write is atomic: a temp file beside ``path``, then
    ``os.replace``. Returns ``path``.
    """
    from studio.fileio import write_safetensors

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise StudioError(f"{path}: single-file checkpoints are written as .safetensors; use that suffix")
    try:
        family = pipeline_family(pipe)
        tensors = convert_to_ldm(pipe.components, family, dtype)
        metadata = {"format": "pt"}
        if embed_config:
            metadata.update(studio_metadata(pipe, family))
    except StudioError as exc:
        raise StudioError(f"{path}: not written: {exc}") from exc
    write_safetensors(path, tensors, metadata)
    log.info("wrote %s (%s, %d tensors%s)", path, family, len(tensors), ", configs embedded" if embed_config else "")
    return path


# ----------------------------------------------------------------------------------------------
# reading: the file
# ----------------------------------------------------------------------------------------------


class Checkpoint:
    """The tensors of a single-file checkpoint, read lazily (safetensors) or from a trusted pickle."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str],
                 state: Mapping[str, torch.Tensor] | None = None) -> None:
        self.path, self.shapes, self.metadata, self._state = path, shapes, metadata, state
        self._handle: Any = None

    @property
    def keys(self) -> list[str]:
        """Every tensor name in the file."""
        return list(self.shapes)

    def get(self, key: str) -> torch.Tensor:
        """One tensor, read from disk on demand."""
        if self._state is not None:
            return self._state[key]
        if self._handle is None:
            from safetensors import safe_open

            try:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
                raise _invalid(self.path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
        try:
            return self._handle.get_tensor(key)
        except Exception as exc:  # noqa: BLE001
            raise _invalid(self.path, f"tensor {key} cannot be read: {exc}") from exc

    def close(self) -> None:
        """Release the file."""
        self._handle = None
        self._state = None


def _invalid(path: Path, why: str) -> StudioError:
    """The one-line error for a file that is not a readable safetensors checkpoint."""
    return StudioError(f"{path}: not a valid .safetensors checkpoint ({why}); re-download or re-export the file")


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def read_header(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and metadata of a ``.safetensors`` file, from its header alone (cheap).

    Checks what the format promises: an 8-byte header length, a JSON header, and tensor data
    that lies inside the file; anything else is a StudioError naming the file.
    """
    entries, metadata, _ = read_header_entries(path)
    return {name: tuple(int(d) for d in info["shape"]) for name, info in entries.items()}, metadata


def read_header_entries(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str], int]:
    """:func:`read_header`'s checked header, whole: each tensor's entry (dtype, shape, data_offsets),
    the metadata, and the offset of the data block (tensor offsets count from there)."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _invalid(path, f"only {size} bytes long")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > min(size - 8, MAX_HEADER):
            hint = "; it looks like a zip/pickle checkpoint renamed, use the .ckpt suffix" if head[:2] == b"PK" else ""
            raise _invalid(path, f"header length {n} does not fit a file of {size} bytes{hint}")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _invalid(path, f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise _invalid(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    shapes, end = {}, 0
    for name, info in header.items():
        try:
            start, stop = (int(x) for x in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            width = _DTYPE_BYTES.get(info["dtype"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _invalid(path, f"malformed entry for tensor {name}") from exc
        count = 1
        for d in shape:
            count *= d
        if width is not None and stop - start != count * width:
            raise _invalid(path, f"tensor {name} has {stop - start} bytes for shape {list(shape)}")
        shapes[name] = shape
        end = max(end, stop)
    if 8 + n + end > size:
        raise _invalid(path, f"truncated: the header promises {8 + n + end} bytes, the file has {size}")
    if not shapes:
        raise _invalid(path, "it holds no tensors")
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _invalid(path, "metadata is not a string map")
    return header, metadata, 8 + n


def cast_float_buffers(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Float buffers that the weight files do not hold (non-persistent ones) follow the weights' dtype."""
    for module in model.modules():
        for bname, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                module._buffers[bname] = buf.to(dtype)


def open_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False) -> Checkpoint:
    """Open a ``.safetensors`` file (header only), or a ``.ckpt`` pickle when ``trust_pickle``."""
    path = Path(path)
    if not path.is_file():
        raise StudioError(f"{path}: no such checkpoint file")
    if path.suffix.lower() == ".safetensors":
        shapes, metadata = read_header(path)
        return Checkpoint(path, shapes, metadata)
    if not trust_pickle:
        raise StudioError(f"{path}: a pickle checkpoint can run arbitrary code when loaded; convert it to "
                          f".safetensors, or pass --trust-pickle if you trust its source")
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - unpickling can raise anything
        raise StudioError(f"{path}: not a valid .ckpt checkpoint ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); re-download the file") from exc
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not data:
        raise StudioError(f"{path}: a pickle, but not a checkpoint (no state_dict of tensors)")
    state = {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
    return Checkpoint(path, {k: tuple(v.shape) for k, v in state.items()}, {}, state)


# ----------------------------------------------------------------------------------------------
# reading: what the file is
# ----------------------------------------------------------------------------------------------


def _describe(keys: set[str]) -> str:
    """What a set of keys that is not a base model looks like, with the fix."""
    def has(*parts: str) -> bool:
        return any(p in k for k in keys for p in parts)

    def starts(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if has("lora_down", "lora_up", "lora_A.", "lora_B.", "lora.down", "lora.up", "hada_w1", "lokr_w1") or \
            starts("lora_unet_", "lora_te"):
        return "looks like a LoRA, not a base model; use it with --adapter"
    if has("string_to_param") or keys <= {"emb_params", "clip_l", "clip_g", "string_to_token"}:
        return "looks like a textual-inversion embedding, not a base model"
    if starts("control_model.", "controlnet_") or has("input_hint_block"):
        return "looks like a ControlNet, not a base model"
    if starts("encoder.down.", "decoder.up.") or (starts(VAE_PREFIX) and not starts(UNET_PREFIX)):
        return "looks like a standalone VAE, not a full checkpoint; pass a full checkpoint or a diffusers folder"
    if starts("down_blocks.", "up_blocks.", "mid_block.", "encoder.down_blocks.", "text_model.", "encoder.layers."):
        return ("looks like one component of a diffusers folder, not a single-file checkpoint; point --base at "
                "the folder that holds model_index.json")
    if starts("double_blocks.", "joint_blocks.", "transformer_blocks."):
        return "looks like a transformer model (Flux/SD3), an unsupported family; supported: SD 1.x, SD 2.x, SDXL"
    sample = ", ".join(sorted(keys)[:3])
    return (f"no base-model weights found (no {UNET_PREFIX}* keys; first keys: {sample}); expected an "
            f"SD 1.x, SD 2.x or SDXL checkpoint")


def detect_checkpoint_family(keys: Iterable[str], source: str | os.PathLike = "checkpoint") -> str:
    """The family of an original-layout checkpoint from its key names: 'sd1', 'sd2' or 'sdxl'.

    SD 1.x carries Hugging Face CLIP under ``cond_stage_model.transformer.``, SD 2.x OpenCLIP under
    ``cond_stage_model.model.``, SDXL two encoders under ``conditioner.embedders.``. Anything
    else (a LoRA, a VAE, a refiner, LDM, Flux...) is a StudioError that says what it looks like.
    """
    keys = set(keys)

    def starts(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if not starts(UNET_PREFIX):
        raise StudioError(f"{source}: {_describe(keys)}")
    if starts(UNET_PREFIX + "joint_blocks.", UNET_PREFIX + "double_blocks.", UNET_PREFIX + "transformer_blocks."):
        raise StudioError(f"{source}: a transformer checkpoint (SD3/Flux-like), an unsupported family; "
                          f"supported: SD 1.x, SD 2.x, SDXL")
    if starts("conditioner.embedders.1.model.transformer.resblocks.") and starts("conditioner.embedders.0.transformer."):
        return "sdxl"
    if starts("conditioner.embedders.0.model."):
        raise StudioError(f"{source}: looks like an SDXL refiner (one OpenCLIP encoder), which is not supported; "
                          f"use an SDXL base checkpoint")
    if starts("cond_stage_model.model.transformer.resblocks."):
        return "sd2"
    if starts("cond_stage_model.transformer.attn_layers.", "first_stage_model.quantize."):
        raise StudioError(f"{source}: looks like a CompVis LDM checkpoint; LDM has no standard single-file "
                          f"format: convert it to a diffusers folder and pass that folder")
    if starts("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.embeddings."):
        return "sd1"
    raise StudioError(f"{source}: has a UNet but no known text encoder (no cond_stage_model.* or conditioner.* "
                      f"keys); pass a full SD 1.x, SD 2.x or SDXL checkpoint")


def _v_prediction_from_sidecar(path: Path) -> bool | None:
    """A1111's convention: ``<name>.yaml`` beside the file; ``parameterization: v`` marks v-prediction."""
    sidecar = path.with_suffix(".yaml")
    if not sidecar.is_file():
        return None
    try:
        import yaml

        doc = yaml.safe_load(sidecar.read_text())
        return (doc or {}).get("model", {}).get("params", {}).get("parameterization", "eps") == "v"
    except Exception:  # noqa: BLE001 - an unreadable sidecar is only a missed hint
        log.warning("%s: unreadable sidecar config, ignored", sidecar)
        return None


def guess_v_prediction(path: Path) -> bool:
    """Whether an SD 2.x file is the 768-v model: from a sidecar .yaml, else '768'/'v-pred' in its name."""
    sidecar = _v_prediction_from_sidecar(path)
    if sidecar is not None:
        return sidecar
    return bool(re.search(r"768|v[-_]?pred", path.name.lower()))


# ----------------------------------------------------------------------------------------------
# reading: configs
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Spec:
    """Everything needed to rebuild the pipeline, whatever the source of the configs."""

    source: str  # words for error messages
    pipeline: str
    index: dict[str, Any]
    configs: dict[str, dict[str, Any]]
    tokenizers: dict[str, dict[str, str]]  # name -> {file name: text}


def _read_json(file: Path, origin: str) -> dict[str, Any]:
    """A JSON object from a config file, or a StudioError naming it."""
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StudioError(f"{file}: unreadable config ({exc}); fix or remove it from {origin}") from exc
    if not isinstance(data, dict):
        raise StudioError(f"{file}: not a JSON object; fix or remove it from {origin}")
    return data


def _embedded_spec(ckpt: Checkpoint, family: str) -> Spec:
    """The configs and tokenizer files that :func:`save_single_file` put in the header."""
    meta = ckpt.metadata
    source = "the configs embedded in the file"

    def load(key: str) -> Any:
        try:
            return json.loads(meta[key])
        except (KeyError, json.JSONDecodeError) as exc:
            raise StudioError(f"{ckpt.path}: embedded studio metadata is damaged ({key}); "
                              f"pass --config a diffusers folder that describes the model") from exc

    configs = {name: load(f"{META}config.{name}") for name in (*_model_names(family), "scheduler")}
    tokenizers: dict[str, dict[str, str]] = {}
    for name in ("tokenizer", "tokenizer_2"):
        files = {f: meta[f"{META}{name}.{f}"] for f in TOKENIZER_FILES if f"{META}{name}.{f}" in meta}
        for fname, text in list(files.items()):
            if text == "@tokenizer":
                files[fname] = tokenizers.get("tokenizer", {}).get(fname, "")
        if files:
            tokenizers[name] = files
    return Spec(source, meta.get(f"{META}pipeline", ""), load(f"{META}model_index"), configs, tokenizers)


def _cached_vocab() -> dict[str, str] | None:
    """vocab.json + merges.txt of a CLIP tokenizer already in the local Hugging Face cache, if any."""
    from huggingface_hub import try_to_load_from_cache

    for repo, sub in _CACHED_VOCABS:
        found = {}
        for fname in ("vocab.json", "merges.txt"):
            hit = try_to_load_from_cache(repo, f"{sub}/{fname}" if sub else fname)
            if isinstance(hit, str) and Path(hit).is_file():
                found[fname] = Path(hit).read_text(encoding="utf-8")
        if len(found) == 2:
            log.info("using the CLIP vocabulary cached from %s", repo)
            return found
    return None


def _folder_spec(ckpt: Checkpoint, family: str, bundled: str, config: Path | None) -> Spec:
    """Configs from ``config`` (a diffusers folder) where it has them, else the bundled ones."""
    base = CONFIGS_DIR / bundled
    source = f"--config {config} (over the bundled {bundled} configs)" if config else f"the bundled {bundled} configs"
    layers = [config, base] if config else [base]

    def pick(rel: str) -> Path:
        for root in layers:
            if (root / rel).is_file():
                return root / rel
        raise StudioError(f"{source}: {rel} is missing; pass --config a complete diffusers folder")

    index = _read_json(pick("model_index.json"), source)
    configs = {name: _read_json(pick(f"{name}/config.json"), source) for name in _model_names(family)}
    configs["scheduler"] = _read_json(pick("scheduler/scheduler_config.json"), source)
    tokenizers: dict[str, dict[str, str]] = {}
    cached: dict[str, str] | None = None
    for name in ("tokenizer", "tokenizer_2") if family == "sdxl" else ("tokenizer",):
        files: dict[str, str] = {}
        folder = config / name if config else None
        if folder and ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
                       or (folder / "tokenizer.json").is_file()):
            for fname in (*TOKENIZER_FILES, "tokenizer.json"):
                if (folder / fname).is_file():
                    files[fname] = (folder / fname).read_text(encoding="utf-8")
        else:
            cached = cached if cached is not None else _cached_vocab()
            if cached is None:
                repo = _REAL_TOKENIZER_REPOS.get(bundled, "the model's diffusers repository")
                raise StudioError(
                    f"{ckpt.path}: no CLIP tokenizer vocabulary is available offline for this {family} checkpoint; "
                    f"pass --config DIR where DIR/{name}/ holds vocab.json and merges.txt "
                    f"(e.g. the {name}/ folder of {repo})")
            files = dict(cached)
            files["tokenizer_config.json"] = pick(f"{name}/tokenizer_config.json").read_text()
        tokenizers[name] = files
    return Spec(source, index.get("_class_name", PIPELINES[family]), index, configs, tokenizers)


# ----------------------------------------------------------------------------------------------
# reading: building the pipeline
# ----------------------------------------------------------------------------------------------

_MODEL_CLASSES = {"unet": {"UNet2DConditionModel"}, "vae": {"AutoencoderKL"},
                  "text_encoder": {"CLIPTextModel", "CLIPTextModelWithProjection"},
                  "text_encoder_2": {"CLIPTextModel", "CLIPTextModelWithProjection"}}


def _empty_model(name: str, spec: Spec) -> Any:
    """The component ``name`` built from its config with weights on the meta device."""
    from accelerate import init_empty_weights

    cfg = dict(spec.configs[name])
    entry = spec.index.get(name)
    default = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
               "text_encoder_2": "CLIPTextModelWithProjection"}[name]
    cls_name = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] else default
    if cls_name not in _MODEL_CLASSES[name]:
        raise StudioError(f"{spec.source}: {name} is a {cls_name}; a single file holds {', '.join(_MODEL_CLASSES[name])}")
    try:
        with init_empty_weights():
            if name in ("unet", "vae"):
                import diffusers

                return getattr(diffusers, cls_name).from_config(cfg)
            import transformers

            te_config = transformers.CLIPTextConfig.from_dict(cfg)
            return getattr(transformers, cls_name)(te_config)
    except (TypeError, ValueError, KeyError) as exc:
        raise StudioError(f"{spec.source}: the {name} config cannot build a model ({exc}); "
                          f"pass --config a diffusers folder that matches the checkpoint") from exc


def _from_ldm(entry: Entry, tensor: torch.Tensor, expected: Mapping[str, torch.Size]) -> dict[str, torch.Tensor] | str:
    """The diffusers tensors of one entry, or a description of the shape mismatch."""
    want = [tuple(expected[k]) for k in entry.diffusers]
    if entry.kind == "concat":
        rows = [w[0] for w in want]
        need = (sum(rows), *want[0][1:])
        if tuple(tensor.shape) != need:
            return f"{list(tensor.shape)}, expected {list(need)}"
        return {k: t.contiguous() for k, t in zip(entry.diffusers, torch.split(tensor, rows, 0))}
    if entry.kind == "transpose":
        tensor = tensor.T
    elif entry.kind == "conv1x1" and tensor.ndim > 2 and all(d == 1 for d in tensor.shape[2:]):
        tensor = tensor.reshape(tensor.shape[:2])
    if tuple(tensor.shape) != want[0]:
        shown = tuple(tensor.T.shape) if entry.kind == "transpose" else tuple(tensor.shape)
        need = tuple(reversed(want[0])) if entry.kind == "transpose" else want[0]
        return f"{list(shown)}, expected {list(need)}"
    return {entry.diffusers[0]: tensor.contiguous()}


def _alias(key: str) -> str:
    """Older SD 1.x files store CLIP without the ``text_model.`` level."""
    return key.replace(".transformer.text_model.", ".transformer.", 1)


def _ignorable(key: str, family: str, text_layers: Mapping[str, tuple[str, int]]) -> bool:
    """Keys real files carry that the diffusers components do not need."""
    if key.endswith((".position_ids", ".logit_scale")) or key.startswith(VAE_PREFIX + "loss."):
        return True
    if family == "sd2":
        prefix, layers = text_layers["text_encoder"]
        if key == prefix + "text_projection":
            return True  # SD 2.x uses the encoder's hidden states, never its projection
        m = re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.", key)
        if m and int(m[1]) == layers:
            return True  # SD 2.x uses the penultimate layer: diffusers drops OpenCLIP's last block
    return False


def load_components(ckpt: Checkpoint, spec: Spec, family: str, dtype: torch.dtype,
                    entries_out: dict[str, list[Entry]] | None = None) -> dict[str, Any]:
    """The UNet, VAE and text encoder(s) of ``ckpt``, strictly: missing, surplus or misshapen weights raise.

    With ``entries_out`` (a dict) nothing is read: the models stay empty (meta device), the checks run
    on the header's shapes, and each component's entries go into the dict for
    :func:`studio.loading.materialize` to read later.
    """
    empty = entries_out is not None
    models: dict[str, Any] = {}
    consumed: set[str] = set()
    missing: list[str] = []
    misshapen: list[str] = []
    text_layers = {n: (p, int(spec.configs[n].get("num_hidden_layers", 0))) for n, (_, p) in TEXT_LAYOUTS[family].items()}
    available = set(ckpt.keys)
    for name in _model_names(family):
        model = _empty_model(name, spec)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        try:
            entries = component_entries(name, expected, _component_config(model), family)
        except MappingError as exc:
            raise StudioError(f"{spec.source}: the {name} config has no single-file layout ({exc})") from exc
        state: dict[str, torch.Tensor] = {}
        for entry in entries:
            key = entry.ldm if entry.ldm in available else _alias(entry.ldm)
            if key not in available:
                missing.append(entry.ldm)
                continue
            consumed.add(key)
            tensor = torch.empty(ckpt.shapes[key], device="meta") if empty else ckpt.get(key)
            result = _from_ldm(entry, tensor, expected)
            if isinstance(result, str):
                misshapen.append(f"{key} is {result}")
                continue
            for k, t in result.items():
                state[k] = t.to(dtype) if t.is_floating_point() else t
        if missing or misshapen:
            break
        if empty:
            entries_out[name] = entries
            models[name] = model.eval()
            continue
        model.load_state_dict(state, strict=True, assign=True)
        cast_float_buffers(model, dtype)
        model.eval()
        models[name] = model
    fix = "pass --config a diffusers folder that matches this checkpoint's architecture"
    if missing:
        raise StudioError(f"{ckpt.path}: {len(missing)} weight(s) that {spec.source} need are missing "
                          f"(e.g. {', '.join(missing[:2])}); the file is incomplete or of another architecture: {fix}")
    if misshapen:
        raise StudioError(f"{ckpt.path}: shape mismatch against {spec.source}: {misshapen[0]}"
                          f"{f' (and {len(misshapen) - 1} more)' if len(misshapen) > 1 else ''}; {fix}")
    strict = (UNET_PREFIX, VAE_PREFIX, *(p for p, _ in text_layers.values()))
    surplus = [k for k in ckpt.keys if k.startswith(strict) and k not in consumed and not _ignorable(k, family, text_layers)]
    if surplus:
        raise StudioError(f"{ckpt.path}: {len(surplus)} weight(s) that {spec.source} have no place for "
                          f"(e.g. {', '.join(surplus[:2])}); {fix}")
    others = [k for k in ckpt.keys if not k.startswith(strict)]
    if others:
        log.debug("%s: ignored %d non-model keys (e.g. %s)", ckpt.path, len(others), others[0])
    return models


def _tokenizer(name: str, files: Mapping[str, str], source: str) -> Any:
    """A CLIP tokenizer from its files' text, through a temporary folder (never the network)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="studio-tok-") as tmp:
        for fname, text in files.items():
            (Path(tmp) / fname).write_text(text, encoding="utf-8")
        try:
            return CLIPTokenizer.from_pretrained(tmp, local_files_only=True)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            raise StudioError(f"{source}: the {name} files do not make a CLIP tokenizer ({exc}); "
                              f"pass --config a diffusers folder with a complete {name}/") from exc


def _scheduler(cfg: Mapping[str, Any], source: str, prediction_type: str | None) -> Any:
    """The scheduler of a config, only from diffusers' own scheduler classes."""
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    name = cfg.get("_class_name", "")
    cls = getattr(diffusers, name, None) if name.endswith("Scheduler") else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise StudioError(f"{source}: unknown scheduler class '{name}'; use a diffusers scheduler config")
    cfg = dict(cfg)
    if prediction_type is not None:
        cfg["prediction_type"] = prediction_type
    return cls.from_config(cfg)


def load_single_file(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    trust_pickle: bool = False,
    config: str | os.PathLike | None = None,
    prediction_type: str | None = None,
    empty: bool = False,
) -> Any:
    """Load an original-layout SD 1.x / SD 2.x / SDXL checkpoint as a diffusers pipeline, offline.

    The header is read first (cheap) and the family detected from the key names. The
    architecture comes from, in order: ``config`` (a diffusers folder; its missing parts fall
    back to the bundled configs), the configs the studio embedded in the file, the configs
    bundled in ``assets/configs``. Weights are read one tensor at a time, strictly.

    SD 2.x v-prediction vs epsilon cannot be seen from the keys: with bundled configs the 768-v
    model (v_prediction) is assumed when an A1111 sidecar ``<name>.yaml`` says
    ``parameterization: v`` or, lacking one, when the file name contains '768' or 'v-pred';
    otherwise the 512 base model (epsilon). ``prediction_type`` ('epsilon' or 'v_prediction')
    overrides every guess and any embedded scheduler config.

    ``empty``: the components are built and checked against the header but hold no weights (meta
    device); ``pipe._studio_entries`` says where each one's are (staged loading, studio.loading).
    """
    path = Path(path)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise StudioError(f"prediction type {prediction_type}: unknown; use {' or '.join(PREDICTION_TYPES)}")
    ckpt = open_checkpoint(path, trust_pickle=trust_pickle)
    family = detect_checkpoint_family(ckpt.keys, source=path)
    embedded = ckpt.metadata.get(f"{META}format_version") is not None
    cfg_dir = Path(config).expanduser() if config is not None else None
    if cfg_dir is not None and not cfg_dir.is_dir():
        raise StudioError(f"--config {config}: no such folder; pass a diffusers model folder (with model_index.json)")
    if embedded and cfg_dir is None:
        stored = ckpt.metadata.get(f"{META}family")
        if stored != family:
            raise StudioError(f"{path}: embedded studio metadata says {stored}, the weights are {family}; "
                              f"pass --config a diffusers folder that describes the model")
        spec = _embedded_spec(ckpt, family)
    else:
        key = family
        if family == "sd2":
            v = prediction_type == "v_prediction" if prediction_type else guess_v_prediction(path)
            key = "sd2-v" if v else "sd2"
            if prediction_type is None and cfg_dir is None:
                log.info("%s: SD 2.x, assuming %s (from the file name or sidecar); override with the "
                         "prediction type option", path.name, "v_prediction (768-v)" if v else "epsilon (512 base)")
        spec = _folder_spec(ckpt, family, FAMILY_CONFIGS[key], cfg_dir)
    if spec.pipeline != PIPELINES[family]:
        raise StudioError(f"{spec.source}: describes a {spec.pipeline}, but {path.name} is a {family} checkpoint "
                          f"({PIPELINES[family]}); pass --config a matching diffusers folder")
    needed = {"tokenizer", "tokenizer_2"} if family == "sdxl" else {"tokenizer"}
    if needed - set(spec.tokenizers):
        raise StudioError(f"{path}: {spec.source} lack {', '.join(sorted(needed - set(spec.tokenizers)))}; "
                          f"pass --config a diffusers folder that has them")
    tokenizers = {name: _tokenizer(name, files, spec.source) for name, files in spec.tokenizers.items()}
    scheduler = _scheduler(spec.configs["scheduler"], spec.source, prediction_type)
    entries: dict[str, list[Entry]] | None = {} if empty else None
    try:
        models = load_components(ckpt, spec, family, dtype, entries_out=entries)
    finally:
        ckpt.close()
    import diffusers

    pipe_cls = getattr(diffusers, PIPELINES[family])
    kwargs: dict[str, Any] = dict(models, scheduler=scheduler, **tokenizers)
    if family == "sdxl":
        kwargs["force_zeros_for_empty_prompt"] = bool(spec.index.get("force_zeros_for_empty_prompt", True))
        if spec.index.get("add_watermarker") is not None:
            kwargs["add_watermarker"] = bool(spec.index["add_watermarker"])
    else:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipe_cls(**kwargs)
    if empty:
        pipe._studio_entries = entries
    log.info("loaded %s as %s from %s", path, family, spec.source)
    return pipe


__all__ = [
    "CONFIGS_DIR", "Checkpoint", "Entry", "FAMILY_CONFIGS", "convert_to_ldm", "component_entries",
    "detect_checkpoint_family", "guess_v_prediction", "load_single_file", "open_checkpoint", "pipeline_family",
    "read_header", "save_single_file", "studio_metadata", "unet_prefixes",
]
