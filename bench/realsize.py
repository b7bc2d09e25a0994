"""Real-size training cost: the studio trainer vs a plain diffusers-example loop (issue 15).

    python bench/realsize.py [--model sd15] [--resolution 512] [--steps 3] [--repeats 1] [--micro]

Builds (or reuses) the seeded full-size model of ``studio realsize make MODEL`` and trains a
rank-4 LoRA (attention targets, batch 1, no prior preservation, no samples) for ``--steps``
steps twice, each in its own process so that each peak resident memory is its own:

- **studio**: ``studio.trainers.loop.train`` on the diffusers folder, with its real-size CPU defaults:
  staged loading (text encoder and VAE for the caches of latents and prompt embeddings, freed, then
  the denoiser), gradient checkpointing on the two highest resolutions, SDPA.
- **plain**: what diffusers' ``train_dreambooth_lora.py`` does each step: VAE-encode the image,
  run the text encoder, UNet forward/backward without checkpointing, AdamW on the LoRA.

s/step is the mean over steps 2..N (the first step carries one-time costs); CPU s/step the same
for the process's CPU time (all threads), which other jobs on the cores disturb less. Peak RSS is
the process's ``ru_maxrss`` (loading included); the studio child also samples its RSS in a thread
and prints the peak of each phase (loading, caching, denoiser, steps). With
``--micro`` the studio trainer also runs on the micro model for the growth table. The last line
is one JSON object: ``{"model", "memory_ratio", "time_ratio", ...}`` (studio / plain).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from studio.allocator import active, reexec_with_allocator, system_environment

log = logging.getLogger("bench.realsize")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _peak(device: str) -> int:
    """Peak memory of this process: GPU memory allocated on CUDA, resident memory on the CPU."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated()
    return _peak_rss()


class RssSampler:
    """Resident memory sampled every few milliseconds in a thread, kept as the peak of each phase.

    ``mark(label)`` closes the phase running since the last mark (its label, its peak) and opens
    ``label``; ``phases()`` lists them, consecutive equal labels merged. Where the peak comes from,
    not only how high it is (``ru_maxrss`` says only the latter).
    """

    def __init__(self, every_s: float = 0.005) -> None:
        import threading

        self._lock = threading.Lock()
        self._label, self._peak, self._done = "start", self.now(), []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            rss = self.now()
            with self._lock:
                self._peak = max(self._peak, rss)

    def mark(self, label: str) -> None:
        rss = self.now()
        with self._lock:
            peak = max(self._peak, rss)
            if self._done and self._done[-1][0] == self._label:
                self._done[-1][1] = max(self._done[-1][1], peak)
            else:
                self._done.append([self._label, peak])
            self._label, self._peak = label, rss

    def phases(self) -> list[list]:
        self.mark("end")
        self._stop.set()
        return [[label, round(peak / 2**30, 3)] for label, peak in self._done]


