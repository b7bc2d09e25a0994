"""Pre-training recipe of the micro world: judge, then VAE, then text encoder + UNet jointly.

``studio micro pretrain --out DIR`` writes ``DIR/micro`` (a diffusers StableDiffusion folder,
fp16 safetensors) and ``DIR/judge``. Every phase is seeded; the long UNet phase checkpoints
its full state (weights, EMA, optimizer, LR schedule, RNG) to the work folder every few
hundred steps and resumes exactly from it, so a killed run loses at most one interval.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from studio.micro import configs
from studio.micro.judge import Judge, classify, load_judge, save_judge
from studio.micro.tokenizer import write_tokenizer
from studio.micro.world import (
    ATTRIBUTES, SHAPES, TEXTURES, Scene, caption, prompt_for, render_batch, scenes,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PretrainConfig:
    """Budgets and seeds of the recipe. The defaults are the committed micro model's."""

    out: Path = Path("assets")
    work: Path | None = None  # checkpoints and render caches; default OUT/.pretrain-work
    seed: int = 0
    tiny: bool = False  # the smoke test's architecture
    threads: int = 0  # torch threads; 0 = leave torch's default
    judge_images: int = 24000
    judge_steps: int = 1500
    judge_batch: int = 64
    vae_steps: int = 1600
    decoder_steps: int = 2000
    vae_batch: int = 16
    train_images: int = 40000
    unet_steps: int = 8000
    unet_batch: int = 32
    unet_lr: float = 5e-4
    caption_dropout: float = 0.1
    checkpoint_every: int = 250
    eval_every: int = 2000

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.work = Path(self.work) if self.work else self.out / ".pretrain-work"
        for f in ("judge_steps", "vae_steps", "decoder_steps", "unet_steps", "judge_images", "train_images"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{f} must be positive, got {getattr(self, f)}")


def _arch(cfg: PretrainConfig) -> dict:
    return configs.TINY if cfg.tiny else configs.MICRO


def _render_pool(path: Path, seed: int, n: int, heldout: bool) -> tuple[np.ndarray, list[Scene]]:
    """Render (or load from cache) ``n`` scenes; ``heldout`` includes the held-out concepts."""
    pools = {"shapes": SHAPES, "textures": TEXTURES} if heldout else {"shapes": SHAPES[:6], "textures": TEXTURES[:3]}
    scene_list = list(scenes(seed, n, **pools))
    if path.is_file():
        data = np.load(path)
        if len(data["images"]) == n:
            return data["images"], scene_list
    log.info("rendering %d images (%s) ...", n, "all concepts" if heldout else "seen concepts")
    images = render_batch(scene_list)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path.with_suffix(".tmp.npz"), images=images)
    os.replace(path.with_suffix(".tmp.npz"), path)
    return images, scene_list


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Judge augmentation: blur, noise and small colour shifts, so it reads generated images."""
    n = x.shape[0]
    k = torch.tensor([0.25, 0.5, 0.25])
    blur = F.conv2d(F.pad(x.reshape(-1, 1, *x.shape[2:]), (1, 1, 1, 1), mode="replicate"),
                    (k[:, None] * k[None, :])[None, None]).reshape(x.shape)
    amount = torch.rand(n, 1, 1, 1, generator=g)
    x = x + (blur - x) * amount * (torch.rand(n, 1, 1, 1, generator=g) < 0.5)
    x = x + torch.randn(x.shape, generator=g) * 0.04 * torch.rand(n, 1, 1, 1, generator=g)
    x = x * (1 + 0.08 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5)) + 0.04 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    return x.clamp(0, 1)


def train_judge(cfg: PretrainConfig, vae=None) -> dict:
    """The judge on renders of every concept; returns its accuracy on fresh renders.

    With ``vae``, half of the batches are passed through the autoencoder first, so the judge
    reads generated images (which always come out of that decoder) as well as crisp renders;
    the labels stay the rendered scene's.
    """
    out = cfg.out / "judge"
    images, scene_list = _render_pool(cfg.work / "judge_pool_all.npz", cfg.seed + 1, cfg.judge_images, True)
    labels = {a: torch.tensor([s.labels()[a] for s in scene_list]) for a in ATTRIBUTES}
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=cfg.judge_steps, pct_start=0.1)
    judge.train()
    t0 = time.time()
    for step in range(cfg.judge_steps):
        idx = torch.randint(0, len(x_all), (cfg.judge_batch,), generator=g)
        x = x_all[idx].float() / 255.0
        if vae is not None and step % 2 == 1:
            with torch.no_grad():
                x = ((vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample.clamp(-1, 1) + 1) / 2)
        x = _augment(x, g)
        logits = judge(x)
        loss = sum(F.cross_entropy(logits[a], labels[a][idx]) for a in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == cfg.judge_steps - 1:
            log.info("judge step %d/%d loss %.4f (%.0fs)", step + 1, cfg.judge_steps, loss.item(), time.time() - t0)
    judge.eval()
    save_judge(judge, out)
    return {"judge_seconds": time.time() - t0}


def judge_accuracy(judge: Judge | None = None, *, seed: int = 12345, n: int = 2000) -> dict[str, float]:
    """Accuracy of each head on ``n`` fresh renders of every concept (a seed not trained on)."""
    scene_list = list(scenes(seed, n, shapes=SHAPES, textures=TEXTURES))
    pred = classify(render_batch(scene_list), judge)
    return {a: float(np.mean(pred[a] == np.array([s.labels()[a] for s in scene_list]))) for a in ATTRIBUTES}


def _build_models(cfg: PretrainConfig, vocab_size: int, tok) -> tuple:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    arch = _arch(cfg)
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(**arch["vae"])
    unet = UNet2DConditionModel(**arch["unet"])
    te_cfg = CLIPTextConfig(vocab_size=vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, **arch["text_encoder"])
    text_encoder = CLIPTextModel(te_cfg)
    return vae, unet, text_encoder


def train_vae(cfg: PretrainConfig, vae, images: np.ndarray) -> dict:
    """Phase 2: the autoencoder (L1 + L2 reconstruction, a light KL), on seen concepts only."""
    g = torch.Generator().manual_seed(cfg.seed + 2)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=cfg.vae_steps, pct_start=0.05)
    vae.train()
    t0 = time.time()
    for step in range(cfg.vae_steps):
        idx = torch.randint(0, len(x_all), (cfg.vae_batch,), generator=g)
        x = x_all[idx].float() / 127.5 - 1.0
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample(generator=g)).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log.info("vae step %d/%d loss %.4f (%.0fs)", step + 1, cfg.vae_steps, loss.item(), time.time() - t0)
    vae.eval()
    return {"vae_seconds": time.time() - t0}


def finetune_decoder(cfg: PretrainConfig, vae, images: np.ndarray) -> dict:
    """Sharpen the decoder with the encoder frozen: the latent space (and so the UNet) stays valid.

    The loss adds an L1 term on image gradients, which keeps stripes and dots crisp where a
    plain pixel loss settles for blur (the trick of SD's fine-tuned VAE decoders, simplified).
    """
    g = torch.Generator().manual_seed(cfg.seed + 7)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2)
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-4, total_steps=cfg.decoder_steps, pct_start=0.05)
    vae.decoder.train()
    t0 = time.time()
    for step in range(cfg.decoder_steps):
        idx = torch.randint(0, len(x_all), (cfg.vae_batch,), generator=g)
        x = x_all[idx].float() / 127.5 - 1.0
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=g)
        rec = vae.decode(z).sample
        grad = (F.l1_loss(rec[..., 1:, :] - rec[..., :-1, :], x[..., 1:, :] - x[..., :-1, :])
                + F.l1_loss(rec[..., 1:] - rec[..., :-1], x[..., 1:] - x[..., :-1]))
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + grad
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.decoder_steps - 1:
            log.info("decoder step %d/%d loss %.4f (%.0fs)", step + 1, cfg.decoder_steps, loss.item(), time.time() - t0)
    vae.eval()
    vae.requires_grad_(False)
    return {"decoder_seconds": time.time() - t0}


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent means and stds (unscaled) of uint8 images."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        d = vae.encode(x).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_report(vae, seed: int, judge: Judge, n: int = 500) -> dict:
    """Judge accuracy on VAE reconstructions, seen and held-out concepts separately."""
    res = {}
    for name, pools in (("seen", dict(shapes=SHAPES[:6], textures=TEXTURES[:3])),
                        ("heldout", dict(shapes=SHAPES[6:], textures=TEXTURES[3:]))):
        scene_list = list(scenes(seed, n, **pools))
        imgs = render_batch(scene_list)
        m, _ = encode_latents(vae, imgs)
        rec = ((vae.decode(m).sample.clamp(-1, 1) + 1) * 0.5)
        pred = classify(rec, judge)
        res[name] = {a: float(np.mean(pred[a] == np.array([s.labels()[a] for s in scene_list]))) for a in ATTRIBUTES}
    return res


class _Ema:
    """Exponential moving average of parameters, with a warm-up of its decay."""

    def __init__(self, params: list[torch.Tensor], decay: float = 0.999) -> None:
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params]
        self.updates = 0

    @torch.no_grad()
    def update(self, params: list[torch.Tensor]) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, params):
            s.lerp_(p.detach(), 1 - d)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = [t.clone() for t in state["shadow"]]
        self.updates = state["updates"]


def _pipeline(vae, text_encoder, tok, unet):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    sched = DPMSolverMultistepScheduler(**{k: v for k, v in configs.SCHEDULER.items()
                                           if k != "clip_sample"})
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def quick_eval(pipe, judge: Judge, n: int = 64, seed: int = 777, steps: int = 20,
               guidance: float = configs.SAMPLING["guidance"]) -> dict[str, float]:
    """Judge accuracy of generated images on fully specified prompts of seen concepts."""
    scene_list = list(scenes(seed, n, shapes=SHAPES[:6], textures=TEXTURES[:3]))
    prompts = [prompt_for(s.shape, s.color, s.texture, s.background) for s in scene_list]
    g = torch.Generator().manual_seed(seed)
    imgs = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="np").images
    pred = classify(torch.from_numpy(imgs).permute(0, 3, 1, 2).float(), judge)
    ok = {a: pred[a] == np.array([s.labels()[a] for s in scene_list]) for a in ATTRIBUTES}
    res = {a: float(v.mean()) for a, v in ok.items()}
    res["joint"] = float(np.mean(np.all(np.stack(list(ok.values())), axis=0)))
    return res


def train_unet(cfg: PretrainConfig, vae, unet, text_encoder, tok, judge: Judge | None, scene_list: list[Scene],
               means: torch.Tensor, stds: torch.Tensor, scaling: float) -> dict:
    """Phase 3: text encoder + UNet jointly on cached latents, epsilon loss with min-SNR weights."""
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(**configs.SCHEDULER)
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    snr_w = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 for epsilon prediction

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    warm = min(200, cfg.unet_steps // 10 + 1)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        p = (step - warm) / max(1, cfg.unet_steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema = _Ema(params)
    g = torch.Generator().manual_seed(cfg.seed + 3)
    rng = random.Random(cfg.seed + 4)
    step = 0
    ckpt = cfg.work / "unet_state.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        ema.load_state_dict(state["ema"])
        g.set_state(state["g"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        log.info("resumed UNet phase at step %d", step)

    token_cache: dict[str, torch.Tensor] = {}

    def tokens(text: str) -> torch.Tensor:
        if text not in token_cache:
            token_cache[text] = tok(text, padding="max_length", max_length=tok.model_max_length,
                                    truncation=True, return_tensors="pt").input_ids[0]
        return token_cache[text]

    history: list[dict] = []
    t0 = time.time()
    unet.train()
    text_encoder.train()
    while step < cfg.unet_steps:
        idx = torch.randint(0, len(means), (cfg.unet_batch,), generator=g)
        lat = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)) * scaling
        caps = [caption(scene_list[i], rng) if rng.random() >= cfg.caption_dropout else "" for i in idx.tolist()]
        ids = torch.stack([tokens(c) for c in caps])
        noise = torch.randn(lat.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.unet_batch,), generator=g)
        noisy = noise_sched.add_noise(lat, noise, t)
        cond = text_encoder(ids)[0]
        pred = unet(noisy, t, cond).sample
        loss = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (loss * snr_w[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update(params)
        step += 1
        if step % 50 == 0 or step == 1:
            el = time.time() - t0
            log.info("unet step %d/%d loss %.4f lr %.2e (%.2fs/step)", step, cfg.unet_steps, loss.item(),
                     sched.get_last_lr()[0], el / max(1, step - (history[0]["step"] if history else 0)))
        if step % 50 == 0:
            history.append({"step": step, "loss": float(loss.item())})
        if step % cfg.checkpoint_every == 0 or step == cfg.unet_steps:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "ema": ema.state_dict(), "g": g.get_state(),
                        "rng": rng.getstate(), "torch_rng": torch.get_rng_state(), "step": step}, tmp)
            os.replace(tmp, ckpt)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.unet_steps and judge is not None:
            res = _eval_with_ema(vae, unet, text_encoder, tok, judge, ema, params)
            log.info("eval at step %d (EMA weights): %s", step, res)
            unet.train()
            text_encoder.train()
    # the committed model carries the EMA weights
    with torch.no_grad():
        for p, s in zip(params, ema.shadow):
            p.copy_(s)
    unet.eval()
    text_encoder.eval()
    return {"unet_seconds": time.time() - t0, "unet_final_loss": history[-1]["loss"] if history else None}


def _eval_with_ema(vae, unet, text_encoder, tok, judge: Judge, ema: _Ema, params: list[torch.Tensor]) -> dict:
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, ema.shadow):
            p.copy_(s)
    unet.eval()
    text_encoder.eval()
    try:
        return quick_eval(_pipeline(vae, text_encoder, tok, unet), judge)
    finally:
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)


def save_micro(folder: Path, vae, text_encoder, tok, unet, report: dict) -> None:
    """Write the model as a diffusers folder with fp16 weights, atomically (temp + rename)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = _pipeline(vae, text_encoder, tok, unet)
    # UNet and VAE in fp16 keep the folder small; the text encoder (about a megabyte) stays fp32
    # because transformers loads weights in their stored dtype, and a half text encoder would
    # break a plain `StableDiffusionPipeline.from_pretrained(folder)` on the CPU
    unet.to(torch.float16)
    vae.to(torch.float16)
    pipe.save_pretrained(tmp, safe_serialization=True)
    unet.to(torch.float32)
    vae.to(torch.float32)
    # keep CLIP's classic vocab.json + merges.txt beside tokenizer.json: other tools read those
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(Path(tok.name_or_path) / name, tmp / "tokenizer" / name)
    (tmp / "studio_micro.json").write_text(json.dumps(report, indent=1, default=str))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def pretrain(cfg: PretrainConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Run every phase that has not finished yet; return the run report."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.work.mkdir(parents=True, exist_ok=True)
    report_path = cfg.work / "report.json"
    report: dict = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report["config"] = {k: str(v) for k, v in dataclasses.asdict(cfg).items()}
    report.setdefault("torch", torch.__version__)
    started = time.time()

    def save_report() -> None:
        report_path.write_text(json.dumps(report, indent=1, default=str))

    tok = write_tokenizer(cfg.work / "tokenizer", configs.vocabulary())
    vae, unet, text_encoder = _build_models(cfg, len(tok), tok)
    images, scene_list = _render_pool(cfg.work / "train_pool.npz", cfg.seed + 5, cfg.train_images, False)

    # phase 1: the autoencoder, then its decoder alone (the encoder, so the latent space, is final)
    def phase(path: Path, run: Callable[[], dict]) -> None:
        """Load the VAE's state from an earlier run of this phase, or run it and keep the result."""
        if path.is_file():
            vae.load_state_dict(torch.load(path, map_location="cpu"))
            return
        report.update(run())
        torch.save(vae.state_dict(), path)
        save_report()

    phase(cfg.work / "vae.pt", lambda: train_vae(cfg, vae, images))
    dec_path = cfg.work / "vae_decoder_ft.pt"
    phase(dec_path, lambda: finetune_decoder(cfg, vae, images))
    vae.eval()
    vae.requires_grad_(False)

    # phase 2: text encoder + UNet on cached latents
    lat_path = cfg.work / "latents.pt"
    if lat_path.is_file():
        means, stds = torch.load(lat_path)
    else:
        means, stds = encode_latents(vae, images)
        torch.save((means, stds), lat_path)
    scaling = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling)
    report["vae_scaling_factor"] = scaling
    # a judge from an earlier run reads the seen concepts well enough to watch progress
    watch = load_judge(cfg.out / "judge") if (cfg.out / "judge" / "judge.safetensors").is_file() else None
    report.update(train_unet(cfg, vae, unet, text_encoder, tok, watch, scene_list, means, stds, scaling))
    save_report()

    # phase 3: the judge, on renders of every concept and on their reconstructions by this VAE
    if not (cfg.out / "judge" / "judge.safetensors").is_file() or report.get("judge_vae") != str(dec_path):
        report.update(train_judge(cfg, vae))
        report["judge_vae"] = str(dec_path)
        save_report()
    judge = load_judge(cfg.out / "judge", reload=True)
    report["judge_accuracy"] = judge_accuracy(judge, seed=cfg.seed + 1000, n=500 if cfg.tiny else 2000)
    report["vae_reconstruction_judge"] = vae_report(vae, cfg.seed + 6, judge, n=100 if cfg.tiny else 500)
    log.info("judge accuracy %s; VAE reconstructions read by the judge: %s", report["judge_accuracy"],
             report["vae_reconstruction_judge"])
    report["quick_eval"] = quick_eval(_pipeline(vae, text_encoder, tok, unet), judge, n=32 if cfg.tiny else 128)
    log.info("final quick eval: %s", report["quick_eval"])
    report["session_seconds"] = time.time() - started
    save_micro(cfg.out / "micro", vae, text_encoder, tok, unet, report)
    save_report()
    return report
