"""Does torch.compile pay for a micro training step? Eager against compiled variants, side by side.

    python bench/train_compile.py [--variants whole,blocks,channels_last] [--rounds 6] [--steps 10]

The step is the studio trainer's (fast LoRA layers, rank 8 on attention, fused AdamW, batch 4,
clipping) on the micro UNet with fixed inputs. Each variant gets its own copy of the UNet; its
set-up time (the compilation: first two steps) is printed, then eager and the variant alternate in
``--rounds`` rounds of ``--steps`` steps and the median step times and their ratio are printed. A
compile that costs more than it saves over a training run does not pay: the script prints the
break-even step count too. Compilations start from an empty Inductor cache (a fresh temporary
``TORCHINDUCTOR_CACHE_DIR``), as a user's first run does.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")  # before torch reads it

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from studio.machine import describe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="whole,blocks,channels_last")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    print(describe())
    from diffusers.models.attention import BasicTransformerBlock

    from studio import adapters
    from studio.adapters import fast as fast_lora
    from studio.loading import load_pipeline

    pipe = load_pipeline("micro", dtype="fp32", device="cpu")
    for c in pipe.components.values():
        if isinstance(c, torch.nn.Module):
            c.requires_grad_(False)
    adapters.add_adapter(pipe, "lora", adapters.AdapterSettings(rank=8, targets="attention"), "default")
    fast_lora.speed_up(pipe.unet)
    unet = pipe.unet.train()
    b, c, s = args.batch, unet.config.in_channels, unet.config.sample_size
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(b, c, s, s, generator=g)
    emb = torch.randn(b, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)

    def stepper(model: torch.nn.Module, x: torch.Tensor):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

        def step() -> None:
            loss = F.mse_loss(model(x, t, emb).sample, lat)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    eager = stepper(unet, lat)
    for name in args.variants.split(","):
        model, x = copy.deepcopy(unet), lat
        if name == "whole":
            model = torch.compile(model)
        elif name == "blocks":  # regional: the transformer blocks, compiled once per shape and reused
            for m in model.modules():
                if isinstance(m, BasicTransformerBlock):
                    m.compile()
        elif name == "channels_last":
            model, x = model.to(memory_format=torch.channels_last), lat.contiguous(memory_format=torch.channels_last)
        else:
            raise SystemExit(f"unknown variant {name}")
        step = stepper(model, x)
        eager()
        t0 = time.perf_counter()
        step(), step()
        setup = time.perf_counter() - t0
        times: dict[str, list[float]] = {"eager": [], name: []}
        for _ in range(args.rounds):
            for label, fn in (("eager", eager), (name, step)):
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                times[label].append((time.perf_counter() - t0) / args.steps)
        e, v = statistics.median(times["eager"]), statistics.median(times[name])
        saved = e - v
        even = f"{(setup - 2 * v) / saved:.0f} steps" if saved > 0 else "never"
        print(f"{name:14s} first two steps {setup:6.1f} s | step {v * 1e3:6.1f} ms vs eager {e * 1e3:6.1f} ms: "
              f"{v / e:.3f}x | pays back after {even}", flush=True)


if __name__ == "__main__":
    main()
