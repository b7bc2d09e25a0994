"""Training recipes: what a subject or a style run trains on, with which prompts and defaults.

A recipe resolves the job's open fields for the base model (steps, learning rate, rank, batch,
resolution, prior preservation), names the prompt of every training image, and writes the
adapter's metadata. The loop in :mod:`studio.trainers.loop` runs any recipe unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from typing import Any

from studio.errors import StudioError
from studio.trainers.config import TrainConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Plan:
    """A job's resolved settings."""

    steps: int
    lr: float
    rank: int
    batch: int
    resolution: int
    vae_factor: int
    targets: str
    prior: bool
    train_trigger: bool
    trigger_lr: float
    prior_weight: float
    class_word: str
    class_prompts: list[str]  # one per class image
    sample_prompts: list[str]
    sample_steps: int
    guidance: float  # of samples and class images: the model's own default
    family: str
    micro: bool = False
    caption_dropout: float = 0.0  # chance that an image with a caption trains on its plain prompt instead
    prior_uncond: float = 0.0  # chance that a class image trains on the empty prompt instead of its own
    tag_dropout: float = 0.0  # chance that a caption's comma-separated tag (not the trigger's) is left out
    trigger_norm: float = 0.0  # cap on the learned trigger row's norm, x the vocabulary's mean norm (0: none)
    flip: float = 0.5  # chance that a training image is mirrored
    ema: float = 0.0  # decay of the saved weight average (0: the last step's weights are saved)

    def unet_kwargs(self, pooled: Any = None, time_ids: Any = None) -> dict[str, Any]:
        """Extra denoiser inputs: SDXL's pooled text embeddings and size/crop conditions, else none."""
        if self.family != "sdxl":
            return {}
        if pooled is None or time_ids is None:
            raise StudioError("SDXL training step without pooled text embeddings or add_time_ids (a loop defect)")
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


# Defaults measured on the micro model (docs/training.md); real-size bases use the usual
# DreamBooth-LoRA settings of the diffusers scripts.
MICRO_DEFAULTS = {"subject": dict(steps=1000, batch=4, rank=16, targets="all", lr_scale=2.0, trigger_lr=1e-3,
                                   # 4 since subjects train unmirrored (session 12): over 7 runs of 3 subjects
                                   # drift 0.065 -> 0.031, subject fidelity 0.811 -> 0.840 against 3 (chosen on
                                   # two of the runs; on the other five a trade: docs/training.md)
                                   prior_weight=4.0,
                                   # the class prior on the empty prompt too (guidance then amplifies the
                                   # trigger instead of subtracting it), the bare trigger prompt a quarter of
                                   # the steps and tag dropout (the caption's colour word explains the colour
                                   # more often): mean subject fidelity over seeds and sets 0.68 -> 0.85
                                   prior_uncond=0.2, caption_dropout=0.25, tag_dropout=0.5,
                                   # the average of about the last 100 steps is saved: over 7 runs of 3 subjects
                                   # subject / prompt fidelity 0.840 / 0.742 -> 0.861 / 0.803, drift the same
                                   # (docs/training.md, "EMA"; the star at seed 0 lost 0.13 of subject fidelity)
                                   ema=0.99,
                                   # TLoRA at its own 1e-3: subject fidelity as at 2e-3 (0.831 vs 0.828),
                                   # prompt fidelity 0.743 vs 0.699, lower at 2e-3 for each of 3 training
                                   # seeds (bench/param_efficiency.py --train-seeds, docs/tlora.md)
                                   method_lr_scale={"tlora": 1.0}),
                  # style: the same machinery; without the output-preservation prior the style leaks into
                  # every prompt (base drift 0.57), with it 0.07 (docs/training.md)
                  "style": dict(steps=800, batch=4, rank=16, targets="all", lr_scale=2.0, trigger_lr=2e-3,
                                prior_weight=3.0, prior=True, train_trigger=True)}
REAL_DEFAULTS = {"subject": dict(steps=500, batch=1), "style": dict(steps=1000, batch=1)}


def recipe_lr(method: Any, kind: str, micro: bool) -> float:
    """The learning rate a recipe trains ``method`` with when --lr is not given (the CLI and the UI's form)."""
    d = (MICRO_DEFAULTS if micro else REAL_DEFAULTS)[kind]
    return method.default_lr * d.get("method_lr_scale", {}).get(method.name, d.get("lr_scale", 1.0))


