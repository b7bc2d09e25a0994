"""AutoLoRA's weight encoder: an adapter's factors -> one vector in the base text encoder's space.

For each layer the encoder knows (a *slot*: a Linear/Conv2d of the base model that some method
can adapt) a learned probe ``x`` gives tokens ``x A^T B^T`` from the adapter's own factors; one
linear projection per layer *type* (role and width, e.g. ``attn2.to_v:128``) maps them to the
encoder width; learned position embeddings (one per slot and probe); two small pre-norm
transformer layers; a layer norm; a mean over the tokens present; a linear map to the text width.

How odd adapters are handled:

* **missing layers**: a slot the adapter does not adapt gives no token (masked out of attention
  and of the mean), so an attention-only adapter and an all-layer one encode side by side;
* **other ranks**: a token has length ``d_out`` whatever the rank; within a batch smaller ranks
  are zero-padded, which adds exact zeros;
* **non-LoRA methods** (LoHa, LoKr, DoRA, TLoRA, ...): the exact per-layer delta (the mixer's
  reader, :func:`studio.mixing._read_factors`) is reduced to its best rank-``lowrank`` form by
  SVD (:func:`studio.autolora.functional.effective_lowrank`);
* **layers the encoder does not know** (another base model): skipped with a count; an adapter
  with no known layer at all is refused with a clear error.

Tokens are built in slot order, never in the file's key order, so the vector does not depend on
the order of an adapter's keys (tests/test_autolora.py checks it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from studio.autolora.functional import effective_lowrank, gram_tokens, probe_tokens, rms_normalize
from studio.errors import StudioError

log = logging.getLogger(__name__)

ENCODER_KIND = "autolora-encoder"
# a reference fixed inverse temperature (CLIP's initial 1/0.07); the learnable one starts there
CLIP_LOGIT_SCALE = math.log(1 / 0.07)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Sizes of the weight encoder and how it trains."""

    width: int = 64  # encoder width (micro's text width; small on purpose)
    heads: int = 4
    layers: int = 2
    ff: int = 128
    probes: int = 1  # probe vectors per layer (the paper's one)
    lowrank: int = 8  # rank of the effective low-rank form of non-LoRA adapters
    learn_temperature: bool = True  # False: the reference's fixed scale
    token_dropout: float = 0.1  # fraction of tokens hidden per training step (robustness to missing layers)
    # probe: the paper's tokens x A^T B^T; gram: B (A A^T) B^T y for learned output-side probes y, i.e. the
    # output Gram dW dW^T applied to a probe, which does not depend on the LoRA's random A init in
    # expectation (docs/autolora.md measures both); both: the two kinds side by side
    tokens: str = "gram"
    # compare texts after removing the training captions' mean pooled vector (measured: no clear gain on the
    # micro zoo, within the seed spread; docs/autolora.md)
    center_text: bool = False

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise StudioError(f"autolora encoder: width {self.width} must be a multiple of heads {self.heads}")
        if min(self.width, self.heads, self.layers, self.ff, self.probes, self.lowrank) < 1:
            raise StudioError("autolora encoder: sizes must be positive")
        if self.tokens not in ("probe", "gram", "both"):
            raise StudioError(f"autolora encoder: tokens {self.tokens!r}; choose probe, gram or both")
        if not 0.0 <= self.token_dropout < 1.0:
            raise StudioError(f"autolora encoder: token_dropout {self.token_dropout} must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class Slot:
    """One layer the encoder knows: ``component.module`` path, its type key and flattened sizes."""

    key: str
    type: str
    d_in: int
    d_out: int


def _role(path: str) -> str:
    from studio.adapters.methods import TEXT_ATTENTION, UNET_ATTENTION, UNET_PROJ, UNET_RESNET

    for suffix in UNET_ATTENTION + UNET_RESNET + UNET_PROJ + TEXT_ATTENTION:
        if path == suffix or path.endswith("." + suffix):
            m = re.search(r"\b(attn\d)\.", path)
            return (m.group(1) + "." if m else "") + suffix
    return ""


def slots_of(pipe: Any) -> list[Slot]:
    """Every layer of the pipeline that a registered method can adapt, in module order."""
    from studio.adapters.core import adapted_models

    out = []
    for comp, model in adapted_models(pipe).items():
        for name, module in model.named_modules():
            if hasattr(module, "get_base_layer"):
                continue  # a PEFT wrapper: its base layer is listed under its own name
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            name = name.replace(".base_layer", "")
            role = _role(name)
            if not role:
                continue
            w = module.weight
            out.append(Slot(f"{comp}.{name}", f"{comp}.{role}:{w.shape[0]}", int(w[0].numel()), int(w.shape[0])))
    return out


# ----------------------------------------------------------------------------- adapters as factors

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # slot key -> (down r x d_in, up d_out x r), scale folded in


def adapter_factors(pipe: Any, file: str | os.PathLike, lowrank: int = 8) -> Factors:
    """The adapter's low-rank factors per layer, for this pipeline (any layout and method).

    LoRA layers keep their own factors (the alpha/rank scale folded into ``up``); dense deltas of
    other methods become their best rank-``lowrank`` form.
    """
    from studio.adapters.core import adapter_file
    from studio.mixing import _read_factors

    f = adapter_file(file)
    out: Factors = {}
    for fac in _read_factors(pipe, f):
        key = f"{fac.component}.{fac.path}"
        if fac.down is not None:
            down = fac.down.float().flatten(1)
            up = fac.up.float().flatten(1) * float(fac.scale)
        else:
            down, up = effective_lowrank(fac.delta.float() * float(fac.scale), lowrank)
        if key in out:  # two parts on one layer (rare layouts): concatenate the ranks, the sum is exact
            d0, u0 = out[key]
            down, up = torch.cat([d0, down]), torch.cat([u0, up], dim=1)
        out[key] = (down, up)
    return out


@dataclasses.dataclass
class Batch:
    """Factors of N adapters, stacked per slot: ``slot index -> (down (N,r,d_in), up (N,d_out,r), present (N,))``."""

    n: int
    per_slot: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def stack(slots: Sequence[Slot], adapters: Sequence[Factors], *, name: Sequence[str] | None = None) -> Batch:
    """Stack adapters' factors per known slot; ranks are zero-padded to the largest of each slot.

    Layers the encoder does not know are skipped (logged); an adapter without any known layer is
    an error naming it.
    """
    index = {s.key: i for i, s in enumerate(slots)}
    per: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for j, fac in enumerate(adapters):
        known = 0
        for key in sorted(fac):  # slot order, not file order
            i = index.get(key)
            if i is None:
                continue
            down, up = fac[key]
            s = slots[i]
            if down.shape[1] != s.d_in or up.shape[0] != s.d_out:
                raise StudioError(f"adapter {name[j] if name else j}: layer {key} has factors {tuple(down.shape)} / "
                                  f"{tuple(up.shape)}, the encoder's base has {s.d_out} x {s.d_in}; "
                                  f"was it made for another model?")
            per.setdefault(i, []).append((j, down, up))
            known += 1
        skipped = len(fac) - known
        label = name[j] if name else f"#{j}"
        if known == 0:
            raise StudioError(f"adapter {label}: none of its {len(fac)} layers is a layer the AutoLoRA encoder knows "
                              f"(it was trained for another base model, or adapts only layers no method targets)")
        if skipped:
            log.info("adapter %s: %d of %d layers are unknown to the encoder and skipped", label, skipped, len(fac))
    n = len(adapters)
    out = {}
    for i in sorted(per):
        entries = per[i]
        r = max(d.shape[0] for _, d, _ in entries)
        s = slots[i]
        down = torch.zeros(n, r, s.d_in)
        up = torch.zeros(n, s.d_out, r)
        present = torch.zeros(n, dtype=torch.bool)
        for j, d, u in entries:
            down[j, : d.shape[0]] = d
            up[j, :, : d.shape[0]] = u
            present[j] = True
        out[i] = (down, up, present)
    return Batch(n, out)


# ----------------------------------------------------------------------------- the module


class WeightEncoder(nn.Module):
    """Adapter factors -> one vector per adapter in the text encoder's pooled space."""

    def __init__(self, slots: Sequence[Slot], text_dim: int, config: EncoderConfig = EncoderConfig()) -> None:
        super().__init__()
        self.slots = list(slots)
        self.text_dim = int(text_dim)
        self.config = config
        c = config
        gen = torch.Generator().manual_seed(0)  # the init is part of the method: same slots, same encoder
        self.probes = nn.ParameterList(
            [nn.Parameter(torch.randn(c.probes, s.d_in, generator=gen) / math.sqrt(s.d_in)) for s in self.slots])
        self.types = sorted({s.type for s in self.slots})
        dims = {s.type: s.d_out for s in self.slots}
        self.proj = nn.ModuleList([nn.Linear(dims[t], c.width) for t in self.types])
        self.slot_type = [self.types.index(s.type) for s in self.slots]
        self.pos = nn.Parameter(torch.randn(len(self.slots), c.probes, c.width, generator=gen) * 0.02)
        if c.tokens != "probe":
            self.probes_out = nn.ParameterList(
                [nn.Parameter(torch.randn(c.probes, s.d_out, generator=gen) / math.sqrt(s.d_out)) for s in self.slots])
            self.pos_gram = nn.Parameter(torch.randn(len(self.slots), c.probes, c.width, generator=gen) * 0.02)
        self.blocks = nn.ModuleList([
            nn.TransformerEncoderLayer(c.width, c.heads, c.ff, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(c.layers)])
        self.norm = nn.LayerNorm(c.width)
        self.out = nn.Linear(c.width, self.text_dim)
        self.logit_scale = nn.Parameter(torch.tensor(CLIP_LOGIT_SCALE), requires_grad=c.learn_temperature)
        # the mean pooled text vector of the training captions: texts are compared after subtracting it. The
        # micro text encoder's pooled outputs share a large common part, which squeezes every cosine into a
        # narrow band and lets a few adapters (the styles) sit near every prompt
        self.register_buffer("text_center", torch.zeros(self.text_dim))
        with torch.no_grad():  # deterministic init of every module (torch's default init draws from the global RNG)
            for m in list(self.proj) + [self.out]:
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / math.sqrt(m.weight.shape[1]))
                m.bias.zero_()
            for blk in self.blocks:
                for p in blk.parameters():
                    if p.dim() > 1:
                        p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
                    elif p is not None:
                        p.zero_() if not _is_norm_weight(blk, p) else p.fill_(1.0)

    def tokens(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, T, width)`` tokens of the slots present in the batch, and their ``(N, T)`` mask."""
        toks, masks = [], []
        kind = self.config.tokens
        for i, (down, up, present) in batch.per_slot.items():
            proj = self.proj[self.slot_type[i]]
            if kind in ("probe", "both"):
                t = proj(rms_normalize(probe_tokens(self.probes[i], down, up))) + self.pos[i]
                toks.append(t)
                masks.append(present[:, None].expand(-1, t.shape[1]))
            if kind in ("gram", "both"):
                t = proj(rms_normalize(gram_tokens(self.probes_out[i], down, up))) + self.pos_gram[i]
                toks.append(t)
                masks.append(present[:, None].expand(-1, t.shape[1]))
        if not toks:
            raise StudioError("AutoLoRA encoder: the batch has no layer the encoder knows")
        return torch.cat(toks, 1), torch.cat(masks, 1)

    def forward(self, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor:
        """One vector per adapter ``(N, text_dim)``; in training mode ``token_dropout`` hides random tokens."""
        x, mask = self.tokens(batch)
        if self.training and self.config.token_dropout > 0:
            keep = torch.rand(mask.shape, generator=generator) >= self.config.token_dropout
            keep |= ~(mask & keep).any(1, keepdim=True)  # an adapter keeps all its tokens rather than none
            mask = mask & keep
        for blk in self.blocks:
            x = blk(x, src_key_padding_mask=~mask)
        x = self.norm(x)
        m = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.out(pooled)

    def center(self, text: torch.Tensor) -> torch.Tensor:
        """Text vectors as the encoder compares them (the training captions' mean removed)."""
        return text - self.text_center

    def encode(self, adapters: Sequence[Factors], names: Sequence[str] | None = None) -> torch.Tensor:
        """Vectors of adapters (eval mode, no gradient): ``(N, text_dim)``."""
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self(stack(self.slots, adapters, name=names))
        finally:
            self.train(was)


class EncoderEnsemble(nn.Module):
    """Weight encoders trained alike from different seeds; an adapter's vector is the mean of their unit vectors.

    A single encoder's held-out recall moves by a query or two with its training seed (the caption
    draws and token dropout); the mean of two members' normalized vectors did not (docs/autolora.md,
    "Session 14: two encoders, one vector"). It answers like one :class:`WeightEncoder` (``encode``,
    ``center``, ``slots``, ``config``), so the library, retrieval and the eval do not care which they hold.
    """

    def __init__(self, members: Sequence[WeightEncoder]) -> None:
        super().__init__()
        if not members:
            raise StudioError("AutoLoRA encoder ensemble: no members")
        first = members[0]
        for m in members[1:]:
            if m.slots != first.slots or m.text_dim != first.text_dim or m.config != first.config:
                raise StudioError("AutoLoRA encoder ensemble: members of different slots, widths or configs")
        self.members = nn.ModuleList(members)
        self.slots, self.text_dim, self.config = first.slots, first.text_dim, first.config

    def center(self, text: torch.Tensor) -> torch.Tensor:
        """Text vectors minus the members' mean text center (zero unless ``center_text``)."""
        return text - torch.stack([m.text_center for m in self.members]).mean(0)

    def encode(self, adapters: Sequence[Factors], names: Sequence[str] | None = None) -> torch.Tensor:
        """``(N, text_dim)``: the mean over members of each adapter's L2-normalized vector."""
        return torch.stack([F.normalize(m.encode(adapters, names), dim=1) for m in self.members]).mean(0)


def _is_norm_weight(block: nn.Module, p: torch.Tensor) -> bool:
    return any(p is m.weight for m in block.modules() if isinstance(m, nn.LayerNorm))


# ----------------------------------------------------------------------------- save / load


def write_module_file(module: nn.Module, path: str | os.PathLike, header: dict[str, str],
                      dtype: torch.dtype = torch.float32) -> Path:
    """A module's weights (fp32, or ``dtype``) with ``header`` as a .safetensors file, written atomically."""
    from studio.fileio import write_safetensors

    p = Path(path)
    tensors = {k: v.detach().to(dtype).contiguous().clone() for k, v in module.state_dict().items()}
    return write_safetensors(p, tensors, header)


def read_module_file(path: str | os.PathLike, kind: str, name: str,
                     missing: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header of an AutoLoRA file of ``kind``: "{path}: {missing}" when absent, and a clear
    error for a damaged file or one of another kind (``name``: "encoder file", "gate file")."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise StudioError(f"{p}: {missing}")
    try:
        with safe_open(str(p), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds on a bad file
        raise StudioError(f"{p}: not a valid .safetensors file ({exc})") from exc
    if meta.get("studio.kind") != kind:
        raise StudioError(f"{p}: not an AutoLoRA {name} (kind {meta.get('studio.kind')!r})")
    return tensors, meta


def save_encoder(enc: WeightEncoder | EncoderEnsemble, path: str | os.PathLike, *, base_hash: str = "",
                 extra: Mapping[str, Any] | None = None) -> Path:
    """Write the encoder or ensemble (fp32 weights, config, slots and member count in the header) atomically."""
    header = {
        "studio.kind": ENCODER_KIND, "studio.base_hash": base_hash, "text_dim": str(enc.text_dim),
        "config": json.dumps(dataclasses.asdict(enc.config)),
        "slots": json.dumps([dataclasses.astuple(s) for s in enc.slots]),
        "extra": json.dumps(dict(extra or {})),
    }
    if isinstance(enc, EncoderEnsemble):
        header["members"] = str(len(enc.members))
    return write_module_file(enc, path, header)


def load_encoder(path: str | os.PathLike) -> tuple[WeightEncoder | EncoderEnsemble, dict[str, Any]]:
    """The encoder (or ensemble) of ``path`` and its header (``base_hash``, ``extra``); strict: leftover keys raise."""
    tensors, meta = read_module_file(path, ENCODER_KIND, "encoder file",
                                     "no AutoLoRA encoder file; train one with `studio autolora train`")
    config = EncoderConfig(**json.loads(meta["config"]))
    slots = [Slot(*s) for s in json.loads(meta["slots"])]
    members = int(meta.get("members", "0"))
    enc: WeightEncoder | EncoderEnsemble
    if members:
        enc = EncoderEnsemble([WeightEncoder(slots, int(meta["text_dim"]), config) for _ in range(members)])
    else:
        enc = WeightEncoder(slots, int(meta["text_dim"]), config)
    enc.load_state_dict(tensors, strict=True)
    enc.eval()
    # the encoder's identity: a library vector stored by another encoder file is stale
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    return enc, {"base_hash": meta.get("studio.base_hash", ""), "extra": json.loads(meta.get("extra", "{}")),
                 "id": digest}
