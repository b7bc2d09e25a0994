"""Break-for-Make training: a content stage, a style stage and the make stage, on the shared loop's machinery.

``studio train --method b4m --content DIR --style DIR --out OUT`` runs three stages on one loaded
base model, with the loop's caches (VAE latents of every image and its mirror, prompt
embeddings), its output-preservation prior, min-SNR weights and learned trigger embeddings:

1. **content**: a fresh b4m adapter; the content images with the content prompt train D (the
   down half); ``--aux-sets`` auxiliary *style* sets rendered by the micro world (other textures
   on other shapes, each with its own "in TOKEN style" prompt) train B (the up half) at a lower
   learning rate: multi-correspondence, so D learns to pair with many B. Saved as OUT/content.
2. **style**: mirror-wise, a fresh adapter with the same frozen halves; the style images with
   the style prompt train B, auxiliary *content* sets (other shapes) train D. Saved as OUT/style.
3. **make**: ``up = [A; B_style]``, ``down = [C, D_content]`` (:func:`studio.adapters.b4m.functional.make`),
   then a short joint fine-tune: the content images train D, the style images train B. Saved
   as OUT (an ordinary LoRA file carrying both learned triggers).

Each sample trains only its own half (gradient routing in one forward pass,
:func:`studio.adapters.b4m.route_gradients`), unlike the reference code, whose two optimizers
each zero only their own parameters so both losses reach both halves. The prior rows
(class images trained towards the base model's own prediction) train both halves.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from studio.errors import StudioError
from studio.trainers.config import TrainConfig
from studio.trainers.loop import Event, EventHandler, TrainResult

log = logging.getLogger(__name__)

STAGES = ("content", "style", "make")
AUX_TOKENS = ("xyz", "ohwx")  # rare words of the micro tokenizer for the auxiliary sets' prompts

# micro defaults (docs/b4m.md); real bases take the usual LoRA settings
# disjoint: the learnable halves use disjoint rank components, so B D = 0 (functional.live_components);
# partner_drop: chance that a stage's own row sees the partner half as zero (run_stage);
# prior_half: which half the prior rows train in each stage ("both": the kept half and the partner,
# which keeps the partner from painting its set on every prompt while the kept half learns)
BOTH_HALVES = {"content": "both", "style": "both"}
# steps_make 800 since session 14: the joint make stage is what moves the pair (one seed per run: both 0.036 ->
# 0.125 with these stages, 0.071 -> 0.214 after 1000/800-step stages; 0.125 at 2000 steps: docs/b4m.md)
MICRO = dict(rank=16, targets="all", lr=2e-3, batch=4, aux_batch=2, steps_content=400, steps_style=400,
             steps_make=800, aux_lr_scale=0.5, make_lr_scale=0.5, aux_images=8, prior_weight=3.0, trigger_lr=2e-3,
             disjoint=True, prior_half=BOTH_HALVES, aux_trigger=True, partner_drop=0.0)
REAL = dict(rank=16, targets="attention", lr=1e-4, batch=1, aux_batch=1, steps_content=500, steps_style=500,
            steps_make=100, aux_lr_scale=0.5, make_lr_scale=0.5, aux_images=8, prior_weight=1.0, trigger_lr=5e-3,
            disjoint=True, prior_half=BOTH_HALVES, aux_trigger=True, partner_drop=0.0)


@dataclasses.dataclass
class Stream:
    """One source of training rows: cached latents (and mirrors), a prompt per image, which half it trains."""

    name: str
    latents: torch.Tensor
    latents_flip: torch.Tensor
    prompts: list  # str or (caption prompt, plain prompt)
    batch: int
    half: str  # "down" (content-like: trains D) or "up" (style-like: trains B)
    weight: float = 1.0
    word: str = ""  # the trigger word its prompts carry (an auxiliary set's)


def train_b4m(cfg: TrainConfig, on_event: EventHandler | None = None,
              cancel: threading.Event | None = None) -> TrainResult:
    """Run the three stages; a run that fails leaves no folder it created behind."""
    out = Path(cfg.out or Path("out") / (cfg.name or f"b4m-{Path(cfg.content).name}-{Path(cfg.style).name}"))
    created = not out.exists()
    try:
        return _train(cfg, out, on_event or (lambda e: None), cancel)
    except BaseException:
        if created and out.is_dir():
            shutil.rmtree(out, ignore_errors=True)
        raise


def check_sets(cfg: TrainConfig) -> None:
    """The inputs that need no model: both folders given, not the same folder."""
    if not cfg.content or not cfg.style:
        raise StudioError("--method b4m needs --content DIR (the subject's images) and --style DIR (the style's)")
    c, s = Path(cfg.content), Path(cfg.style)
    for flag, p in (("--content", c), ("--style", s)):
        if not p.is_dir():
            raise StudioError(f"{flag} {p}: no such folder")
    if c.resolve() == s.resolve():
        raise StudioError(f"--content and --style are the same folder ({c}); Break-for-Make needs the subject's "
                          f"images and the style's images apart")


def _digest(data: Any) -> str:
    import hashlib

    h = hashlib.sha256()
    for it in data.items:
        h.update(it.image.tobytes())
    return h.hexdigest()


def judge_sets(content: Any, style: Any, micro: bool) -> dict[str, Any]:
    """What the micro judge reads off both sets; refuses a content set that is really a style and the reverse.

    Returns the subject's shape and colour, the style's texture, and the style set's own shapes
    and colours (the leakage the compose suite counts). Off the micro world the judge cannot
    read the images: only the file checks apply and the fields are empty.
    """
    from collections import Counter

    info: dict[str, Any] = {"shape": "", "color": "", "texture": "", "style_shapes": [], "style_colors": []}
    if not micro:
        return info
    import numpy as np

    from studio.micro.judge import classify
    from studio.micro.world import ATTRIBUTES

    def read(data: Any) -> dict[str, list[str]]:
        arr = np.stack([np.asarray(it.image.resize((64, 64))) for it in data.items])
        got = classify(arr)
        return {a: [ATTRIBUTES[a][i] for i in got[a]] for a in ATTRIBUTES}

    rc, rs = read(content), read(style)
    top = {k: {a: Counter(v[a]).most_common(1)[0] for a in v} for k, v in (("content", rc), ("style", rs))}
    n_c, n_s = len(content), len(style)
    c_shape, c_shape_n = top["content"]["shape"]
    s_tex, s_tex_n = top["style"]["texture"]
    s_shape, s_shape_n = top["style"]["shape"]
    c_tex, c_tex_n = top["content"]["texture"]
    if c_shape_n / n_c < 0.5 and c_tex_n / n_c >= 0.8 and c_tex != "solid":
        raise StudioError(f"--content {content.folder}: looks like a style set, not a subject: the judge sees "
                          f"{len(set(rc['shape']))} different shapes, {c_tex_n} of {n_c} images {c_tex}; did you "
                          f"swap --content and --style?")
    if s_shape_n / n_s >= 0.8 and (s_tex == "solid" or len(set(rs["shape"])) == 1):
        raise StudioError(f"--style {style.folder}: looks like a subject, not a style: the judge sees a "
                          f"{s_shape} in {s_shape_n} of {n_s} images ({s_tex}); a style set shows its texture on "
                          f"varied shapes. Did you swap --content and --style?")
    info.update(shape=c_shape, color=top["content"]["color"][0], texture=s_tex,
                style_shapes=sorted(set(rs["shape"])), style_colors=sorted(set(rs["color"])))
    return info


def aux_sets(kind: str, n_sets: int, n_images: int, seed: int, avoid_shape: str, avoid_texture: str,
             style_shapes: list[str]) -> list[tuple[str, list[Any], list]]:
    """Auxiliary training sets rendered by the micro world: (name, PIL images, prompts) each.

    ``kind="style"``: style sets for the content stage: textures other than the user's style
    (held-out ones first), on seen shapes other than the subject, each "CAPTION in TOKEN style".
    ``kind="content"``: content sets for the style stage: shapes other than the subject and the
    style set's own shapes (held-out ones first), solid, each "a [COLOUR] TOKEN shape ...".
    """
    from studio.micro import world

    rng = random.Random(seed + (101 if kind == "style" else 202))
    sets = []
    if kind == "style":
        pool = [t for t in world.HELDOUT_TEXTURES + world.SEEN_TEXTURES if t not in (avoid_texture, "solid")]
        shapes = [s for s in world.SEEN_SHAPES if s != avoid_shape]
        for tok, tex in zip(AUX_TOKENS, pool[:n_sets]):
            scenes = [world.random_scene(rng, shapes=shapes, textures=(tex,)) for _ in range(n_images)]
            prompts = [world.prompt_for(shape=s.shape, color=s.color, background=s.background) + f" in {tok} style"
                       for s in scenes]
            sets.append((f"aux-style-{tex}", [world.render(s) for s in scenes], prompts))
    else:
        pool = [s for s in world.HELDOUT_SHAPES + world.SEEN_SHAPES if s != avoid_shape and s not in style_shapes]
        for tok, shape in zip(AUX_TOKENS, pool[:n_sets]):
            scenes = [world.random_scene(rng, shapes=(shape,), textures=("solid",)) for _ in range(n_images)]
            prompts = [(f"a {s.color} {tok} shape on a {s.background} background", f"a {tok} shape") for s in scenes]
            sets.append((f"aux-content-{shape}", [world.render(s) for s in scenes], prompts))
    if len(sets) < n_sets:
        raise StudioError(f"--aux-sets {n_sets}: the micro world has only {len(sets)} {kind}s left to render "
                          f"besides yours; use --aux-sets {len(sets)} or less")
    return sets


def _pixels(img: Any, res: int, flip: bool) -> torch.Tensor:
    import numpy as np

    img = img.convert("RGB")
    if img.size != (res, res):
        img = img.resize((res, res))
    arr = np.asarray(img, dtype=np.float32)
    if flip:
        arr = arr[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))) / 127.5 - 1.0


def _stage_file_checks(folder: Path, rank: int, family: str, base_hash: str, stage: str) -> dict[str, str]:
    """A finished stage kept for --resume: refuse it when its rank or base differs from this run's."""
    from studio.adapters import read_metadata

    meta = read_metadata(folder)
    if meta.get("studio.rank") != str(rank):
        raise StudioError(f"--resume: {folder} (the {stage} stage) was trained with --rank {meta.get('studio.rank')}, "
                          f"this run asks for --rank {rank}; resume with the same rank or choose a new --out")
    if meta.get("studio.base_family") != family or meta.get("studio.base_hash") != base_hash:
        raise StudioError(f"--resume: {folder} (the {stage} stage) was trained on {meta.get('studio.base')} "
                          f"({meta.get('studio.base_family')}), not on this base ({family}); the halves of another "
                          f"model cannot be recombined; choose a new --out")
    return meta