class Recipe:
    kind = ""
    trains_trigger = False  # learn the trigger word's embedding by default (pivotal tuning)
    default_caption_dropout = 0.0
    default_flip = 0.5

    def plan(self, cfg: TrainConfig, pipe: Any) -> Plan:
        from studio.adapters import get_method
        from studio.generation import model_defaults, native_size, vae_factor

        method = get_method(cfg.method)
        src = pipe.studio_source
        if src.family == "ldm":
            raise StudioError(f"--base {cfg.base}: training on the {src.family} family is not supported yet; "
                              f"use an SD 1.x/2.x or SDXL model or micro")
        micro = src.kind == "micro"
        d = (MICRO_DEFAULTS if micro else REAL_DEFAULTS)[self.kind]
        res = cfg.resolution or native_size(pipe)[0]
        f = vae_factor(pipe)
        if res % f:
            raise StudioError(f"--resolution {res}: must be a multiple of {f} for this model")
        class_word = cfg.class_word or ("shape" if micro else "object")
        return Plan(
            steps=cfg.steps or d["steps"], lr=cfg.lr or recipe_lr(method, self.kind, micro),
            rank=cfg.rank or d.get("rank", method.default_rank), targets=cfg.targets or d.get("targets", "attention"),
            batch=cfg.batch or d["batch"], resolution=res, vae_factor=f,
            prior=d.get("prior", self.default_prior()) if cfg.prior is None else cfg.prior,
            train_trigger=(d.get("train_trigger", self.trains_trigger) if cfg.train_trigger is None
                           else cfg.train_trigger),
            trigger_lr=cfg.trigger_lr or d.get("trigger_lr", 5e-3),
            prior_weight=d.get("prior_weight", 1.0) if cfg.prior_weight is None else cfg.prior_weight,
            class_word=class_word, class_prompts=self.class_prompts(cfg, class_word, micro),
            sample_prompts=self.sample_prompts(cfg, class_word, micro),
            sample_steps=model_defaults(pipe)["steps"], guidance=model_defaults(pipe)["guidance"], family=src.family,
            micro=micro,
            caption_dropout=(d.get("caption_dropout", self.default_caption_dropout) if cfg.caption_dropout is None
                             else cfg.caption_dropout),
            prior_uncond=d.get("prior_uncond", 0.0) if cfg.prior_uncond is None else cfg.prior_uncond,
            tag_dropout=d.get("tag_dropout", 0.0) if cfg.tag_dropout is None else cfg.tag_dropout,
            trigger_norm=d.get("trigger_norm", 0.0) if cfg.trigger_norm is None else cfg.trigger_norm,
            flip=self.default_flip if cfg.flip is None else cfg.flip,
            ema=d.get("ema", 0.0) if cfg.ema is None else float(cfg.ema),
        )

    def default_prior(self) -> bool:
        return False

    def class_prompts(self, cfg: TrainConfig, class_word: str, micro: bool) -> list[str]:
        """Prompts of the prior-preservation images, one per image."""
        if cfg.class_prompt:
            return [cfg.class_prompt] * cfg.class_images
        if micro:
            # The micro text encoder is tiny: "a sks shape" and "a shape" encode almost alike, so a
            # single class prompt fights the instance prompt head-on. Varied captions of the
            # concepts the base knows keep its general behaviour (colours, textures, backgrounds)
            # without pulling "shape" back from the subject. Seeded, so the cache is reused.
            import random

            from studio.micro.world import SEEN_SHAPES, SEEN_TEXTURES, caption, scenes

            rng = random.Random(cfg.seed + 17)
            return [caption(s, rng) for s in scenes(cfg.seed + 17, cfg.class_images, shapes=SEEN_SHAPES,
                                                     textures=SEEN_TEXTURES)]
        return [f"a {class_word}"] * cfg.class_images

    def sample_prompts(self, cfg: TrainConfig, class_word: str, micro: bool) -> list[str]:
        return list(cfg.sample_prompts)

    def instance_prompts(self, cfg: TrainConfig, plan: Plan, data: Any) -> list[str | tuple[str, str]]:
        """One entry per image: its prompt, or (caption prompt, plain prompt) for caption dropout."""
        raise NotImplementedError

    def metadata(self, cfg: TrainConfig, plan: Plan, pipe: Any, data: Any) -> dict[str, str]:
        from studio.generation import model_hash

        src = pipe.studio_source
        meta = {
            "kind": cfg.kind, "trigger": cfg.token, "base": src.spec, "base_family": src.family,
            "base_hash": model_hash(pipe), "rank": str(plan.rank), "steps": str(plan.steps),
            "train_config": cfg.to_json(), "images": str(len(data)), "resolution": str(plan.resolution),
        }
        if plan.ema:  # the saved weights are an average (the config's null means "the recipe's")
            meta["ema"] = str(plan.ema)
        captions = [it.caption for it in data.items if it.caption]
        if captions:
            meta["captions"] = json.dumps(captions[:50])
        return meta