def _stamp(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()  # a step is over when its kernels are
    return time.perf_counter()


def child_studio(base: str, images: str, steps: int, resolution: int, device: str = "cpu",
                 precision: str = "fp32", mmap_mb: float | None = None, levels: int | None = None) -> dict:
    """The studio trainer; step times from its progress events.

    ``mmap_mb`` / ``levels`` replace the trainer's glibc mmap threshold and its number of checkpointed
    resolution levels on the CPU (``--frontier``); None keeps the trainer's own.
    """
    from studio import loading
    from studio.trainers import loop
    from studio.trainers.config import TrainConfig
    from studio.trainers.loop import train

    if mmap_mb is not None:
        os.environ.pop("STUDIO_MMAP_THRESHOLD_MB", None)  # the variant, not the caller's setting
        loading.MMAP_THRESHOLD = int(mmap_mb * 2**20)
    if levels is not None:
        loop.CPU_CHECKPOINT_LEVELS = levels

    stamps: list[float] = []
    cpu: list[float] = []  # process CPU seconds: a step's own work, less sensitive to other jobs than wall time
    sampler = RssSampler() if not device.startswith("cuda") else None

    def on_event(ev) -> None:
        if ev.phase == "train":
            stamps.append(_stamp(device))
            cpu.append(time.process_time())
        if sampler is not None:
            sampler.mark("train" if ev.phase == "train" else f"{ev.phase}: {ev.message}"[:60])

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(kind="subject", images=images, base=base, out=str(Path(tmp) / "out"), steps=steps, rank=4,
                          targets="attention", batch=1, resolution=resolution, prior=False, train_trigger=False,
                          samples=False, checkpoint_every=0, register=False, device=device,
                          mixed_precision="no" if precision == "fp32" else precision)
        t0 = time.perf_counter()
        train(cfg, on_event=on_event)
    diffs = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"peak_rss": _peak(device), "step_s": diffs, "total_s": time.perf_counter() - t0, "allocator": active(),
            "phases": sampler.phases() if sampler is not None else [],
            "step_cpu_s": [b - a for a, b in zip(cpu, cpu[1:])]}