def _train(cfg: TrainConfig, out: Path, emit: EventHandler, cancel: threading.Event | None) -> TrainResult:
    from accelerate.utils import set_seed
    from safetensors.torch import load_file

    from studio import adapters
    from studio.adapters import b4m
    from studio.adapters.b4m import functional as bf
    from studio.adapters.trigger import KEY_PREFIX, TriggerEmbeddings
    from studio.generation import model_hash
    from studio.loading import load_pipeline
    from studio.trainers import loop
    from studio.trainers.data import load_image_folder, validate_output_dir
    from studio.trainers.recipes import Recipe, get_recipe

    t_start = time.time()
    cfg.validate()
    check_sets(cfg)
    if cfg.token == cfg.style_token:
        raise StudioError(f"--token and --style-token are both {cfg.token!r}: the subject and the style need "
                          f"their own trigger words")
    out = validate_output_dir(out)
    if not cfg.resume and any((out / p / adapters.core.LORA_FILE).exists() for p in ("", "content", "style")):
        raise StudioError(f"--out {out}: already holds a Break-for-Make run; pass --resume to continue it, or "
                          f"choose another folder")
    set_seed(cfg.seed)
    emit(Event("prepare", message=f"loading {cfg.base}"))
    pipe = load_pipeline(cfg.base, device="cpu" if cfg.device in ("", "cpu") or not torch.cuda.is_available()
                         else cfg.device, dtype="fp32")
    device = pipe.unet.device
    subj_cfg = dataclasses.replace(cfg, kind="subject", images=cfg.content, method="lora")
    plan = get_recipe("subject").plan(subj_cfg, pipe)  # family check, resolution, class prompts, sampling
    # both halves' sets are mirrored at the generic recipe default, not the subject recipe's unmirrored one
    flip = Recipe.default_flip if cfg.flip is None else cfg.flip
    if plan.family == "sdxl":  # its stages call the denoiser without SDXL's pooled embeddings and time ids
        raise StudioError(f"--base {cfg.base}: Break-for-Make does not train on SDXL yet; use an SD 1.x/2.x model "
                          f"or micro (plain LoRA, --method lora, trains on SDXL)")
    micro = plan.micro
    d = dict(MICRO if micro else REAL)
    rank = cfg.rank or d["rank"]
    lr = cfg.lr or d["lr"]
    batch = cfg.batch or d["batch"]
    steps = {"content": cfg.steps_content or d["steps_content"], "style": cfg.steps_style or d["steps_style"],
             "make": d["steps_make"] if cfg.steps_make is None else cfg.steps_make}
    prior_weight = d["prior_weight"] if cfg.prior_weight is None else cfg.prior_weight
    use_prior = True if cfg.prior is None else cfg.prior
    trigger_lr = cfg.trigger_lr or d["trigger_lr"]
    n_aux = 2 if cfg.aux_sets is None else cfg.aux_sets
    src = pipe.studio_source
    base_hash = model_hash(pipe)

    # ---- data ------------------------------------------------------------------------------------
    emit(Event("prepare", message=f"reading {cfg.content} and {cfg.style}"))
    content = load_image_folder(cfg.content, resolution=plan.resolution, multiple=plan.vae_factor)
    style = load_image_folder(cfg.style, resolution=plan.resolution, multiple=plan.vae_factor)
    for flag, data in (("--content", content), ("--style", style)):
        if len(data) < 2:
            raise StudioError(f"{flag} {data.folder}: a set of {len(data)} image; Break-for-Make needs at least 2 "
                              f"images of the {'subject' if flag == '--content' else 'style'} (5 or more is better)")
    if _digest(content) == _digest(style):
        raise StudioError(f"--content {cfg.content} and --style {cfg.style} hold the same images; give the "
                          f"subject's images and the style's images apart")
    seen = judge_sets(content, style, micro)
    if cfg.content_prompt and cfg.token not in cfg.content_prompt.split():
        raise StudioError(f"--content-prompt {cfg.content_prompt!r}: must contain the subject's trigger "
                          f"{cfg.token!r} (--token)")
    if cfg.style_prompt and cfg.style_token not in cfg.style_prompt.split():
        raise StudioError(f"--style-prompt {cfg.style_prompt!r}: must contain the style's trigger "
                          f"{cfg.style_token!r} (--style-token)")
    c_prompts = ([cfg.content_prompt] * len(content) if cfg.content_prompt
                 else get_recipe("subject").instance_prompts(subj_cfg, plan, content))
    sty_cfg = dataclasses.replace(cfg, kind="style", images=cfg.style, token=cfg.style_token, method="lora")
    s_prompts = ([cfg.style_prompt] * len(style) if cfg.style_prompt
                 else get_recipe("style").instance_prompts(sty_cfg, plan, style))

    emit(Event("prepare", message="caching latents and text embeddings"))
    vae = pipe.vae
    res = plan.resolution

    def encode(images: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return (loop._encode_images(vae, [_pixels(im, res, False) for im in images], device),
                loop._encode_images(vae, [_pixels(im, res, True) for im in images], device))

    lc, lcf = encode([it.image for it in content.items])
    ls, lsf = encode([it.image for it in style.items])
    aux_batch = d["aux_batch"]
    aux_w = 1.0 / max(1, n_aux)
    aux_style, aux_content = [], []
    if n_aux:
        if not micro:
            log.warning("b4m: the auxiliary sets are micro-world renders; on a real base they teach little "
                        "(--aux-sets 0 turns multi-correspondence off)")
        for word, (name, imgs, prompts) in zip(AUX_TOKENS, aux_sets("style", n_aux, d["aux_images"], cfg.seed,
                                                                    seen["shape"], seen["texture"], seen["style_shapes"])):
            aux_style.append(Stream(name, *encode(imgs), prompts, aux_batch, "up", aux_w, word))
        for word, (name, imgs, prompts) in zip(AUX_TOKENS, aux_sets("content", n_aux, d["aux_images"], cfg.seed,
                                                                    seen["shape"], seen["texture"], seen["style_shapes"])):
            aux_content.append(Stream(name, *encode(imgs), prompts, aux_batch, "down", aux_w, word))
    s_content = Stream("content", lc, lcf, c_prompts, batch, "down")
    s_style = Stream("style", ls, lsf, s_prompts, batch, "up")
    class_latents = None
    if use_prior:
        emit(Event("prepare", message=f"class images for output preservation ({cfg.class_images}, cached)"))
        pixels = loop.prior_images(pipe, plan.class_prompts, cfg.seed, emit, steps=plan.sample_steps,
                                   guidance=plan.guidance)
        class_latents = loop._encode_images(vae, pixels, device)
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.requires_grad_(False)
    text = loop.TextCache(pipe, train_text=False, live_word=None)
    noise_sched = loop.training_noise_scheduler(pipe)
    snr_w = loop.min_snr_weights(noise_sched, cfg.snr_gamma)
    gen = torch.Generator().manual_seed(cfg.seed * 1000)
    settings = adapters.AdapterSettings(rank=rank, alpha=cfg.alpha, targets=cfg.targets or d["targets"],
                                        options={"basis_seed": cfg.seed, "disjoint": d["disjoint"]})
    total = sum(steps.values())
    done_before = 0
    t_loop = time.time()
    losses: dict[str, float] = {}
    common_meta = {"base": src.spec, "base_family": src.family, "base_hash": base_hash, "rank": str(rank),
                   "class_word": plan.class_word, "b4m_basis_seed": str(cfg.seed), "b4m_aux_sets": str(n_aux),
                   "train_config": cfg.to_json()}
    if seen["texture"]:
        common_meta.update(style_train_shapes=json.dumps(seen["style_shapes"]),
                           style_train_colors=json.dumps(seen["style_colors"]))
    style_caps = [it.caption for it in style.items if it.caption]
    if style_caps:
        common_meta["style_captions"] = json.dumps(style_caps[:50])

    def run_stage(stage: str, streams: list[Stream], lrs: dict[str, float], trigger: list[torch.Tensor],
                  prior_half: str, partner_drop: float = 0.0) -> float:
        """The loop's step, with rows routed to their half; returns the mean of the last losses.

        ``prior_half``: the half the prior rows train ("down", "up" or "both"): the half this stage
        keeps. The partner half of a stage is thrown away at the make step, so a prior that also
        trained it would teach it to cancel the kept half's drift, and that cancelling goes with it.
        ``partner_drop``: the chance that a row of the stage's own set (``streams[0]``) sees the partner
        half as zero, so the kept half learns its set beside the auxiliary partner and without it, not
        only against the one partner it is thrown away from at the make step.
        """
        nonlocal done_before
        unet = pipe.unet
        groups = [{"params": b4m.learnable(unet, "default", half), "lr": lrs[half]} for half in ("down", "up")
                  if lrs[half] > 0]
        # a half with lr 0 (no auxiliary sets) stays exactly where it is: out of the optimizer, no decay
        frozen_off = [p for half in ("down", "up") if lrs[half] <= 0 for p in b4m.learnable(unet, "default", half)]
        for p in frozen_off:
            p.requires_grad_(False)
        if trigger:
            groups.append({"params": trigger, "lr": trigger_lr, "weight_decay": 0.0})
        params = [p for g in groups for p in g["params"]]
        opt = loop._optimizer(groups, device, "adamw" if device.type == "cpu" else cfg.optimizer)
        n = steps[stage]
        tail: list[float] = []
        emit(Event("prepare", step=done_before, total=total, message=f"stage {stage}: {n} steps"))
        unet.train()
        for step in range(n):
            if cancel is not None and cancel.is_set():
                from studio.trainers.loop import Cancelled

                raise Cancelled(f"Break-for-Make cancelled in the {stage} stage at step {step}/{n}")
            lats, prompts, halves, weights = [], [], [], []
            for s in streams:
                idx = torch.randint(0, len(s.latents), (s.batch,), generator=gen)
                flips = torch.rand(s.batch, generator=gen) < flip
                lats.append(torch.where(flips[:, None, None, None], s.latents_flip[idx], s.latents[idx]))
                prompts += [loop._pick(s.prompts[i], plan.caption_dropout, gen) for i in idx.tolist()]
                halves += [s.half] * s.batch
                weights.append((s.batch, s.weight))
            n_own = len(prompts)
            if class_latents is not None:
                cidx = torch.randint(0, len(class_latents), (batch,), generator=gen)
                lats.append(class_latents[cidx])
                prompts += [plan.class_prompts[i] for i in cidx.tolist()]
                halves += [prior_half] * batch
            lat = torch.cat(lats) * vae.config.scaling_factor
            emb = text.embed(prompts) if not trigger else torch.cat([text_live(p) for p in prompts])
            noise = torch.randn(lat.shape, generator=gen)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (lat.shape[0],), generator=gen)
            noisy = noise_sched.add_noise(lat, noise, t)
            target = noise if noise_sched.config.prediction_type == "epsilon" else noise_sched.get_velocity(lat, noise, t)
            if class_latents is not None and cfg.prior_target == "base":
                with torch.no_grad(), loop._adapters_off(pipe):
                    base_pred = unet(noisy[n_own:].to(device), t[n_own:].to(device), emb[n_own:].to(device)).sample
                target = torch.cat([target[:n_own].to(device), base_pred.float()])
            rows = {"down": torch.tensor([h in ("down", "both") for h in halves]),
                    "up": torch.tensor([h in ("up", "both") for h in halves])}
            off = None
            if partner_drop > 0:
                partner = "up" if streams[0].half == "down" else "down"
                drop = torch.zeros(len(halves), dtype=torch.bool)
                drop[: streams[0].batch] = torch.rand(streams[0].batch, generator=gen) < partner_drop
                off = {partner: drop}
            with b4m.route_gradients(unet, "default", rows, off):
                pred = unet(noisy.to(device), t.to(device), emb.to(device)).sample
            per = F.mse_loss(pred.float(), target.to(device), reduction="none").mean(dim=(1, 2, 3))
            if snr_w is not None:
                per = per * snr_w[t].to(device)
            loss = per.new_zeros(())
            at = 0
            for b, w in weights:
                loss = loss + w * per[at : at + b].mean()
                at += b
            if class_latents is not None:
                loss = loss + prior_weight * per[n_own:].mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tail = (tail + [float(loss.detach())])[-20:]
            g_step = done_before + step + 1
            elapsed = time.time() - t_loop
            emit(Event("train", step=g_step, total=total, loss=tail[-1], lr=lrs["down"] or lrs["up"],
                       eta_s=elapsed / g_step * (total - g_step), message=f"{stage} {step + 1}/{n}"))
        for p in frozen_off:
            p.requires_grad_(True)
        done_before += n
        unet.eval()
        return sum(tail) / len(tail) if tail else float("nan")

    live_words: list[str] = []

    def text_live(prompt: str) -> torch.Tensor:
        # prompts with a trigger whose rows are learning are encoded afresh (with gradients); others cached
        if any(w in prompt.split() for w in live_words):
            return text._encode([prompt])[0]  # (embeddings, SDXL pooled): b4m refuses SDXL
        return text.embed([prompt])

    def fresh_adapter(trigger_words: list[str]) -> list[torch.Tensor]:
        if "default" in adapters.adapter_names(pipe):
            adapters.remove_adapter(pipe, "default")
        adapters.add_adapter(pipe, "b4m", settings, "default")
        live_words[:] = trigger_words
        if not trigger_words or not (True if cfg.train_trigger is None else cfg.train_trigger):
            live_words[:] = []
            return []
        return adapters.add_trigger_embedding(pipe, " ".join(trigger_words), "default")

    def save(folder: Path, kind: str, extra: dict[str, str]) -> Path:
        meta = {**common_meta, "kind": kind, **extra}
        path = adapters.save_adapter(pipe, folder, "default", metadata=meta)
        (folder / "train_config.json").write_text(cfg.to_json())
        return path

    def load_stage(folder: Path, stage: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        meta = _stage_file_checks(folder, rank, src.family, base_hash, stage)
        tensors = load_file(str(adapters.core.adapter_file(folder)))
        return tensors, meta

    def put_state(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
        from peft.utils import set_peft_model_state_dict

        sd = {k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")}
        try:
            set_peft_model_state_dict(pipe.unet, sd, adapter_name="default")
        except RuntimeError as exc:
            raise StudioError(f"b4m: a stage's adapter does not fit this run ({str(exc).splitlines()[-1][:200]}); "
                              f"was it trained with another --rank, --targets or --seed?") from exc
        if any(k.startswith(KEY_PREFIX) for k in tensors):
            kept = TriggerEmbeddings.from_file_parts(tensors, meta or {})
            if kept is not None:
                copy_rows(kept.token_ids, kept.vectors)

    def trigger_rows() -> tuple[dict[str, list[int]], dict[str, torch.Tensor]]:
        """The current adapter's learned trigger rows: (token ids, rows) per text encoder."""
        entry = pipe._studio_adapters["default"].get("trigger")
        if entry is None:
            return {}, {}
        return dict(entry.token_ids), {k: v.detach().clone() for k, v in entry.vectors.items()}

    def copy_rows(ids: dict[str, list[int]], vecs: dict[str, torch.Tensor]) -> None:
        """Write learned rows into the current adapter's trigger rows, token by token (ids absent stay)."""
        entry = pipe._studio_adapters["default"].get("trigger")
        if entry is None:
            return
        with torch.no_grad():
            for comp, rows in entry.vectors.items():
                src = dict(zip(ids.get(comp, []), vecs.get(comp, [])))
                for i, tid in enumerate(entry.token_ids[comp]):
                    if tid in src:
                        rows[i].copy_(src[tid])

    def keep_only(word: str) -> None:
        """Drop the auxiliary sets' trigger rows before a stage is saved: its file carries the user's word only."""
        entry = pipe._studio_adapters["default"].get("trigger")
        if entry is None or not live_words or live_words == [word]:
            return
        ids, vecs = trigger_rows()
        adapters.add_trigger_embedding(pipe, word, "default")
        copy_rows(ids, vecs)

    (out / "content").mkdir(exist_ok=True)
    (out / "style").mkdir(exist_ok=True)
    timings: dict[str, float] = {}
    # the auxiliary sets' words learn their rows too: a partner half keyed on its own word paints only
    # its own rows, not the stage's images (with fixed rows it painted its texture on every prompt)
    aux_words = {k: [s.word for s in streams] if d["aux_trigger"] else []
                 for k, streams in (("content", aux_style), ("style", aux_content))}

    def stage(name: str, token: str, sets: list[Stream], half: str, partner: str) -> tuple[dict, Any, dict]:
        """Train one stage's ``half`` on ``sets`` (the user's set first), or keep it from an earlier run;
        its UNet factors, its trigger rows and its frozen halves."""
        nonlocal done_before
        t0 = time.time()
        trig = fresh_adapter([token] + aux_words[name])
        if cfg.resume and (out / name / adapters.core.LORA_FILE).exists():
            put_state(*load_stage(out / name, name))
            done_before += steps[name]
            emit(Event("prepare", step=done_before, total=total, message=f"stage {name}: kept from the earlier run"))
        else:
            aux = len(sets) > 1
            losses[name] = run_stage(name, sets, {half: lr, partner: lr * d["aux_lr_scale"] if aux else 0.0}, trig,
                                     d["prior_half"][name], d["partner_drop"] if aux else 0.0)
            keep_only(token)
            save(out / name, name, {"trigger": token, f"{name}_trigger": token, "b4m_stage": name,
                                    "steps": str(steps[name])})
        timings[name] = time.time() - t0
        sd = adapters.adapter_state_dict(pipe, "default")["unet"]
        keep_only(token)
        return sd, trigger_rows(), b4m.frozen_state(pipe.unet, "default")

    # ---- stage 1: content (trains the down half), stage 2: style (the up half) ----------------------
    content_sd, content_trig, frozen_content = stage("content", cfg.token, [s_content] + aux_style, "down", "up")
    style_sd, style_trig, frozen_style = stage("style", cfg.style_token, [s_style] + aux_content, "up", "down")
    if frozen_style.keys() != frozen_content.keys() or not all(
            torch.equal(frozen_style[k], frozen_content[k]) for k in frozen_style):
        raise StudioError("b4m: the content and style stages' frozen halves differ; this is a bug, please report it")
    # ---- stage 3: make ---------------------------------------------------------------------------
    t0 = time.time()
    trig = fresh_adapter([cfg.token, cfg.style_token])
    made: dict[str, torch.Tensor] = {}
    for name, layer in b4m.plp_layers(pipe.unet, "default"):
        s = b4m.layer_split(layer, "default")
        key_a, key_b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        up, down = bf.make((content_sd[key_b], content_sd[key_a]), (style_sd[key_b], style_sd[key_a]), s.h_out,
                           s.h_in, where=name)
        made[key_b], made[key_a] = up, down
    put_state({f"unet.{k}": v for k, v in made.items()})
    # the combined trigger rows: the content stage's for the subject word, the style stage's for the style
    copy_rows(*content_trig)
    copy_rows(*style_trig)
    if steps["make"]:
        ms = d["make_lr_scale"]
        losses["make"] = run_stage("make", [s_content, s_style], {"down": lr * ms, "up": lr * ms}, trig, "both")
    timings["make"] = time.time() - t0
    meta = {"trigger": cfg.token, "content_trigger": cfg.token, "subject_trigger": cfg.token,
            "style_trigger": cfg.style_token, "b4m_stage": "combined", "steps": str(total),
            "final_loss": f"{losses.get('make', float('nan')):.6f}"}
    result_file = save(out, "combined", meta)
    (out / "b4m.json").write_text(json.dumps({
        "stages": steps, "seconds": {k: round(v, 1) for k, v in timings.items()}, "losses": losses,
        "judge": seen, "aux_sets": n_aux, "rank": rank, "lr": lr, "batch": batch}, indent=1, default=str))
    sample_plan = dataclasses.replace(plan, sample_prompts=list(cfg.sample_prompts) or [
        f"a {cfg.token} {plan.class_word} on a {bg} background in {cfg.style_token} style"
        for bg in ("black", "white", "teal")])
    samples = loop._samples(pipe, cfg, sample_plan, out, total, emit)
    seconds = time.time() - t_start
    emit(Event("done", step=total, total=total, loss=losses.get("make"), message=f"wrote {result_file}",
               samples=samples))
    log.info("Break-for-Make: %s in %.0f s (content %.0f s, style %.0f s, make %.0f s)", out, seconds,
             timings["content"], timings["style"], timings["make"])
    if cfg.register:
        _register_parts(cfg, out)
    return TrainResult(out=out, adapter_file=result_file, steps=total, seconds=seconds,
                       final_loss=losses.get("make"), images=len(content) + len(style),
                       skipped=[(str(p), r) for p, r in content.skipped + style.skipped], samples=samples)


def _register_parts(cfg: TrainConfig, out: Path) -> None:
    """Put the content and style adapters in the library too (the combined one is added by the caller)."""
    from studio.library import Library, derive_name

    base = derive_name(cfg.name or out.name)
    for part in ("content", "style"):
        try:
            entry = Library().add(out / part, name=f"{base}-{part}", description=cfg.description, unique=True,
                                  kind=part)
        except StudioError as exc:
            log.warning("the %s adapter was not added to the library: %s", part, exc)
        else:
            log.info("added the %s adapter to the library as %s", part, entry.name)
