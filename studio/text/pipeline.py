"""DECOR on a diffusers pipeline: a removable hook on its prompt-embedding path.

DESIGN.md ("Text"): text-side methods transform the prompt embeddings between the text
encoder and the denoiser without forking the pipelines. SD and SDXL pipelines compute their
prompt embeddings in one method, ``encode_prompt``; :func:`apply_decor` wraps that method on
the pipeline *instance*, so every call of the pipeline (the studio's generation, the eval
suites, the trainers' sample images, a user's own ``pipe(...)``) gets the projected
embeddings, while adapters (fused weights, trigger-embedding hooks) act inside the text
encoder as before: DECOR composes with every adapter and with mixing.

The unwanted basis is computed at each call from the pipeline's current text encoders (a few
short texts through them), so an adapter mixed in or out later is always taken into account.
The negative prompt is never projected.

SDXL: the prompt embeddings are the two encoders' hidden states side by side; each part is
projected with a basis from its own encoder, and with ``pooled`` the pooled embedding too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from studio.errors import StudioError
from studio.text.decor import REFERENCE_WORDS, DecorConfig, orthonormal_basis, project, row_mask

log = logging.getLogger(__name__)

ATTR = "_studio_decor"  # the installed hook, on the pipeline instance


@dataclasses.dataclass
class Segment:
    """One text encoder's part of the prompt embeddings: columns ``[start, stop)``, read by ``tokenizer``."""

    name: str
    tokenizer: Any
    start: int
    stop: int


def segments(pipe: Any) -> list[Segment]:
    """The text encoders' parts of ``pipe``'s prompt embeddings, in column order."""
    no_tokenizer = getattr(pipe, "tokenizer", None) is None and getattr(pipe, "tokenizer_2", None) is None
    if not hasattr(type(pipe), "encode_prompt") or no_tokenizer:
        raise StudioError(f"DECOR: {type(pipe).__name__} has no CLIP prompt embeddings to project; it works on "
                          f"Stable Diffusion 1.x/2.x and SDXL pipelines")
    parts, start = [], 0
    for te_name, tok_name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        te, tok = getattr(pipe, te_name, None), getattr(pipe, tok_name, None)
        if te is None or tok is None:
            continue
        width = int(te.config.hidden_size)
        parts.append(Segment(te_name, tok, start, start + width))
        start += width
    if not parts:
        raise StudioError(f"DECOR: {type(pipe).__name__} has no text encoder")
    return parts


def _is_xl(pipe: Any) -> bool:
    return "prompt_2" in inspect.signature(type(pipe).encode_prompt).parameters


