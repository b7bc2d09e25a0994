"""The training loop: one loop, read top to bottom; recipes decide data, prompts and losses.

``train(config, on_event=..., cancel=...)`` loads the base, prepares and caches the data
(VAE latents of every image and its mirror, text embeddings of every prompt, class images for
prior preservation), injects the adapter, and runs the optimizer on accelerate (devices, mixed
precision, gradient accumulation, several processes). Checkpoints hold the adapter, the
optimizer, the LR schedule and every RNG, so ``resume`` continues exactly where a killed run
stopped. Progress goes to one callback as :class:`Event` objects; the CLI draws a bar from
them and the UI streams them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from studio.errors import StudioError
from studio.trainers.config import TrainConfig
from studio.trainers.ema import WeightAverage

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


class Cancelled(StudioError):
    """The run was cancelled; its last checkpoint is kept for --resume."""

    exit_code = 130


@dataclasses.dataclass
class Event:
    """A progress report: phase, step/total, loss, lr, ETA, sample images written so far."""

    phase: str  # prepare | train | sample | checkpoint | done
    step: int = 0
    total: int = 0
    loss: float | None = None
    lr: float | None = None
    eta_s: float | None = None
    message: str = ""
    samples: list[str] = dataclasses.field(default_factory=list)


EventHandler = Callable[[Event], None]


@dataclasses.dataclass
class TrainResult:
    out: Path
    adapter_file: Path
    steps: int
    seconds: float
    final_loss: float | None
    images: int
    skipped: list[tuple[str, str]]
    samples: list[str]


def train(cfg: TrainConfig, on_event: EventHandler | None = None, cancel: threading.Event | None = None) -> TrainResult:
    """Run one training job to the end (or to the last checkpoint if cancelled).

    A run that fails before its first checkpoint removes the output folder it created, so
    nothing half-made is left behind; later failures keep the checkpoints for ``resume``.
    """
    if cfg.method == "b4m":  # three stages on this loop's machinery (studio.trainers.b4m)
        from studio.trainers.b4m import train_b4m

        return train_b4m(cfg, on_event, cancel)
    out = Path(cfg.out or Path("out") / default_name(cfg))
    created = not out.exists()
    try:
        return _train(cfg, out, on_event, cancel)
    except BaseException:
        if created and out.is_dir() and not (out / CHECKPOINT_DIR / "step.json").exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def _train(cfg: TrainConfig, out: Path, on_event: EventHandler | None, cancel: threading.Event | None) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from studio import adapters
    from studio.adapters import fast as fast_lora
    from studio.adapters import frozen as frozen_layers
    from studio.loading import load_pipeline
    from studio.trainers.data import load_image_folder, precheck_image_folder, validate_output_dir
    from studio.trainers.recipes import get_recipe

    emit = on_event or (lambda e: None)
    t_start = time.time()
    cfg.validate()
    recipe = get_recipe(cfg.kind)
    out = validate_output_dir(out)
    precheck_image_folder(cfg.images)  # a wrong folder is said before a model of gigabytes is loaded
    ckpt_dir = out / CHECKPOINT_DIR
    if not cfg.resume and (ckpt_dir.exists() or (out / adapters.core.LORA_FILE).exists()
                           or (out / adapters.core.STUDIO_FILE).exists()):
        raise StudioError(f"--out {out}: already holds an adapter or checkpoints; pass --resume to continue it, "
                          f"or choose another folder")

    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision=cfg.mixed_precision,
        cpu=(cfg.device == "cpu") or not torch.cuda.is_available(),
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    log.info("world size %d (%s, rank %d)", world, accelerator.distributed_type, rank)
    wanted = os.environ.get("STUDIO_ASSERT_WORLD_SIZE")
    if wanted and int(wanted) != world:
        raise StudioError(f"STUDIO_ASSERT_WORLD_SIZE={wanted} but this run has {world} process(es); launch it with "
                          f"torchrun --nproc_per_node {wanted} -m studio.cli train ...")
    set_seed(cfg.seed)
    emit(Event("prepare", message=f"loading {cfg.base}"))
    # before the weights are loaded: a real-size run that cannot fit is refused with what would fit,
    # instead of being killed by the kernel minutes later (micro and hub ids are not estimated)
    from studio.trainers.memory import gpu_needs_checkpointing, preflight

    preflight(cfg.base, resolution=cfg.resolution, batch=cfg.batch or 1,
              prior=cfg.prior if cfg.prior is not None else cfg.kind == "subject", checkpointing=True,
              device="cpu" if accelerator.device.type == "cpu" else accelerator.device.type,
              text_in_loop=cfg.text_encoder or (cfg.train_trigger if cfg.train_trigger is not None
                                                else recipe.trains_trigger))
    half = _frozen_half(accelerator, cfg.mixed_precision)
    # Staged on the CPU (a diffusers folder or a .safetensors file): the components are built empty and
    # read one at a time, the text encoder(s) and VAE first for the caches, then freed, then the
    # denoiser; the whole fp32 pipeline is never resident at once (docs/realsize.md). Micro loads whole.
    pipe = load_pipeline(cfg.base, device=accelerator.device if cfg.device != "cpu" else "cpu",
                         dtype={None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[half],
                         staged=cfg.base != "micro" and accelerator.device.type == "cpu" and half is None)
    if half is not None:  # the VAE only encodes the cache, in fp32 (SDXL's overflows in fp16)
        pipe.vae.to(torch.float32)
    from studio import loading

    if loading.is_staged(pipe):
        loading.hand_back_freed_memory()  # freed activations leave the resident memory (studio.loading)
    texts = [n for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]
    loading.materialize(pipe, [*texts, "vae"])  # what the caches need (no-op unless staged)
    plan = recipe.plan(cfg, pipe)  # resolved defaults: steps, lr, rank, batch, prompts, prior
    settings = adapters.AdapterSettings(rank=plan.rank, alpha=cfg.alpha, targets=plan.targets,
                                        text_encoder=cfg.text_encoder, blocks=cfg.block_list(),
                                        options=cfg.adapter_options())
    adapters.check_settings(pipe, cfg.method, settings)  # a rank or block that cannot fit: said before the caches
    # said once per run because multi-GPU/multi-node launches change the first number silently
    log.info("effective batch %d = %d per process x %d accumulation x %d process(es); lr %g, not scaled with "
             "the process count (docs/CLUSTER.md)", plan.batch * cfg.grad_accum * world, plan.batch, cfg.grad_accum,
             world, plan.lr)
    emit(Event("prepare", message=f"reading {cfg.images}"))
    data = load_image_folder(cfg.images, resolution=plan.resolution, center_crop=True, buckets=cfg.buckets,
                             require_captions=(cfg.caption == "captions"),
                             multiple=plan.vae_factor)
    prompts = recipe.instance_prompts(cfg, plan, data)

    # ---- caches: latents of every image (and its mirror), embeddings of every prompt -------------
    emit(Event("prepare", message="caching latents and text embeddings"))
    vae = pipe.vae
    latents = _encode_images(vae, [data.pixel_tensor(i) for i in range(len(data))], accelerator.device)
    latents_flip = (_encode_images(vae, [data.pixel_tensor(i, flip=True) for i in range(len(data))], accelerator.device)
                    if plan.flip > 0 else latents)
    class_latents = None
    if plan.prior:
        emit(Event("prepare", message=f"class images for prior preservation ({cfg.class_images}, cached)"))
        with accelerator.main_process_first():  # one process generates the class images, the others read them
            pixels = prior_images(pipe, plan.class_prompts, cfg.seed, emit, steps=plan.sample_steps,
                                  guidance=plan.guidance, size=plan.resolution,
                                  before_generating=lambda: loading.materialize(pipe, ["unet"]))
            class_latents = _encode_images(vae, pixels, accelerator.device)
    text_cache = TextCache(pipe, train_text=cfg.text_encoder, live_word=cfg.token if plan.train_trigger else None,
                           decor=cfg.decor_config())
    if loading.is_staged(pipe):
        # every prompt the loop can draw, embedded now, so the text encoder(s) can go; not when the text
        # side trains (a text-encoder adapter, a learned trigger) or tag dropout makes too many prompts
        possible = None if (cfg.text_encoder or plan.train_trigger) else _possible_prompts(
            prompts, plan, cfg.empty_prompt, class_latents is not None)
        if possible is not None:
            emit(Event("prepare", message=f"caching the embeddings of {len(possible)} prompt(s)"))
            text_cache.prefill(possible)
        loading.release(pipe, ["vae"] + (texts if possible is not None else []))
        emit(Event("prepare", message="loading the denoiser"))
        loading.materialize(pipe, ["unet"])
        emit(Event("prepare", message="adapter and optimizer"))

    # ---- adapter --------------------------------------------------------------------------------
    for comp in pipe.components.values():  # only the adapter trains: a gradient that reaches the base
        if isinstance(comp, torch.nn.Module):  # (through a learned trigger embedding, say) must not move it
            comp.requires_grad_(False)
    params = adapters.add_adapter(pipe, cfg.method, settings, "default")
    fast_layers = sum(fast_lora.speed_up(m) for m in adapters.core.adapted_models(pipe).values())
    # the frozen denoiser's convolutions and GEGLUs keep less for the backward pass (same gradients; at real
    # size 26% of the activations, docs/realsize.md); micro's activations are small and its steps short, so
    # it keeps autograd's own layers (a Python autograd function per convolution would only add overhead)
    lean_layers = 0 if plan.micro else frozen_layers.keep_less(pipe.unet)
    trigger_params = adapters.add_trigger_embedding(pipe, cfg.token, "default", cfg.init_word) if plan.train_trigger else []
    if half is not None:  # PEFT builds the adapter in its base layer's dtype; the trained weights stay fp32
        for p in params + trigger_params:
            p.data = p.data.float()
    trig = adapters.core.trigger_embeddings(pipe) if trigger_params and plan.trigger_norm else None
    trig_caps = trig.norm_caps(pipe, plan.trigger_norm) if trig is not None else {}
    if trig is not None:
        trig.clamp_norms(trig_caps)
    if cfg.init_word and not plan.train_trigger:
        log.warning("--init-word %s has no effect: the trigger embedding is not trained (--train-trigger)", cfg.init_word)
    unet = pipe.unet
    # at real size the activations dwarf the LoRA (docs/realsize.md); a GPU with room to spare goes without;
    # on the CPU only the blocks of the highest resolutions, where the activations are, recompute
    if cfg.gradient_checkpointing or (not plan.micro and accelerator.device.type == "cuda"
                                      and gpu_needs_checkpointing(cfg.base, resolution=plan.resolution,
                                                                  batch=plan.batch, prior=plan.prior,
                                                                  weight_bytes=2 if half is not None else 4)):
        unet.enable_gradient_checkpointing()
    elif not plan.micro and accelerator.device.type != "cuda":
        checkpoint_high_resolutions(unet, CPU_CHECKPOINT_LEVELS)
    te_params = [p for n, p in _named_trainable(pipe) if not n.startswith("unet.")]
    unet_params = [p for n, p in _named_trainable(pipe) if n.startswith("unet.")]
    groups = [{"params": unet_params, "lr": plan.lr}]
    if te_params:
        groups.append({"params": te_params, "lr": cfg.text_encoder_lr or plan.lr / 2})
    if trigger_params:
        groups.append({"params": trigger_params, "lr": plan.trigger_lr, "weight_decay": 0.0})
    optimizer = _optimizer(adapters.no_decay_groups(groups), accelerator.device, cfg.optimizer)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg.scheduler, cfg.warmup, plan.steps))
    unet, optimizer = accelerator.prepare(unet, optimizer)
    noise_sched = training_noise_scheduler(pipe)
    snr_w = min_snr_weights(noise_sched, cfg.snr_gamma)
    n_t = noise_sched.config.num_train_timesteps
    lo, hi = cfg.timesteps()
    t_range = (round(lo * n_t), max(round(hi * n_t), round(lo * n_t) + 1))

    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)  # data order, flips, noise, timesteps
    # the average starts from the initial weights; every process keeps the same one (its gradients are synced)
    ema = WeightAverage(params + trigger_params, plan.ema) if plan.ema else None
    step = 0
    if cfg.resume:
        step = _load_checkpoint(ckpt_dir, pipe, optimizer, lr_sched, gen, rank, ema)
        if step:
            emit(Event("prepare", step=step, total=plan.steps, message=f"resumed at step {step}"))
    # ---- the loop -------------------------------------------------------------------------------
    unet.train()
    samples: list[str] = []
    losses: list[float] = []
    t_loop = time.time()
    first_step = step
    while step < plan.steps:
        if cancel is not None and cancel.is_set():
            _save_checkpoint(ckpt_dir, pipe, optimizer, lr_sched, gen, step, rank, accelerator, ema)
            raise Cancelled(f"training cancelled at step {step}/{plan.steps}; resume with --resume --out {out}")
        with accelerator.accumulate(unet):
            idx = torch.randint(0, len(data), (plan.batch,), generator=gen)
            flips = torch.rand(plan.batch, generator=gen) < plan.flip
            lat = torch.where(flips[:, None, None, None], latents_flip[idx], latents[idx])
            emb, pooled = text_cache.embed_pooled([_empty_or(_pick(prompts[i], plan.caption_dropout, gen,
                                                                   plan.tag_dropout, cfg.token), cfg.empty_prompt, gen)
                                                   for i in idx.tolist()])
            time_ids = _time_ids(data, idx, flips) if pooled is not None else None
            if class_latents is not None:
                cidx = torch.randint(0, len(class_latents), (plan.batch,), generator=gen)
                lat = torch.cat([lat, class_latents[cidx]])
                # prior_uncond 0 draws nothing: earlier runs keep their random streams
                c_emb, c_pooled = text_cache.embed_pooled([
                    _pick((plan.class_prompts[i], ""), plan.prior_uncond, gen) if plan.prior_uncond
                    else plan.class_prompts[i] for i in cidx.tolist()])
                emb = torch.cat([emb, c_emb])
                if pooled is not None:  # class images: generated at their own size, uncropped
                    h, w = (s * plan.vae_factor for s in class_latents.shape[-2:])
                    pooled = torch.cat([pooled, c_pooled])
                    time_ids = torch.cat([time_ids, torch.tensor([[h, w, 0, 0, h, w]] * len(cidx), dtype=torch.float32)])
            dev = accelerator.device
            extra = plan.unet_kwargs(*(x.to(dev) if x is not None else None for x in (pooled, time_ids)))
            lat = lat * vae.config.scaling_factor
            noise = torch.randn(lat.shape, generator=gen)
            t = torch.randint(0, n_t, (lat.shape[0],), generator=gen)
            if t_range != (0, n_t):  # the training images only (class images keep the whole schedule),
                t[: plan.batch] = t_range[0] + t[: plan.batch] * (t_range[1] - t_range[0]) // n_t  # same draws
            noisy = noise_sched.add_noise(lat, noise, t)
            target = noise if noise_sched.config.prediction_type == "epsilon" else noise_sched.get_velocity(lat, noise, t)
            if class_latents is not None and cfg.prior_target == "base":
                # Output preservation: the class half learns the base model's own prediction, not the
                # sampled noise. Far less variance than DreamBooth's noise target, so the adapter is held
                # to the base exactly where the trigger is absent (measured in docs/training.md).
                with torch.no_grad(), _adapters_off(pipe), accelerator.autocast():
                    base_pred = accelerator.unwrap_model(unet)(
                        noisy[plan.batch :].to(dev), t[plan.batch :].to(dev), emb[plan.batch :].to(dev),
                        **_rows(extra, slice(plan.batch, None))).sample
                target = torch.cat([target[: plan.batch].to(dev), base_pred.float()])
            with accelerator.autocast():
                pred = unet(noisy.to(dev), t.to(dev), emb.to(dev), **extra).sample
            per = F.mse_loss(pred.float(), target.to(dev), reduction="none").mean(dim=(1, 2, 3))
            if snr_w is not None:
                per = per * snr_w[t].to(dev)
            if class_latents is not None:
                loss = per[: plan.batch].mean() + plan.prior_weight * per[plan.batch :].mean()
            else:
                loss = per.mean()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                _sync_unwrapped_grads(te_params + trigger_params, world)
                accelerator.clip_grad_norm_(params + trigger_params, 1.0)
            optimizer.step()
            if trig is not None:
                trig.clamp_norms(trig_caps)
            if ema is not None and accelerator.sync_gradients:
                ema.update()
            lr_sched.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(float(loss.detach()))
        elapsed = time.time() - t_loop
        eta = elapsed / (step - first_step) * (plan.steps - step)
        emit(Event("train", step=step, total=plan.steps, loss=losses[-1], lr=lr_sched.get_last_lr()[0], eta_s=eta))
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < plan.steps:
            _save_checkpoint(ckpt_dir, pipe, optimizer, lr_sched, gen, step, rank, accelerator, ema)
            emit(Event("checkpoint", step=step, total=plan.steps, message=f"checkpoint at step {step}"))
        if (cfg.samples and cfg.sample_every and step % cfg.sample_every == 0 and step < plan.steps
                and accelerator.is_main_process):
            away = [n for n in loading.WEIGHTED if n not in loading.resident(pipe)]
            loading.materialize(pipe, away)  # staged: the text encoder(s) and VAE back for the samples
            samples += _samples(pipe, cfg, plan, out, step, emit)
            loading.release(pipe, away)
            unet.train()

    # ---- export ---------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    unet.eval()
    result_file = out / adapters.core.LORA_FILE
    if accelerator.is_main_process:
        pipe.unet = accelerator.unwrap_model(unet)
        if fast_layers:  # PEFT's own layer classes again for whatever reads the pipeline next
            for m in adapters.core.adapted_models(pipe).values():
                fast_lora.restore(m)
        if lean_layers:
            frozen_layers.restore(pipe.unet)
        if ema is not None:  # the saved adapter (and the final samples) are the average, not the last step
            ema.copy_to()
        meta = recipe.metadata(cfg, plan, pipe, data)
        meta["final_loss"] = f"{_mean_tail(losses):.6f}" if losses else ""
        result_file = adapters.save_adapter(pipe, out, "default", metadata=meta)
        if cfg.samples:
            loading.materialize(pipe)
            samples += _samples(pipe, cfg, plan, out, step, emit)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        (out / "train_config.json").write_text(cfg.to_json())
    accelerator.wait_for_everyone()
    seconds = time.time() - t_start
    emit(Event("done", step=step, total=plan.steps, loss=_mean_tail(losses) if losses else None,
               message=f"wrote {result_file}", samples=samples))
    return TrainResult(out=out, adapter_file=result_file, steps=step, seconds=seconds,
                       final_loss=_mean_tail(losses) if losses else None, images=len(data),
                       skipped=[(str(p), r) for p, r in data.skipped], samples=samples)


# Resolution levels of the denoiser whose blocks recompute their activations in the backward pass on the
# CPU: SD 1.5 at 512 px keeps most of its activations at the two highest (64x64 and 32x32 latents); the
# lower ones cost about as much compute and little memory (docs/realsize.md)
CPU_CHECKPOINT_LEVELS = 2


@functools.lru_cache(maxsize=1)
def _attention_ops() -> frozenset[Any]:
    """The fused attention kernels of this torch (CPU flash, CUDA flash / memory-efficient / cuDNN)."""
    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    return frozenset(getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n))


def attention_keeping_checkpoint(module: Any, *args: Any) -> Any:
    """diffusers' checkpointing function, except that attention's outputs are kept, not recomputed.

    At SD 1.5's 64x64 latents one self-attention is about 21 GFLOP and its output (with the softmax
    statistics) 5 MB: keeping them made the 512 px CPU step 0.90x as long for 0.05 GiB more
    (docs/realsize.md). Selective activation checkpointing (torch.utils.checkpoint) keeps those
    kernels' outputs and recomputes the rest.
    """
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    keep = _attention_ops()

    def policy(ctx: Any, op: Any, *a: Any, **k: Any) -> Any:
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    return checkpoint(module.__call__, *args, use_reentrant=False,
                      context_fn=lambda: create_selective_checkpoint_contexts(policy))


def checkpoint_high_resolutions(unet: Any, levels: int) -> list[str]:
    """Gradient checkpointing on the blocks of the ``levels`` highest resolutions of ``unet`` only.

    diffusers' ``enable_gradient_checkpointing`` turns it on everywhere; here it is then turned off in
    the blocks of lower resolutions (a down block's level is its index, an up block's is counted from
    the other end, the mid block is the lowest). Attention outputs are kept
    (:func:`attention_keeping_checkpoint`). Returns the names of the checkpointed modules.
    """
    unet.enable_gradient_checkpointing(gradient_checkpointing_func=attention_keeping_checkpoint)
    n = len(unet.down_blocks)
    on = []
    for name, module in unet.named_modules():
        if not name or not hasattr(module, "gradient_checkpointing"):
            continue
        top, _, rest = name.partition(".")
        index = int(rest.split(".")[0]) if top in ("down_blocks", "up_blocks") else n - 1
        level = index if top == "down_blocks" else n - 1 - index if top == "up_blocks" else n - 1
        module.gradient_checkpointing = level < levels
        if module.gradient_checkpointing:
            on.append(name)
    return on


def _time_ids(data: Any, idx: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """SDXL's add_time_ids of the batch's images (original size, crop, target size), ``(B, 6)``."""
    return torch.tensor([data.items[i].sdxl_time_ids(bool(f)) for i, f in zip(idx.tolist(), flips.tolist())],
                        dtype=torch.float32)


def _rows(kwargs: dict[str, Any], rows: slice) -> dict[str, Any]:
    """The denoiser's extra inputs (:meth:`Plan.unet_kwargs`) of some rows of the batch."""
    if "added_cond_kwargs" not in kwargs:
        return kwargs
    return {**kwargs, "added_cond_kwargs": {k: v[rows] for k, v in kwargs["added_cond_kwargs"].items()}}


