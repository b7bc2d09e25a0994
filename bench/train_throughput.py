"""Training throughput: the studio's trainer vs a plain diffusers-example DreamBooth-LoRA loop.

    python bench/train_throughput.py [--base micro] [--images assets/samples/subject-heart-red]
                                     [--steps 60] [--batch 4] [--rank 8] [--rounds 3]

Both run in this one process on the same model, images and settings (LoRA rank/targets, batch,
prior preservation off so both do the same work per step), in ``--rounds`` alternating rounds of
``steps / rounds`` steps each (plain, studio, plain, studio, ...): on a shared machine the load
drifts, and alternating puts both sides under the same drift. The
plain loop is what diffusers' train_dreambooth_lora.py does each step: VAE-encode the pixel
batch and run the text encoder every step; the studio caches latents and prompt embeddings
once. Its images come the way the example's ``DreamBoothDataset.__getitem__`` gives them: each
file opened, EXIF-rotated, converted to RGB, resized (shorter side, bilinear), centre-cropped and
normalized at every step (PIL and numpy here, torchvision there); ``--plain-data cached`` gives
the plain loop the studio's decoded, resized pictures instead (this bench's definition until
session 13). Prints images/s of each, the ratio, and each phase's peak resident memory above the
process's baseline (sampled every 5 ms).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from studio.machine import describe


class PeakRSS:
    """Peak resident set size of this process while the block runs (bytes above the start)."""

    def __enter__(self) -> "PeakRSS":
        self.start = self._rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def example_pixels(path: Path, size: int, flip: bool) -> torch.Tensor:
    """One image as the diffusers example's dataset makes it at every step: CHW float32 in [-1, 1].

    ``Image.open`` + ``exif_transpose`` + RGB, then ``Resize(size, BILINEAR)`` (shorter side),
    ``CenterCrop(size)``, ``ToTensor()`` and ``Normalize([0.5], [0.5])``.
    """
    import numpy as np
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(Image.open(path))
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    if flip:
        arr = arr[:, ::-1]
    return (torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))) - 0.5) / 0.5


def plain_loop(base: str, images: str, steps: int, batch: int, rank: int, seed: int,
               data_path: str = "disk") -> float:
    """The diffusers-example loop, no caching: returns the seconds of the step loop."""
    from peft import LoraConfig

    from studio.loading import load_pipeline
    from studio.trainers.data import load_image_folder

    pipe = load_pipeline(base, dtype="fp32", device="cpu")
    res = pipe.unet.config.sample_size * pipe.vae_scale_factor
    data = load_image_folder(images, resolution=res, multiple=pipe.vae_scale_factor)
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for m in (unet, vae, te):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(seed)
    prompt = "a sks shape"
    unet.train()
    t0 = time.perf_counter()
    for i in range(steps + 1):  # timed from the end of step 1, as the studio's side (first-call costs out)
        if i == 1:
            t0 = time.perf_counter()
        idx = torch.randint(0, len(data), (batch,), generator=g)
        flips = torch.rand(batch, generator=g) < 0.5
        if data_path == "disk":
            pixels = torch.stack([example_pixels(data.items[i].path, res, bool(f))
                                  for i, f in zip(idx.tolist(), flips.tolist())])
        else:
            pixels = torch.stack([data.pixel_tensor(i, bool(f)) for i, f in zip(idx.tolist(), flips.tolist())])
        with torch.no_grad():
            lat = vae.encode(pixels).latent_dist.sample(generator=g) * vae.config.scaling_factor
            ids = tok([prompt] * batch, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            emb = te(ids)[0]
        noise = torch.randn(lat.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=g)
        pred = unet(noise_sched.add_noise(lat, noise, t), t, emb).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def studio_loop(base: str, images: str, steps: int, batch: int, rank: int, seed: int) -> float:
    """The studio's trainer with the same settings: returns the seconds of its step loop."""
    from studio.trainers.config import TrainConfig
    from studio.trainers.loop import train

    marks: dict[str, float] = {}

    def on_event(ev) -> None:
        if ev.phase == "train" and ev.step == 1:
            marks["first"] = time.perf_counter()
        if ev.phase == "train" and ev.step == ev.total:
            marks["last"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig.from_dict(dict(kind="subject", images=images, base=base, out=str(Path(tmp) / "a"),
                                         steps=steps + 1, batch=batch, rank=rank, prior=False, seed=seed,
                                         targets="attention", train_trigger=False, snr_gamma=0.0, ema=0.0,  # the plain loop's work
                                         checkpoint_every=0, register=False, sample_prompts=["a sks shape"]))
        train(cfg, on_event=on_event)
    # from the end of step 1 to the end of the last: `steps` steps, set-up excluded as in the plain loop
    return marks["last"] - marks["first"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="micro")
    ap.add_argument("--images", default=str(Path(__file__).resolve().parents[1] / "assets/samples/subject-heart-red"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plain-data", choices=["disk", "cached"], default="disk",
                    help="the plain loop's images: read and transformed every step as the diffusers example does "
                         "(disk), or the studio's decoded pictures (cached)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternate plain and studio this many times, steps / rounds steps each")
    args = ap.parse_args()
    print(describe())
    rounds = max(1, min(args.rounds, args.steps))
    per = [args.steps // rounds + (1 if r < args.steps % rounds else 0) for r in range(rounds)]
    t_plain = t_studio = 0.0
    mem_plain = mem_studio = None
    for r, k in enumerate(per):  # peak memory from each side's first round (later ones reuse the allocator)
        with PeakRSS() as mem:
            tp = plain_loop(args.base, args.images, k, args.batch, args.rank, args.seed + r, args.plain_data)
        mem_plain = mem_plain or mem
        with PeakRSS() as mem:
            ts = studio_loop(args.base, args.images, k, args.batch, args.rank, args.seed + r)
        mem_studio = mem_studio or mem
        t_plain, t_studio = t_plain + tp, t_studio + ts
        print(f"  round {r + 1}/{rounds}: {k} steps each, plain {k * args.batch / tp:.1f} / studio "
              f"{k * args.batch / ts:.1f} images/s ({tp / ts:.2f}x), running ratio {t_plain / t_studio:.2f}", flush=True)
    n = args.steps * args.batch
    print(f"{args.base}, {args.steps} steps x batch {args.batch} in {rounds} alternating rounds, "
          f"LoRA rank {args.rank} on attention, no prior, {torch.get_num_threads()} threads, "
          f"plain loop's images: {args.plain_data}")
    print(f"  plain diffusers loop  {n / t_plain:8.1f} images/s   peak +{mem_plain.delta_mb:.0f} MB")
    print(f"  studio trainer        {n / t_studio:8.1f} images/s   peak +{mem_studio.delta_mb:.0f} MB")
    print(f"  ratio studio/plain = {t_plain / t_studio:.2f}")


if __name__ == "__main__":
    main()
