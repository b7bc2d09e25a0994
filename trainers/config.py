"""A training job: one dataclass shared by `studio train` flags, job TOML files and the UI.

Every field has a help text; `from_toml` rejects unknown keys with the list of valid ones.
``None`` means "the recipe's default for this base model", resolved by :func:`resolved`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

from studio.errors import StudioError

KINDS = ("subject", "style")
MIXED_PRECISION = ("no", "fp16", "bf16")


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors dataclasses' own name
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


@dataclasses.dataclass
class TrainConfig:
    """Everything that determines a training run (the seed included: runs are reproducible)."""

    kind: str = _f("subject", "subject (DreamBooth-LoRA: a trigger + class word) or style (captions + trigger)")
    images: str = _f("", "folder of training images; NAME.txt beside NAME.png is its caption")
    base: str = _f("micro", "base model: micro, a diffusers folder, a .safetensors file, or a hub id")
    out: str = _f("", "output folder of the adapter (default: out/<name>)")
    name: str = _f("", "adapter name in the library (default: <kind>-<folder name>)")
    token: str = _f("sks", "rare trigger word that names the subject or style")
    class_word: str = _f("", "subject class word, e.g. dog (default: 'shape' on micro, 'object' elsewhere)")
    method: str = _f("lora", "adapter method: lora, dora, loha, lokr, tlora, ...")
    transform_rank: int | None = _f(None, "tlora: ring rank of the input transform T (default 4)")
    residual: str | None = _f(None, "tlora: the residual, lora (TLoRA*, default) or tr (tensor ring)")
    residual_rank: int | None = _f(None, "tlora: rank of the residual (default 4)")
    rank: int | None = _f(None, "adapter rank (default: the method's)")
    alpha: float | None = _f(None, "adapter alpha (default: = rank)")
    targets: str | None = _f(None, "layers to adapt: attention, attention+resnet, all (default: the recipe's)")
    blocks: str = _f("", "only the denoiser layers under these module prefixes, comma-separated (e.g. "
                         "up_blocks.1,up_blocks.2, as B-LoRA trains one block for a style; default: every block)")
    text_encoder: bool = _f(False, "also train an adapter on the text encoder(s)")
    steps: int | None = _f(None, "optimizer steps (default: the recipe's for this base)")
    lr: float | None = _f(None, "learning rate (default: the method's; twice that on micro)")
    train_trigger: bool | None = _f(None, "also learn the trigger word's input embedding (pivotal tuning; default: "
                                              "on for subjects, and for styles on micro)")
    trigger_lr: float | None = _f(None, "learning rate of the trigger embedding (default: 1e-3 for micro "
                                        "subjects, 2e-3 micro styles, else 5e-3)")
    trigger_norm: float | None = _f(None, "cap on the learned trigger embedding's norm, as a multiple of the "
                                          "vocabulary's mean norm, so the trigger stays an ordinary word (0: no cap)")
    init_word: str = _f("", "start the learned trigger embedding from this word's (textual inversion's "
                            "initializer token), e.g. painting for a style (default: the trigger's own)")
    text_encoder_lr: float | None = _f(None, "learning rate of the text-encoder adapter (default: lr / 2)")
    batch: int | None = _f(None, "images per step (per process)")
    grad_accum: int = _f(1, "gradient accumulation steps")
    resolution: int | None = _f(None, "training resolution in pixels (default: the base model's native size)")
    buckets: bool = _f(False, "aspect-ratio buckets instead of square center crops")
    flip: float | None = _f(None, "probability of a horizontal flip (default: 0 for subjects, as in kohya's and "
                                  "diffusers' scripts, since a mirrored asymmetric subject is another one; 0.5 for styles)")
    prior: bool | None = _f(None, "prior preservation with generated class images (default: on for subjects, "
                                      "and for styles on micro)")
    prior_weight: float | None = _f(None, "weight of the prior-preservation loss (default: 4 for micro subjects, 3 for "
                                          "micro styles, else 1)")
    prior_target: str = _f("base", "what the class images are trained towards: base (the base model's own "
                                   "prediction, an output-preservation distillation) or noise (DreamBooth's loss)")
    prior_uncond: float | None = _f(None, "fraction of class images trained on the empty prompt, which keeps the "
                                          "unconditional prediction that guidance subtracts (default: 0.2 for micro subjects, "
                                          "else 0)")
    timestep_range: str = _f("", "LO:HI, fractions of the noise schedule the training images are noised to (e.g. "
                                 "0:0.6, the less noisy three fifths, where detail and texture are drawn; class images keep "
                                 "the whole range; default 0:1)")
    snr_gamma: float = _f(5.0, "min-SNR loss weighting gamma (0: plain MSE); 5 is the paper's and diffusers' value")
    class_images: int = _f(50, "number of class images for prior preservation (generated once, cached)")
    class_prompt: str | None = _f(None, "prompt of the class images (default: 'a CLASS-WORD'; on micro, varied "
                                        "captions of the world's seen concepts)")
    caption: str = _f("auto", "prompts from captions: auto (captions when present, else the trigger alone), "
                              "captions (required), trigger (ignore captions)")
    subject_word: str = _f("", "subject runs with captions: the word the captions use for the subject (e.g. rex); "
                               "each caption is trained with it replaced by 'TOKEN CLASS' (micro: found from "
                               "the captions)")
    caption_dropout: float | None = _f(None, "fraction of steps an image trains on the bare trigger prompt instead "
                                             "of its caption (default: 0.5 for subjects, 0.25 on micro; 0 for styles)")
    empty_prompt: float = _f(0.0, "fraction of steps a training image is trained on the empty prompt (kohya's "
                                  "caption_dropout_rate): the unconditional prediction that guidance subtracts "
                                  "learns the images too, so the adapter shows without its trigger")
    tag_dropout: float | None = _f(None, "captions with comma-separated tags: the chance that each tag without the "
                                         "trigger is left out of a step's prompt (default: 0.5 for micro subjects, else 0)")
    decor: str = _f("", "DECOR: words projected out of the training prompts' embeddings, comma-separated (e.g. "
                        "the content words of a style set: \"circle, red\")")
    decor_alpha: float = _f(1.0, "DECOR strength in [0, 1]")
    ema: float | None = _f(None, "save an exponential moving average of the trained weights instead of the last "
                                 "step's, with this decay (e.g. 0.99: about the last 100 steps; capped at (1+t)/(10+t) "
                                 "early on, as diffusers' EMAModel; default: 0.99 for micro subjects, else 0 = off)")
    warmup: int = _f(0, "learning-rate warm-up steps")
    scheduler: str = _f("constant", "learning-rate schedule: constant, cosine, linear")
    optimizer: str = _f("auto", "auto (8-bit AdamW on CUDA when bitsandbytes is installed), adamw, adamw8bit")
    mixed_precision: str = _f("no", "no, fp16 (CUDA) or bf16; fp32 is the CPU default (see docs/BENCHMARKS.md)")
    gradient_checkpointing: bool = _f(False, "trade compute for memory in the denoiser")
    sample_every: int = _f(0, "write sample images every N steps (0: at the end only)")
    samples: bool = _f(True, "write sample images (at the end, and every --sample-every steps); off saves minutes "
                             "per image on a real-size model on a CPU")
    sample_prompts: list = _f([], "prompts of the sample images (default: the trigger in a few contexts)")
    checkpoint_every: int = _f(50, "save a resumable checkpoint every N steps (0: never)")
    resume: bool = _f(False, "continue from the last checkpoint in the output folder")
    seed: int = _f(0, "random seed (data order, noise, timesteps)")
    device: str = _f("", "cpu, cuda, cuda:N (default: cuda if present)")
    content: str = _f("", "b4m: folder of the subject's (content) images")
    style: str = _f("", "b4m: folder of the style's images")
    content_prompt: str = _f("", "b4m: prompt of every content image, with --token (default: the subject recipe's "
                                 "captions with the trigger in the subject's place)")
    style_prompt: str = _f("", "b4m: prompt of every style image, with --style-token (default: 'CAPTION in "
                               "STYLE-TOKEN style')")
    style_token: str = _f("zwx", "b4m: the style's trigger word (--token names the subject)")
    steps_content: int | None = _f(None, "b4m: steps of the content stage (default 400 on micro)")
    steps_style: int | None = _f(None, "b4m: steps of the style stage (default 400 on micro)")
    steps_make: int | None = _f(None, "b4m: steps of the joint fine-tune after the make step (default 800 on micro, 100 elsewhere; "
                                      "0: none)")
    aux_sets: int | None = _f(None, "b4m: auxiliary sets per stage for multi-correspondence learning, rendered by "
                                    "the micro world (default 2; 0: off)")
    register: bool = _f(True, "add the result to the adapter library")
    description: str = _f("", "free text kept in the library")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "job") -> "TrainConfig":
        """Build from a mapping; unknown keys are an error that lists the valid ones."""
        data = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise StudioError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(cls.field_names())}")
        cfg = cls(**data)
        cfg.validate(source)
        return cfg

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "TrainConfig":
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError as exc:
            raise StudioError(f"{p}: no such job file") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise StudioError(f"{p}: not valid TOML ({exc})") from exc
        data.pop("cluster", None)  # resources of `studio batch --cluster` (studio.trainers.cluster reads them)
        if "train" in data and isinstance(data["train"], dict) and len(data) == 1:
            data = data["train"]  # a [train] table is accepted too
        cfg = cls.from_dict(data, source=str(p))
        if cfg.images and not Path(cfg.images).is_absolute():
            cfg.images = str((p.parent / cfg.images).resolve()) if (p.parent / cfg.images).exists() else cfg.images
        return cfg

    def validate(self, source: str = "--") -> None:
        """Field-level checks, each naming the field and the fix."""
        def bad(field: str, msg: str) -> StudioError:
            return StudioError(f"{source if source != '--' else ''}{'' if source == '--' else ': '}--{field.replace('_', '-')} {msg}")

        if self.kind not in KINDS:
            raise bad("kind", f"{self.kind}: choose subject or style")
        if self.method == "b4m":
            if not self.content or not self.style:
                raise bad("content" if not self.content else "style", "is required with --method b4m: "
                          "--content DIR (the subject's images) and --style DIR (the style's)")
        elif not self.images:
            raise bad("images", "is required: a folder of training images")
        for name in ("steps_content", "steps_style"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise bad(name, f"{v}: must be a positive integer")
        for name in ("steps_make", "aux_sets"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise bad(name, f"{v}: must be an integer >= 0")
        if self.method == "b4m" and (not self.style_token.strip() or " " in self.style_token.strip()):
            raise bad("style_token", f"{self.style_token!r}: one word, e.g. zwx")
        for name in ("steps", "rank", "batch", "resolution", "transform_rank", "residual_rank"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise bad(name, f"{v}: must be a positive integer")
        for name in ("lr", "text_encoder_lr"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and 0 < v < 1):
                raise bad(name, f"{v}: must be a number between 0 and 1, e.g. 1e-3")
        if self.ema is not None and (isinstance(self.ema, bool) or not isinstance(self.ema, (int, float))
                                     or not 0 <= self.ema < 1):
            raise bad("ema", f"{self.ema}: a decay in [0, 1), e.g. 0.99 (0: off)")
        if self.ema and self.method == "b4m":
            raise bad("ema", "is not supported with --method b4m (its stages save their own weights)")
        if self.grad_accum <= 0:
            raise bad("grad_accum", f"{self.grad_accum}: must be at least 1")
        if self.trigger_lr is not None and self.trigger_lr <= 0:
            raise bad("trigger_lr", f"{self.trigger_lr}: must be > 0")
        if self.trigger_norm is not None and self.trigger_norm < 0:
            raise bad("trigger_norm", f"{self.trigger_norm}: must be >= 0 (0: no cap)")
        if self.snr_gamma < 0:
            raise bad("snr_gamma", f"{self.snr_gamma}: must be >= 0 (0 turns the weighting off)")
        if self.flip is not None and not 0 <= self.flip <= 1:
            raise bad("flip", f"{self.flip}: a probability in [0, 1]")
        if self.tag_dropout is not None and not 0 <= self.tag_dropout <= 1:
            raise bad("tag_dropout", f"{self.tag_dropout}: a probability in [0, 1]")
        if not 0 <= self.empty_prompt <= 1:
            raise bad("empty_prompt", f"{self.empty_prompt}: a probability in [0, 1]")
        if self.prior_uncond is not None and not 0 <= self.prior_uncond <= 1:
            raise bad("prior_uncond", f"{self.prior_uncond}: a probability in [0, 1]")
        if self.caption_dropout is not None and not 0 <= self.caption_dropout <= 1:
            raise bad("caption_dropout", f"{self.caption_dropout}: a probability in [0, 1]")
        if self.subject_word and (not self.subject_word.strip() or " " in self.subject_word.strip()):
            raise bad("subject_word", f"{self.subject_word!r}: one word, as the captions spell it")
        if self.prior_weight is not None and self.prior_weight < 0:
            raise bad("prior_weight", f"{self.prior_weight}: must be >= 0")
        if self.prior_target not in ("base", "noise"):
            raise bad("prior_target", f"{self.prior_target}: choose base or noise")
        if self.caption not in ("auto", "captions", "trigger"):
            raise bad("caption", f"{self.caption}: choose auto, captions or trigger")
        if self.decor.strip():
            self.decor_config()  # DecorConfig names the --decor field that is wrong
        if self.scheduler not in ("constant", "cosine", "linear"):
            raise bad("scheduler", f"{self.scheduler}: choose constant, cosine or linear")
        if self.optimizer not in ("auto", "adamw", "adamw8bit"):
            raise bad("optimizer", f"{self.optimizer}: choose auto, adamw or adamw8bit")
        if self.mixed_precision not in MIXED_PRECISION:
            raise bad("mixed_precision", f"{self.mixed_precision}: choose no, fp16 or bf16")
        if self.class_images <= 0:
            raise bad("class_images", f"{self.class_images}: must be at least 1")
        if not self.token.strip() or " " in self.token.strip():
            raise bad("token", f"{self.token!r}: one word, e.g. sks")
        for name in ("checkpoint_every", "sample_every", "warmup"):
            if getattr(self, name) < 0:
                raise bad(name, f"{getattr(self, name)}: must be >= 0")
        self.timesteps()  # raises on a malformed --timestep-range
        self.block_list()
        self.adapter_options()  # method-specific flags belong to their method

    def block_list(self) -> tuple[str, ...]:
        """``blocks`` as a tuple of module-name prefixes (a TOML list is accepted too)."""
        raw = self.blocks if isinstance(self.blocks, (list, tuple)) else str(self.blocks or "").split(",")
        out = tuple(b.strip().strip(".") for b in raw if str(b).strip())
        for b in out:
            if not re.fullmatch(r"[A-Za-z_][\w.]*", b):
                raise StudioError(f"--blocks {b!r}: a module-name prefix such as up_blocks.1 or mid_block")
        return out

    def timesteps(self) -> tuple[float, float]:
        """``timestep_range`` as (lo, hi) fractions, 0 <= lo < hi <= 1; (0, 1) when unset."""
        if not str(self.timestep_range or "").strip():
            return 0.0, 1.0
        try:
            lo, hi = (float(x) for x in str(self.timestep_range).split(":"))
        except ValueError:
            raise StudioError(f"--timestep-range {self.timestep_range!r}: write LO:HI, e.g. 0:0.6") from None
        if not 0.0 <= lo < hi <= 1.0:
            raise StudioError(f"--timestep-range {self.timestep_range}: need 0 <= LO < HI <= 1")
        return lo, hi

    def adapter_options(self) -> dict[str, Any]:
        """Method-specific adapter settings (AdapterSettings.options); set only for the method they belong to."""
        opts = {k: getattr(self, k) for k in ("transform_rank", "residual", "residual_rank") if getattr(self, k) is not None}
        if opts and self.method != "tlora":
            raise StudioError(f"--{next(iter(opts)).replace('_', '-')} applies to --method tlora only")
        if self.residual is not None and self.residual not in ("tr", "lora"):
            raise StudioError(f"--residual {self.residual}: choose tr or lora")
        return opts

    def decor_config(self) -> Any:
        """The :class:`studio.text.decor.DecorConfig` of ``decor``/``decor_alpha``, or None without ``decor``."""
        if not self.decor.strip():
            return None
        from studio.text.decor import DecorConfig

        return DecorConfig(self.decor, alpha=self.decor_alpha)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)