@contextlib.contextmanager
def _adapters_off(pipe: Any) -> Iterator[None]:
    """The base model for one forward pass."""
    from studio import adapters

    adapters.set_enabled(pipe, False)
    try:
        yield
    finally:
        adapters.set_enabled(pipe, True)


def _pick(prompt: str | tuple[str, str], dropout: float, gen: torch.Generator, tag_dropout: float = 0.0,
          keep: str = "") -> str:
    """An image's prompt: its caption prompt, or with probability ``dropout`` its plain one.

    ``tag_dropout``: each comma-separated tag of the caption prompt is left out with that
    probability, except tags that contain the word ``keep`` (the trigger): kohya's tag dropout,
    so the trigger is seen beside every subset of what the caption names.
    """
    if isinstance(prompt, str):
        return prompt  # draws nothing, so runs without captions keep their random streams
    if float(torch.rand(1, generator=gen)) < dropout:
        return prompt[1]
    tags = prompt[0].split(",")
    if not tag_dropout or len(tags) < 2:
        return prompt[0]  # draws nothing more: runs without tag dropout keep their random streams
    kept = [t for t in tags if (keep and keep in t.split()) or float(torch.rand(1, generator=gen)) >= tag_dropout]
    return ",".join(kept).strip() or prompt[1]


