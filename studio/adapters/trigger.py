"""Trigger-word embeddings learned beside an adapter ("pivotal tuning").

A rare trigger word ("sks") has an input embedding that the base model never trained, so its
text-encoder output is close to that of any other word: an adapter that binds it to a subject
then changes every prompt (drift), and prior preservation fights the binding head-on. Learning
the trigger's input embedding as well gives the adapter a direction of its own to key on, as
textual inversion does; the diffusers "advanced" DreamBooth script and OneTrainer call the
combination pivotal tuning.

The learned vectors replace the trigger tokens' rows at the output of each text encoder's
input-embedding layer through a forward hook, so the base weights are never written and
removing the hook restores the base exactly. In a saved adapter they ride as
``lora_trigger_embedding.<component>`` tensors (one row per trigger token) with the token ids
and strings in the header; vanilla diffusers' ``load_lora_weights`` ignores those keys (they have
no ``unet.``/``text_encoder.`` prefix), and :func:`apply_to_vanilla` sets them on a plain pipeline.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from studio.errors import StudioError

KEY_PREFIX = "lora_trigger_embedding."  # diffusers insists on "lora" in every key of a LoRA file
META_TOKENS = "studio.trigger_tokens"


def _encoders(pipe: Any) -> dict[str, tuple[Any, Any]]:
    """component name -> (tokenizer, text encoder) of every text encoder of the pipeline."""
    out = {}
    for comp, tok_name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        te, tok = getattr(pipe, comp, None), getattr(pipe, tok_name, None)
        if te is not None and tok is not None:
            out[comp] = (tok, te)
    return out


def trigger_token_ids(tokenizer: Any, trigger: str) -> list[int]:
    """The ids the tokenizer gives the trigger word (without BOS/EOS)."""
    ids = tokenizer(trigger, add_special_tokens=False).input_ids
    if not ids:
        raise StudioError(f"--token {trigger!r}: the tokenizer gives it no tokens; choose a word")
    return list(ids)


class TriggerEmbeddings:
    """Learned rows for the trigger's tokens, installed on a pipeline's text encoders."""

    def __init__(self, token_ids: dict[str, list[int]], vectors: dict[str, torch.Tensor]) -> None:
        self.token_ids = token_ids
        self.vectors = vectors
        self.weight = 1.0  # 0: base rows, 1: learned rows (mixing scales between them)
        self._handles: list[Any] = []

    @classmethod
    def from_base(cls, pipe: Any, trigger: str, init_word: str = "") -> "TriggerEmbeddings":
        """Start from the base model's own rows of the trigger's tokens (trainable copies).

        ``init_word``: start every row from the mean embedding of that word's tokens instead
        (textual inversion's initializer token), so the trigger begins where the base model
        already reads a related concept.
        """
        ids, vecs = {}, {}
        for comp, (tok, te) in _encoders(pipe).items():
            ids[comp] = trigger_token_ids(tok, trigger)
            table = te.get_input_embeddings().weight
            rows = table[ids[comp]].detach().clone().float()
            if init_word:
                start = table[trigger_token_ids(tok, init_word)].detach().float().mean(0)
                rows = start.expand_as(rows).clone()
            vecs[comp] = torch.nn.Parameter(rows)
        return cls(ids, vecs)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.vectors.values())

    def norm_caps(self, pipe: Any, multiple: float) -> dict[str, float]:
        """Per text encoder: ``multiple`` x the mean norm of its vocabulary's input embeddings."""
        encoders = _encoders(pipe)
        return {comp: multiple * float(encoders[comp][1].get_input_embeddings().weight.detach().float()
                                       .norm(dim=-1).mean()) for comp in self.vectors}

    @torch.no_grad()
    def clamp_norms(self, caps: dict[str, float]) -> None:
        """Scale every learned row whose norm exceeds its encoder's cap back onto the cap.

        A freely trained trigger row grows to several times an ordinary word's norm (measured on
        micro: 0.62 against a vocabulary mean of 0.16); its cross-attention keys then draw attention
        away from the prompt's other words (docs/training.md).
        """
        for comp, rows in self.vectors.items():
            n = rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            rows.mul_((caps[comp] / n).clamp(max=1.0))

    def install(self, pipe: Any) -> "TriggerEmbeddings":
        """Hook every text encoder so the trigger tokens take the learned rows."""
        self.remove()
        encoders = _encoders(pipe)
        for comp, rows in self.vectors.items():
            if comp not in encoders:
                raise StudioError(f"the adapter has a trigger embedding for {comp}, which this base model lacks")
            emb = encoders[comp][1].get_input_embeddings()
            if rows.shape[-1] != emb.weight.shape[1]:
                raise StudioError(f"the adapter's trigger embedding has width {rows.shape[-1]}, but this base "
                                  f"model's {comp} has {emb.weight.shape[1]}: it was trained for another model")
            self._handles.append(emb.register_forward_hook(self._hook(comp)))
        return self

    def _hook(self, comp: str):
        ids = torch.tensor(self.token_ids[comp])

        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            input_ids = args[0]
            if self.weight == 0:
                return output
            hits = input_ids.unsqueeze(-1) == ids.to(input_ids.device)  # (..., L, n_tokens)
            if not hits.any():
                return output
            rows = self.vectors[comp].to(output.device, output.dtype)
            wanted = hits.to(output.dtype) @ rows  # the learned row at each trigger position
            mask = hits.any(-1, keepdim=True).to(output.dtype)
            return output + self.weight * mask * (wanted - output)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---- files ----------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{KEY_PREFIX}{comp}": v.detach().float().cpu().contiguous() for comp, v in self.vectors.items()}

    def header(self, pipe: Any) -> dict[str, str]:
        enc = _encoders(pipe)
        info = {comp: {"ids": ids, "tokens": enc[comp][0].convert_ids_to_tokens(ids)}
                for comp, ids in self.token_ids.items()}
        return {META_TOKENS: json.dumps(info)}

    @classmethod
    def from_file_parts(cls, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> "TriggerEmbeddings | None":
        """The trigger embeddings of a saved adapter, or None when it has none."""
        vecs = {k[len(KEY_PREFIX):]: v for k, v in tensors.items() if k.startswith(KEY_PREFIX)}
        if not vecs:
            return None
        if META_TOKENS not in header:
            raise StudioError(f"the adapter has trigger embeddings but no {META_TOKENS} entry in its header")
        info = json.loads(header[META_TOKENS])
        return cls({comp: list(info[comp]["ids"]) for comp in vecs}, vecs)


def apply_to_vanilla(pipe: Any, file: str) -> None:
    """Write an adapter file's trigger rows into a plain diffusers pipeline's embedding tables.

    For users of vanilla diffusers: ``pipe.load_lora_weights(folder)`` then this gives the same
    images as the studio's own loading. It edits the text encoders' weights in place.
    """
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:
        header = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys() if k.startswith(KEY_PREFIX)}
    trig = TriggerEmbeddings.from_file_parts(tensors, header)
    if trig is None:
        return
    encoders = _encoders(pipe)
    with torch.no_grad():
        for comp, rows in trig.vectors.items():
            weight = encoders[comp][1].get_input_embeddings().weight
            weight[trig.token_ids[comp]] = rows.to(weight.device, weight.dtype)