class SubjectRecipe(Recipe):
    """DreamBooth-LoRA: every image is "a TOKEN CLASS"; class images keep the class's prior."""

    kind = "subject"
    # Captions name what is not the subject (colour, background...), so the trigger binds the subject
    # alone and still composes with those words; the bare prompt half the time binds the rest too.
    default_caption_dropout = 0.5
    # no mirroring, as kohya's flip_aug and diffusers' --random_flip default: a mirrored asymmetric subject is
    # another subject (a crescent trained with flips draws both orientations: subject fidelity 0.44 -> 0.68)
    default_flip = 0.0
    trains_trigger = True  # pivotal tuning: on micro it binds the subject without drift (docs/training.md)

    def default_prior(self) -> bool:
        return True

    def sample_prompts(self, cfg: TrainConfig, class_word: str, micro: bool) -> list[str]:
        if cfg.sample_prompts:
            return list(cfg.sample_prompts)
        subject = f"a {cfg.token} {class_word}"
        if micro:
            return [f"{subject} on a black background", f"{subject} on a white background",
                    f"a striped {cfg.token} {class_word}", f"a blue {cfg.token} {class_word}"]
        return [f"a photo of {subject}", f"{subject} on the beach", f"a painting of {subject}"]

    def instance_prompts(self, cfg: TrainConfig, plan: Plan, data: Any) -> list[str | tuple[str, str]]:
        plain = f"a {cfg.token} {plan.class_word}"
        captions = [it.caption for it in data.items] if cfg.caption != "trigger" else []
        word = cfg.subject_word or (subject_word_from_captions(captions) if plan.micro else "")
        if not word or not any(captions):
            if any(captions) and cfg.caption == "captions":
                raise StudioError("--caption captions: a subject run needs --subject-word, the word the captions "
                                  "use for the subject, to put the trigger in its place")
            return [plain] * len(data)
        out: list[str | tuple[str, str]] = []
        unnamed = []
        for it in data.items:
            named = _replace_word(it.caption or "", word, f"{cfg.token} {plan.class_word}")
            if named is None:
                unnamed.append(it.path.name)
            out.append(plain if named is None else (named, plain))
        if unnamed:
            log.warning("%d caption(s) do not name the subject %r and train on %r: %s", len(unnamed), word, plain,
                        ", ".join(unnamed[:10]))
        return out

    def metadata(self, cfg: TrainConfig, plan: Plan, pipe: Any, data: Any) -> dict[str, str]:
        meta = super().metadata(cfg, plan, pipe, data)
        meta["class_word"] = plan.class_word
        meta["prior"] = str(plan.prior).lower()
        return meta


def _replace_word(text: str, word: str, by: str) -> str | None:
    """``text`` with its first whole-word ``word`` (any case) replaced by ``by``; None when absent."""
    new, n = re.subn(rf"\b{re.escape(word)}\b", by, text, count=1, flags=re.IGNORECASE)
    return new if n else None


def subject_word_from_captions(captions: list[str | None]) -> str:
    """The micro world's shape word that every caption names (the subject), or "" when there is none."""
    from studio.micro.world import SHAPES

    sets = [{w for w in re.findall(r"[a-z]+", c.lower()) if w in SHAPES} for c in captions if c]
    common = set.intersection(*sets) if sets and len(sets) == len(captions) else set()
    return next(iter(common)) if len(common) == 1 else ""


class StyleRecipe(Recipe):
    """Per-image captions (or the trigger alone) followed by "in TOKEN style"."""

    kind = "style"

    def sample_prompts(self, cfg: TrainConfig, class_word: str, micro: bool) -> list[str]:
        if cfg.sample_prompts:
            return list(cfg.sample_prompts)
        if micro:
            return [f"a red circle on a white background in {cfg.token} style",
                    f"a blue square on a black background in {cfg.token} style",
                    f"a green triangle on a beige background in {cfg.token} style"]
        return [f"a house in {cfg.token} style", f"a portrait in {cfg.token} style"]

    def instance_prompts(self, cfg: TrainConfig, plan: Plan, data: Any) -> list[str]:
        prompts = []
        for it in data.items:
            use_caption = cfg.caption == "captions" or (cfg.caption == "auto" and it.caption)
            if use_caption and it.caption:
                prompts.append(f"{it.caption} in {cfg.token} style")
            else:
                prompts.append(f"an image in {cfg.token} style")
        return prompts


RECIPES: dict[str, Recipe] = {"subject": SubjectRecipe(), "style": StyleRecipe()}


def get_recipe(kind: str) -> Recipe:
    if kind not in RECIPES:
        raise StudioError(f"--kind {kind}: choose one of {', '.join(RECIPES)}")
    return RECIPES[kind]