def _possible_prompts(prompts: list[str | tuple[str, str]], plan: Any, empty_rate: float,
                      prior: bool) -> list[str] | None:
    """Every prompt the loop can draw (:func:`_pick`, :func:`_empty_or`, class prompts), in a fixed order;
    None when tag dropout makes them too many to list (any subset of a caption's tags)."""
    out: dict[str, None] = {}
    for p in prompts:
        if isinstance(p, str):
            out[p] = None
            continue
        if plan.tag_dropout and len(p[0].split(",")) >= 2:
            return None
        out[p[0]] = out[p[1]] = None
    if empty_rate:
        out[""] = None
    if prior:
        out.update(dict.fromkeys(plan.class_prompts))
        if plan.prior_uncond:
            out[""] = None
    return list(out)


def _empty_or(prompt: str, rate: float, gen: torch.Generator) -> str:
    """``prompt``, or with probability ``rate`` the empty prompt (kohya's caption_dropout_rate)."""
    if not rate:
        return prompt  # draws nothing: runs without it keep their random streams
    return "" if float(torch.rand(1, generator=gen)) < rate else prompt


def default_name(cfg: TrainConfig) -> str:
    """<kind>-<folder name>, e.g. subject-heart-red."""
    if cfg.name:
        return cfg.name
    folder = Path(cfg.images).name or "images"
    return folder if folder.startswith(cfg.kind) else f"{cfg.kind}-{folder}"