def child_plain(base: str, images: str, steps: int, resolution: int, device: str = "cpu",
                precision: str = "fp32") -> dict:
    """diffusers' train_dreambooth_lora.py, reduced to its step: no caching, no checkpointing."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    t0 = time.perf_counter()
    tok = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", local_files_only=True)
    te = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", local_files_only=True, dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", local_files_only=True, torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", local_files_only=True,
                                                torch_dtype=torch.float32)
    sched = DDPMScheduler.from_pretrained(base, subfolder="scheduler", local_files_only=True)
    for m in (te, vae, unet):
        m.requires_grad_(False)
    # the script's --mixed_precision: frozen weights in weight_dtype (the VAE kept fp32), LoRA in fp32
    weight_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    te.to(device, weight_dtype)
    vae.to(device)
    unet.to(device, weight_dtype)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = None
    if device.startswith("cuda"):  # the script's --use_8bit_adam, where bitsandbytes is installed
        try:
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(params, lr=1e-4)
        except ImportError:
            pass
    opt = opt or torch.optim.AdamW(params, lr=1e-4)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    autocast = torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=weight_dtype,
                              enabled=precision != "fp32")
    files = sorted(p for p in Path(images).iterdir() if p.suffix == ".png")
    unet.train()
    stamps, cpu = [], []
    for step in range(steps):
        img = Image.open(files[step % len(files)]).convert("RGB").resize((resolution, resolution))
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None].to(device)
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (1,), device=device)
        noisy = sched.add_noise(latents, noise, t)
        ids = tok(["a photo of sks object"], padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids.to(device)
        emb = te(ids)[0]
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        with autocast:
            pred = unet(noisy.to(weight_dtype), t, emb).sample
        loss = F.mse_loss(pred.float(), target.float())
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad()
        stamps.append(_stamp(device))
        cpu.append(time.process_time())
    return {"peak_rss": _peak(device), "step_s": [b - a for a, b in zip(stamps, stamps[1:])], "allocator": active(),
            "total_s": time.perf_counter() - t0, "step_cpu_s": [b - a for a, b in zip(cpu, cpu[1:])]}


def run_child(kind: str, base: str, images: str, steps: int, resolution: int, device: str = "cpu",
              precision: str = "fp32", variant: tuple[float, int] | None = None) -> dict:
    """One measurement in a fresh process (its own peak memory); the child prints one JSON line."""
    cmd = [sys.executable, __file__, "--child", kind, "--base", base, "--images", images, "--steps", str(steps),
           "--resolution", str(resolution), "--device", device, "--precision", precision]
    env = dict(os.environ)
    if variant is not None:
        cmd += ["--variant", f"{variant[0]:g}:{variant[1]}"]
        if variant[2]:
            env["STUDIO_ALLOCATOR"] = variant[2]
    if kind == "plain":  # diffusers' script as users run it: glibc's malloc, whatever this shell preloads
        env = system_environment(env)
    log.info("running %s", " ".join(cmd))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _variant(text: str) -> tuple[float, int, str | None]:
    mb, levels, *alloc = text.split(":")
    return float(mb), int(levels), (alloc[0] if alloc else None)


def frontier(args: argparse.Namespace, files, images: str) -> None:
    """The studio trainer per (mmap threshold, checkpoint levels), then the plain loop; one table."""
    variants = [_variant(v) for v in args.frontier.split(",")]
    on = (args.device, args.precision)
    rows = [(f"studio {mb:g} MiB, {levels} lvl" + (f", {alloc}" if alloc else ""),
             run_child("studio", str(files.folder), images, args.steps, args.resolution, *on,
                       variant=(mb, levels, alloc)))
            for mb, levels, alloc in variants]
    plain = run_child("plain", str(files.folder), images, args.steps, args.resolution, *on)
    rows.append(("plain", plain))
    print(f"{'loop':28s} {'peak GiB':>9s} {'x plain':>8s} {'s/step':>8s} {'x plain':>8s}   "
          f"(s/step: mean of steps 2..N; steady: of steps 3..N)")
    for name, r in rows:
        steady = r["step_s"][1:] or r["step_s"]
        print(f"{name:28s} {r['peak_rss'] / 2**30:9.2f} {r['peak_rss'] / plain['peak_rss']:8.3f} "
              f"{_mean(r['step_s']):8.2f} {_mean(r['step_s']) / _mean(plain['step_s']):8.3f}   steady "
              f"{_mean(steady):.2f} s ({_mean(steady) / _mean(plain['step_s'][1:] or plain['step_s']):.3f}x)"
              f"   steps {[round(s, 1) for s in r['step_s']]}   {r.get('allocator', '?')}")


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd15", choices=["sd15", "sd21", "sdxl"])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="steps per run; s/step averages steps 2..N")
    p.add_argument("--repeats", type=int, default=1,
                   help="studio and plain children this many times, alternating; time_ratio is the median of the "
                        "pairs' ratios, memory_ratio the studio's highest peak over the plain loop's lowest")
    p.add_argument("--width-div", dest="width_div", type=int, default=1,
                   help="divide the model's widths (a quick smoke run of this script; not the real figures)")
    p.add_argument("--micro", action="store_true", help="also time the studio trainer on micro (growth table)")
    p.add_argument("--device", default="cpu", help="cpu or cuda: on cuda the peak is GPU memory allocated, and "
                   "both loops use 8-bit AdamW where bitsandbytes is installed")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="fp16/bf16: mixed precision, frozen weights stored in that dtype (CUDA)")
    p.add_argument("--frontier", metavar="MB:LEVELS[:ALLOCATOR],...",
                   help="instead of the comparison: the studio trainer once per setting of its glibc mmap threshold "
                        "(MiB), checkpointed resolution levels and optionally STUDIO_ALLOCATOR (tcmalloc, jemalloc, "
                        "system), e.g. 1:2:system,0:1:tcmalloc, and the plain loop once, in one run")
    p.add_argument("--child", choices=["studio", "plain"], help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--images", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        logging.basicConfig(level=logging.WARNING)
        if args.child == "studio":
            reexec_with_allocator()  # as the `studio` command does (studio.allocator)
            mb, levels, _ = _variant(args.variant) if args.variant else (None, None, None)
            print(json.dumps(child_studio(args.base, args.images, args.steps, args.resolution, args.device,
                                          args.precision, mmap_mb=mb, levels=levels)))
        else:
            print(json.dumps(child_plain(args.base, args.images, args.steps, args.resolution, args.device,
                                         args.precision)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():  # the GPU rows of docs/BENCHMARKS.md need a GPU machine
            print(f"skipped: --device {args.device} asks for a GPU and this torch sees none "
                  f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None})")
            return
    from studio.machine import describe
    from studio.realsize import make, upscaled_images

    files = make(args.model, width_div=args.width_div)
    images = str(upscaled_images(args.resolution))
    print(f"machine: {describe()}  torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}"
          + (f"  STUDIO_MMAP_THRESHOLD_MB={os.environ['STUDIO_MMAP_THRESHOLD_MB']}"
             if os.environ.get("STUDIO_MMAP_THRESHOLD_MB") else ""))
    print(f"model: {args.model} (seeded random weights, {sum(files.parameters.values()) / 1e6:.0f}M parameters), "
          f"{args.resolution} px, batch 1, rank 4 attention LoRA, {args.steps} steps per run")
    rows = {}
    on = (args.device, args.precision)
    if args.device.startswith("cuda"):
        import torch

        print(f"device: {torch.cuda.get_device_name()}, {args.precision}; peak = GPU memory allocated")
    if args.frontier:
        frontier(args, files, images)
        return
    pairs = []  # alternating studio / plain children: the machine's speed drifts between runs (docs/realsize.md)
    for _ in range(max(1, args.repeats)):
        pairs.append((run_child("studio", str(files.folder), images, args.steps, args.resolution, *on),
                      run_child("plain", str(files.folder), images, args.steps, args.resolution, *on)))
    rows["studio"], rows["plain"] = pairs[0]
    time_ratios = [_mean(s["step_s"]) / _mean(p["step_s"]) for s, p in pairs]
    if len(pairs) > 1:
        print("studio / plain s/step per alternating pair: " + ", ".join(f"{r:.3f}" for r in time_ratios)
              + f"; median {statistics.median(time_ratios):.3f}")
    print(f"{'loop':8s} {'peak GiB':>12s} {'s/step':>8s} {'CPU s/step':>11s}")
    for name, r in rows.items():
        print(f"{name:8s} {r['peak_rss'] / 2**30:12.2f} {_mean(r['step_s']):8.3f} {_mean(r.get('step_cpu_s', [])):11.1f}"
              f"   steps {[round(s, 1) for s in r['step_s']]}   allocator {r.get('allocator', '?')}")
    print("studio peak RSS (GiB) by phase, each phase until the next event: "
          + "; ".join(f"{label} {gib:.2f}" for label, gib in rows["studio"].get("phases", [])))
    if args.micro:
        micro = run_child("studio", "micro", str(Path(__file__).resolve().parents[1] / "assets" / "samples" /
                                                  "subject-heart-red"), max(args.steps, 5), 64, *on)
        print(f"growth (studio trainer, batch 1): micro 64 px {micro['peak_rss'] / 2**30:.2f} GiB "
              f"{_mean(micro['step_s']):.3f} s/step; {args.model} {args.resolution} px "
              f"{rows['studio']['peak_rss'] / 2**30:.2f} GiB {_mean(rows['studio']['step_s']):.1f} s/step")
    result = {"model": args.model if args.width_div == 1 else f"{args.model}/w{args.width_div}",
              "resolution": args.resolution, "device": args.device, "precision": args.precision,
              "memory_ratio": round(max(s["peak_rss"] for s, _ in pairs) / min(p["peak_rss"] for _, p in pairs), 3),
              "time_ratio": round(statistics.median(time_ratios), 3),
              "time_ratios": [round(r, 3) for r in time_ratios],
              "studio_peak_gib": round(rows["studio"]["peak_rss"] / 2**30, 2),
              "plain_peak_gib": round(rows["plain"]["peak_rss"] / 2**30, 2),
              "studio_s_per_step": round(_mean(rows["studio"]["step_s"]), 4),
              "plain_s_per_step": round(_mean(rows["plain"]["step_s"]), 4),
              # process CPU seconds per step (all threads): the work itself, where other jobs share the cores
              "cpu_time_ratio": round(_mean(rows["studio"].get("step_cpu_s", [])) /
                                      _mean(rows["plain"].get("step_cpu_s", [])), 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