def token_ids(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """The texts' token ids as the pipelines tokenize them: padded to the model length, truncated."""
    return tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def row_masks(tokenizer: Any, texts: Sequence[str], rows: str) -> torch.Tensor:
    """Bool ``(len(texts), tokens)``: the rows DECOR projects (:func:`studio.text.decor.row_mask`)."""
    return row_mask(token_ids(tokenizer, texts), tokenizer.bos_token_id, tokenizer.eos_token_id, rows)


def encode(pipe: Any, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pipeline's own prompt embeddings of ``texts`` (no guidance, one each), and SDXL's pooled ones.

    Calls the class's ``encode_prompt``, so an installed DECOR hook is bypassed.
    """
    device = getattr(pipe, "_execution_device", None) or pipe.device
    with torch.no_grad():
        out = type(pipe).encode_prompt(pipe, prompt=list(texts), device=device, num_images_per_prompt=1,
                                       do_classifier_free_guidance=False)
    return out[0], (out[2] if len(out) > 2 else None)


@dataclasses.dataclass
class Bases:
    """The unwanted texts' orthonormal bases: one per text-encoder segment, and the pooled one (or None).

    ``centers``: with ``DecorConfig.center``, the reference mean of each segment (and ``pooled_center``).
    """

    per_segment: list[torch.Tensor]
    pooled: torch.Tensor | None
    centers: list[torch.Tensor | None] = dataclasses.field(default_factory=list)
    pooled_center: torch.Tensor | None = None


def word_vectors(pipe: Any, texts: Sequence[str]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The encoder outputs of the texts' word tokens, per segment (``k x width``), and their pooled rows."""
    embeds, pooled = encode(pipe, texts)
    vectors = []
    for seg in segments(pipe):
        words = row_masks(seg.tokenizer, texts, "words")
        if not words.any():
            raise StudioError(f"--decor {', '.join(texts)!r}: the tokenizer gives these no word tokens")
        vectors.append(embeds[..., seg.start:seg.stop][words.to(embeds.device)])
    return vectors, pooled


def unwanted_vectors(pipe: Any, config: DecorConfig) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The encoder outputs of the unwanted texts' word tokens, per segment (``k x width``), and pooled rows."""
    return word_vectors(pipe, list(config.unwanted))


def unwanted_bases(pipe: Any, config: DecorConfig) -> Bases:
    """The bases DECOR projects out, from the pipeline's current text encoders."""
    vectors, pooled = unwanted_vectors(pipe, config)
    centers: list[torch.Tensor | None] = [None] * len(vectors)
    pooled_center = None
    if config.center:
        ref, ref_pooled = word_vectors(pipe, list(REFERENCE_WORDS))
        centers = [r.mean(0) for r in ref]
        pooled_center = ref_pooled.mean(0) if ref_pooled is not None else None
    per_seg = [orthonormal_basis(v if c is None else v - c, rank=config.rank)[0] for v, c in zip(vectors, centers)]
    pooled_basis = None
    if config.pooled and pooled is not None:
        pooled_basis = orthonormal_basis(pooled if pooled_center is None else pooled - pooled_center,
                                         rank=config.rank)[0]
    return Bases(per_seg, pooled_basis, centers, pooled_center)


def project_embeddings(pipe: Any, config: DecorConfig, prompts: Sequence[str], embeds: torch.Tensor,
                       pooled: torch.Tensor | None = None, *, prompts_2: Sequence[str] | None = None,
                       bases: Bases | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DECOR on prompt embeddings that ``pipe`` made from ``prompts``.

    ``embeds``: ``(len(prompts) * m, tokens, width)``, each prompt's rows repeated ``m`` times in
    a row (the pipelines' ``num_images_per_prompt`` layout); ``pooled`` likewise. SDXL's second
    encoder reads ``prompts_2`` (default: ``prompts``). Returns the projected pair.
    """
    if config.alpha == 0:
        return embeds, pooled
    if not prompts or embeds.shape[0] % len(prompts):
        raise ValueError(f"{embeds.shape[0]} embeddings for {len(prompts)} prompts")
    repeat = embeds.shape[0] // len(prompts)
    bases = bases or unwanted_bases(pipe, config)
    parts = []
    centers = bases.centers or [None] * len(bases.per_segment)
    for seg, basis, center in zip(segments(pipe), bases.per_segment, centers):
        texts = prompts_2 if (seg.name == "text_encoder_2" and prompts_2 is not None) else prompts
        mask = row_masks(seg.tokenizer, texts, config.rows).repeat_interleave(repeat, dim=0)
        parts.append(project(embeds[..., seg.start:seg.stop], basis, config.alpha, mask, center))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    if pooled is not None and bases.pooled is not None:
        pooled = project(pooled, bases.pooled, config.alpha, center=bases.pooled_center)
    return out, pooled


# ----------------------------------------------------------------------------- the hook


class DecorHook:
    """DECOR installed on one pipeline: wraps its ``encode_prompt`` until :meth:`remove`."""

    def __init__(self, pipe: Any, config: DecorConfig) -> None:
        segments(pipe)  # a pipeline without CLIP prompt embeddings fails here, before anything changes
        self.pipe = pipe
        self.config = config
        self._signature = inspect.signature(type(pipe).encode_prompt)
        self._xl = _is_xl(pipe)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        cls_method = type(self.pipe).encode_prompt
        out = cls_method(self.pipe, *args, **kwargs)
        bound = self._signature.bind(self.pipe, *args, **kwargs)
        bound.apply_defaults()
        prompt = bound.arguments["prompt"]
        if self.config.alpha == 0 or out[0] is None:
            return out
        if prompt is None:
            _warn_no_text()
            return out
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompt_2 = bound.arguments.get("prompt_2") if self._xl else None
        prompts_2 = None if prompt_2 is None else ([prompt_2] if isinstance(prompt_2, str) else list(prompt_2))
        pooled = out[2] if self._xl else None
        embeds, pooled = project_embeddings(self.pipe, self.config, prompts, out[0], pooled, prompts_2=prompts_2)
        if self._xl:
            return (embeds, out[1], pooled, *out[3:])
        return (embeds, *out[1:])

    def remove(self) -> None:
        """Give the pipeline its own ``encode_prompt`` back."""
        if getattr(self.pipe, ATTR, None) is self:
            del self.pipe.encode_prompt  # the instance attribute; the class method shows through again
            setattr(self.pipe, ATTR, None)


@functools.lru_cache(maxsize=1)
def _warn_no_text() -> None:
    log.warning("DECOR: prompt embeddings were passed without their prompt text, so their word rows are unknown; "
                "they are not projected (pass the prompt, or project with studio.text.pipeline.project_embeddings)")


def apply_decor(pipe: Any, config: DecorConfig) -> DecorHook:
    """Install DECOR on ``pipe`` (one at a time: applying a second raises); returns the hook."""
    if getattr(pipe, ATTR, None) is not None:
        raise StudioError("DECOR is already applied to this pipeline; remove it first (remove_decor)")
    hook = DecorHook(pipe, config)
    pipe.encode_prompt = hook
    setattr(pipe, ATTR, hook)
    return hook


def remove_decor(pipe: Any) -> None:
    """Remove DECOR from ``pipe`` (nothing happens when none is applied)."""
    hook = getattr(pipe, ATTR, None)
    if hook is not None:
        hook.remove()


@contextlib.contextmanager
def decor_applied(pipe: Any, config: DecorConfig | None) -> Iterator[Any]:
    """Context in which ``pipe`` projects its prompt embeddings with ``config`` (None: unchanged)."""
    if config is None:
        yield pipe
        return
    hook = apply_decor(pipe, config)
    try:
        yield pipe
    finally:
        hook.remove()


def infotext_fields(config: DecorConfig) -> dict[str, str]:
    """The PNG infotext fields that record DECOR (the defaults of rows and pooled are left out)."""
    fields = {"DECOR": config.text, "DECOR alpha": f"{config.alpha:g}"}
    if config.rows != "words":
        fields["DECOR rows"] = config.rows
    if config.pooled:
        fields["DECOR pooled"] = "true"
    if config.rank is not None:
        fields["DECOR rank"] = str(config.rank)
    if config.center:
        fields["DECOR center"] = "true"
    return fields