def _mean_tail(values: list[float], n: int = 20) -> float:
    tail = values[-n:]
    return sum(tail) / len(tail)


def _sync_unwrapped_grads(params: list[torch.Tensor], world: int) -> None:
    """Average the gradients of trainables outside the DDP-wrapped denoiser across processes."""
    if world <= 1:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


def _named_trainable(pipe: Any):
    from studio.adapters.core import adapted_models

    for comp, model in adapted_models(pipe).items():
        for n, p in model.named_parameters():
            if p.requires_grad:
                yield f"{comp}.{n}", p


def _frozen_half(accelerator: Any, mixed_precision: str) -> torch.dtype | None:
    """The dtype the frozen weights are loaded in: fp16/bf16 on CUDA under that mixed precision, else None (fp32).

    What diffusers' training scripts do (``weight_dtype``): the frozen weights take half the memory
    and autocast computes in half precision anyway; the trained weights stay fp32. Not on the CPU,
    where fp32 is the default (docs/BENCHMARKS.md).
    """
    if accelerator.device.type != "cuda" or mixed_precision not in ("fp16", "bf16"):
        return None
    return torch.float16 if mixed_precision == "fp16" else torch.bfloat16


def _optimizer(groups: list[dict], device: torch.device, choice: str = "auto") -> torch.optim.Optimizer:
    """AdamW; 8-bit AdamW (bitsandbytes, CUDA only) when asked, or on 'auto' where it is there."""
    if choice == "adamw8bit" or (choice == "auto" and device.type == "cuda"):
        if choice == "adamw8bit" and device.type != "cuda":
            raise StudioError("--optimizer adamw8bit: bitsandbytes' 8-bit optimizers run on CUDA only; use adamw")
        try:
            import bitsandbytes as bnb
        except ImportError:
            if choice == "adamw8bit":
                from studio.errors import require

                require("bitsandbytes", "cuda", "--optimizer adamw8bit")
        else:
            return bnb.optim.AdamW8bit(groups, weight_decay=1e-2)
    # The fused kernel updates every tensor in one call: a LoRA has a hundred small tensors, and the
    # per-tensor loop took 3.4 ms of an 84 ms micro step, the fused one 0.6 ms (AMD EPYC, 1 thread).
    fused = device.type in ("cpu", "cuda") and all(p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, weight_decay=1e-2, fused=fused or None)


def _schedule(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
        if kind == "linear":
            return max(0.0, 1 - p)
        return 1.0

    return f


def min_snr_weights(noise_sched: Any, gamma: float) -> torch.Tensor | None:
    """Per-timestep loss weights of min-SNR-gamma (Hang et al. 2023), or None when gamma is 0.

    Plain MSE on epsilon is dominated by the low-noise steps, which only touch fine detail; a
    subject's shape is decided at high noise, so without the weighting it is learned slowly.
    """
    if not gamma:
        return None
    alphas = noise_sched.alphas_cumprod.float()
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    if noise_sched.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def training_noise_scheduler(pipe: Any) -> Any:
    """The forward process adapters (and AutoLoRA's gates) train on: DDPM over the base's training schedule.

    Not ``pipe.scheduler``: a sampler such as DPM-Solver (micro's) adds noise by its own step table and
    gives wrong noise levels for arbitrary training timesteps.
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


# Pixels per VAE batch while caching: 32 micro images of 64 px, one image from 512 px up. The VAE's
# activations grow with the batch: encoding SD 1.5's 5 images (then their 5 mirrors) at 512 px in one
# batch added 1.7 GiB to the run's peak (7.62 GiB; one at a time: 5.95 GiB, the load's own peak; docs/realsize.md)
ENCODE_BATCH_PIXELS = 32 * 64 * 64


@torch.no_grad()
def _encode_images(vae, pixels: list[torch.Tensor], device: torch.device, batch: int | None = None) -> torch.Tensor:
    """VAE latent means (unscaled) of CHW tensors in [-1, 1]; the mean, as diffusers' scripts cache."""
    if batch is None and pixels:
        batch = max(1, min(32, ENCODE_BATCH_PIXELS // max(1, pixels[0].shape[-1] * pixels[0].shape[-2])))
    outs = []
    for i in range(0, len(pixels), batch):
        x = torch.stack(pixels[i : i + batch]).to(device, vae.dtype)
        outs.append(vae.encode(x).latent_dist.mean.float().cpu())
    return torch.cat(outs)


class TextCache:
    """Prompt embeddings, computed once per prompt while the text encoder is frozen.

    Prompts that contain a word whose embedding is being learned (the trigger, in pivotal
    tuning) are encoded afresh each time, with gradients; with a text-encoder adapter every
    prompt is.
    """

    def __init__(self, pipe: Any, train_text: bool, live_word: str | None = None, decor: Any = None) -> None:
        self.pipe = pipe
        self.train_text = train_text
        self.live_word = live_word
        self.decor = decor  # a studio.text.decor.DecorConfig: the prompts' embeddings are projected (DECOR)
        self.cache: dict[str, torch.Tensor] = {}
        self.complete = False  # every prompt the run can draw is cached (prefill)

    def prefill(self, prompts: list[str]) -> None:
        """Embed ``prompts`` now, one at a time; afterwards a prompt outside them is an error (the text
        encoder may be gone: staged loading frees it once every prompt the loop can draw is here)."""
        for p in prompts:
            self.embed_pooled([p])
        self.complete = True

    def _live(self, prompt: str) -> bool:
        return self.train_text or (self.live_word is not None and self.live_word in prompt.split())

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        pooled = None
        if getattr(self.pipe, "text_encoder_2", None) is not None:
            # SDXL: both encoders' penultimate hidden states side by side and the second one's pooled
            # projection, exactly as the pipeline computes them at generation (the class's method, so a
            # DECOR hook on the instance is bypassed: DECOR is applied below)
            emb, _, pooled, _ = type(self.pipe).encode_prompt(
                self.pipe, prompt=prompts, device=self.pipe.text_encoder_2.device, num_images_per_prompt=1,
                do_classifier_free_guidance=False)
        else:
            tok = self.pipe.tokenizer
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.pipe.text_encoder.device)
            emb = self.pipe.text_encoder(ids)[0]
        if self.decor is not None:
            from studio.text.pipeline import project_embeddings

            emb, pooled = project_embeddings(self.pipe, self.decor, prompts, emb, pooled)
        return emb, pooled

    def embed(self, prompts: list[str]) -> torch.Tensor:
        """The prompts' embeddings, ``(B, tokens, width)``."""
        return self.embed_pooled(prompts)[0]

    def embed_pooled(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompts' embeddings and SDXL's pooled ones ``(B, width)`` (None for other families)."""
        if self.train_text:
            return self._encode(prompts)
        live = sorted({p for p in prompts if self._live(p)})
        missing = sorted({p for p in prompts if p not in self.cache and p not in live})
        if missing and self.complete:
            raise StudioError(f"prompt(s) {missing[:3]} were not among the prompts cached before training "
                              f"(a loop defect: the run cannot encode them any more)")
        if missing:
            with torch.no_grad():
                emb, pooled = self._encode(missing)
                for i, p in enumerate(missing):
                    self.cache[p] = (emb[i].cpu(), None if pooled is None else pooled[i].cpu())
        fresh = {}
        if live:
            emb, pooled = self._encode(live)
            fresh = {p: (emb[i].cpu(), None if pooled is None else pooled[i].cpu()) for i, p in enumerate(live)}
        pairs = [fresh[p] if p in fresh else self.cache[p] for p in prompts]
        pooled_rows = [q for _, q in pairs]
        return (torch.stack([e for e, _ in pairs]),
                None if pooled_rows[0] is None else torch.stack(pooled_rows))


def prior_images(pipe: Any, prompts: list[str], seed: int, emit: EventHandler, *, steps: int,
                 guidance: float, size: int | None = None,
                 before_generating: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """Class images for prior preservation: generated by the base model once, cached on disk.

    ``size``: their side in pixels, the training resolution (their latents join the instance
    latents in one batch); None or the model's native size: the pipeline's default.
    ``before_generating``: called once before any image is generated (a staged pipeline loads its
    denoiser there; with the images on disk it is never called).
    """
    import hashlib

    import numpy as np
    from PIL import Image

    from studio.generation import model_hash, native_size
    from studio.home import studio_home

    n = len(prompts)
    if size == native_size(pipe)[0]:
        size = None  # the pipeline's default: caches made before sizes were asked for stay valid
    key = f"{model_hash(pipe)}|{pipe.studio_source.spec}|{prompts}|{seed}|{steps}|{guidance}"
    key = hashlib.sha256((key + (f"|{size}px" if size else "")).encode())
    key = key.hexdigest()[:16]
    folder = studio_home() / "cache" / "class-images" / key
    have = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if len(have) < n:
        if before_generating is not None:
            before_generating()
        folder.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(seed + 7919)
        todo = n - len(have)
        done = 0
        while done < todo:
            b = min(16, todo - done)
            start = len(have) + done
            imgs = pipe(prompts[start : start + b], num_inference_steps=steps, guidance_scale=guidance, generator=g,
                        height=size, width=size, output_type="pil").images
            for im in imgs:
                path = folder / f"{len(have) + done:05d}.png"
                # per-process name: jobs of a batch on a cluster fill one shared cache at once
                tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
                im.save(tmp, format="PNG")
                os.replace(tmp, path)
                done += 1
            emit(Event("prepare", message=f"class images {len(have) + done}/{n}"))
        have = sorted(folder.glob("*.png"))
    out = []
    for p in have[:n]:
        arr = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return out


def _samples(pipe: Any, cfg: TrainConfig, plan: Any, out: Path, step: int, emit: EventHandler) -> list[str]:
    """Sample images of the adapter so far, written to OUT/samples."""
    folder = out / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        imgs = pipe(plan.sample_prompts, num_inference_steps=plan.sample_steps, guidance_scale=plan.guidance,
                    generator=g, output_type="pil").images
    for i, im in enumerate(imgs):
        path = folder / f"step{step:06d}-{i}.png"
        im.save(path)
        paths.append(str(path))
    emit(Event("sample", step=step, total=plan.steps, samples=paths))
    return paths


def _rng_state(gen: torch.Generator) -> dict:
    return {"gen": gen.get_state(), "torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _save_checkpoint(folder: Path, pipe: Any, optimizer, lr_sched, gen: torch.Generator, step: int, rank: int,
                     accelerator, ema: WeightAverage | None = None) -> None:
    """Adapter weights, optimizer, LR schedule, RNG states (and the weight average) of every process; atomic."""
    from studio.adapters import adapter_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "rng": _rng_state(gen), "optimizer": optimizer.state_dict(),
             "lr_sched": lr_sched.state_dict()}
    if ema is not None:
        state["ema"] = ema.state_dict()
    if rank == 0:
        state["adapter"] = adapter_state_dict(pipe, "default")
        trig = pipe._studio_adapters["default"].get("trigger")
        state["trigger"] = {k: v.detach().clone() for k, v in trig.vectors.items()} if trig is not None else {}
    path = folder / f"state-rank{rank}.pt"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    accelerator.wait_for_everyone()
    if rank == 0:
        (folder / "step.json.tmp").write_text(json.dumps({"step": step, "world": accelerator.num_processes}))
        os.replace(folder / "step.json.tmp", folder / "step.json")


def _load_checkpoint(folder: Path, pipe: Any, optimizer, lr_sched, gen: torch.Generator, rank: int,
                     ema: WeightAverage | None = None) -> int:
    from peft.utils import set_peft_model_state_dict

    from studio.adapters.core import adapted_models

    if not (folder / "step.json").is_file():
        log.info("no checkpoint in %s: starting from step 0", folder)
        return 0
    info = json.loads((folder / "step.json").read_text())
    mine = torch.load(folder / f"state-rank{rank}.pt", map_location="cpu", weights_only=False)
    main = mine if rank == 0 else torch.load(folder / "state-rank0.pt", map_location="cpu", weights_only=False)
    if mine["step"] != info["step"] or main["step"] != info["step"]:
        raise StudioError(f"{folder}: checkpoint files disagree on the step; delete the folder to start over")
    models = adapted_models(pipe)
    for comp, sd in main["adapter"].items():
        set_peft_model_state_dict(getattr(models[comp], "module", models[comp]), sd, adapter_name="default")
    trig = pipe._studio_adapters["default"].get("trigger")
    if trig is not None:
        with torch.no_grad():
            for comp, rows in main.get("trigger", {}).items():
                trig.vectors[comp].copy_(rows)
    if ema is not None:
        if "ema" not in mine:
            raise StudioError(f"{folder}: this run was started without a weight average (--ema; on by default for "
                              f"micro subjects since session 14), so its checkpoints hold none; resume it with --ema 0, "
                              f"or delete the checkpoints to start over")
        if mine["ema"]["decay"] != ema.decay:
            log.warning("--ema %g: the checkpoint's average was kept with decay %g; it goes on with %g",
                        ema.decay, mine["ema"]["decay"], ema.decay)
        ema.load_state_dict(mine["ema"], str(folder))
    elif "ema" in mine:
        log.warning("%s: the run was started with --ema %g; resumed without it, the last step's weights are saved",
                    folder, mine["ema"]["decay"])
    optimizer.load_state_dict(mine["optimizer"])
    lr_sched.load_state_dict(mine["lr_sched"])
    gen.set_state(mine["rng"]["gen"])
    torch.set_rng_state(mine["rng"]["torch"])
    random.setstate(mine["rng"]["python"])
    if mine["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(mine["rng"]["cuda"])
    return int(info["step"])
