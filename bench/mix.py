"""Adapter mixing speed on micro: 4 LoRAs fused, windowed and unfused, against the base and diffusers' set_adapters.

    python bench/mix.py [--base micro] [--batches 1,8] [--steps 20] [--repeats 3] [--rank 8] [--threads N]

One run prints the CPU kind, then per batch size the seconds per image of each variant (best
of ``--repeats``, variants interleaved so that machine noise hits them alike) and the ratios
the issue sets targets for:

* 4 LoRAs fused / base (target <= 1.05)
* 4 LoRAs with windows / base (target <= 1.3)
* studio unfused / diffusers set_adapters unfused, same 4 LoRAs, no windows (target <= 0.8)
* switching the pipeline to a new set of 4 adapters (target < 0.5 s; cold: files never read)
* with ``--gated``: 3 LoRAs with AutoLoRA's gated fusion / the same 3 fused statically (target <= 1.5)

The LoRAs are random (speed does not depend on what they learned), rank ``--rank`` on the
attention layers as `studio train` makes them, written as studio adapter folders.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from studio import load_pipeline
from studio.logs import setup_logging
from studio.machine import describe

PROMPT = "a striped red circle on a white background"
WINDOWS = ["@0-0.5", "@0.25-1", "@0.5-1", "@0-0.75"]


def make_loras(base: str, folder: Path, n: int, rank: int) -> list[Path]:
    """``n`` random rank-``rank`` attention LoRAs for ``base``, saved as studio adapter folders."""
    from studio.adapters import AdapterSettings, add_adapter, save_adapter

    pipe = load_pipeline(base, device="cpu")
    out = []
    for i in range(n):
        params = add_adapter(pipe, "lora", AdapterSettings(rank=rank, targets="attention"), f"a{i}")
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        save_adapter(pipe, folder / f"lora{i}", f"a{i}", metadata={"base_family": pipe.studio_source.family})
        out.append(folder / f"lora{i}")
    return out


def seconds_per_image(pipe, batch: int, steps: int) -> float:
    kw = {"num_inference_steps": steps, "guidance_scale": 2.5, "output_type": "np"}
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    with torch.no_grad():
        t0 = time.perf_counter()
        pipe([PROMPT] * batch, generator=gens, **kw)
        return (time.perf_counter() - t0) / batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="micro")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--gated", action="store_true", help="add AutoLoRA's gated fusion of 3 LoRAs against the same 3 "
                                                         "fused statically (gates as in a gate file for this base)")
    args = ap.parse_args()
    setup_logging(quiet=True)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    os.environ["STUDIO_HOME"] = tempfile.mkdtemp(prefix="bench-mix-home-")  # cold hash caches for the switch
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe())
    from studio.mixing import Mixer

    root = Path(tempfile.mkdtemp(prefix="bench-mix-"))
    loras = make_loras(args.base, root, 12, args.rank)
    set_a, set_b, set_c = loras[:4], loras[4:8], loras[8:]
    weights = [0.8, 0.6, 0.7, 0.5]

    pipe = load_pipeline(args.base, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    ref = load_pipeline(args.base, device="cpu")  # diffusers' own LoRA path, same weights
    ref.set_progress_bar_config(disable=True)
    names = [f"l{i}" for i in range(4)]
    for name, folder in zip(names, set_a):
        ref.load_lora_weights(str(folder), adapter_name=name)
    ref.set_adapters(names, adapter_weights=weights)

    static = [f"{p}:{w}" for p, w in zip(set_a, weights)]
    windowed = [f"{p}:{w}{win}" for p, w, win in zip(set_a, weights, WINDOWS)]
    fused, hooked, timed = Mixer(pipe, static), Mixer(pipe, static, fuse=False), Mixer(pipe, windowed)
    variants = {
        "base": (pipe, None),
        "4 LoRAs fused": (pipe, fused),
        "4 LoRAs windowed": (pipe, timed),
        "4 LoRAs unfused (studio)": (pipe, hooked),
        "4 LoRAs unfused (diffusers)": (ref, None),
    }
    if args.gated:  # speed does not depend on what the gates learned: a fresh gate file of this base
        from studio.autolora.gates import GateSet, save_gates
        from studio.generation import model_hash

        gates = save_gates(GateSet.for_pipeline(pipe), root / "gates.safetensors", base_hash=model_hash(pipe))
        variants["3 LoRAs fused"] = (pipe, Mixer(pipe, static[:3]))
        variants["3 LoRAs gated"] = (pipe, Mixer(pipe, [f"gated:{s}" for s in static[:3]], gates=gates))
    # the two unfused paths compute the same thing: check before timing them
    with hooked:
        ours = pipe([PROMPT], num_inference_steps=4, generator=[torch.Generator().manual_seed(0)], output_type="np")
    theirs = ref([PROMPT], num_inference_steps=4, generator=[torch.Generator().manual_seed(0)], output_type="np")
    agree = float(abs(ours.images - theirs.images).max())

    print(f"{args.base}: {args.steps} steps, guidance on, 4 LoRAs of rank {args.rank} on the attention layers, "
          f"best of {args.repeats}; studio and diffusers unfused agree to {agree:.1e} (pixels in [0, 1])")
    for batch in (int(b) for b in args.batches.split(",")):
        best = {k: float("inf") for k in variants}
        for name, (p, mix) in variants.items():  # warm-up
            if mix is not None:
                mix.apply()
            seconds_per_image(p, batch, 2)
            if mix is not None:
                mix.remove()
        for _ in range(args.repeats):
            for name, (p, mix) in variants.items():
                if mix is not None:
                    mix.apply()
                best[name] = min(best[name], seconds_per_image(p, batch, args.steps))
                if mix is not None:
                    mix.remove()
        print(f"  batch {batch}:")
        for name, s in best.items():
            print(f"    {name:30s} {s * 1000:8.1f} ms/image")
        print(f"    fused / base                  {best['4 LoRAs fused'] / best['base']:6.3f}x   (target <= 1.05)")
        print(f"    windowed / base               {best['4 LoRAs windowed'] / best['base']:6.3f}x   (target <= 1.3)")
        print(f"    studio / diffusers (unfused)  "
              f"{best['4 LoRAs unfused (studio)'] / best['4 LoRAs unfused (diffusers)']:6.3f}x   (target <= 0.8)")
        print(f"    windowed / diffusers          "
              f"{best['4 LoRAs windowed'] / best['4 LoRAs unfused (diffusers)']:6.3f}x")
        if args.gated:
            print(f"    3 gated / 3 fused             {best['3 LoRAs gated'] / best['3 LoRAs fused']:6.3f}x   "
                  f"(target <= 1.5)")

    # switching: A applied -> B applied (B never read: cold), then B -> C cold, then A again (warm)
    mix = Mixer(pipe, [f"{p}:{w}" for p, w in zip(set_a, weights)]).apply()
    cold = []
    for new in (set_b, set_c):
        t0 = time.perf_counter()
        mix.remove()
        mix = Mixer(pipe, [f"{p}:{w}" for p, w in zip(new, weights)]).apply()
        cold.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    mix.remove()
    mix = Mixer(pipe, [f"{p}:{w}" for p, w in zip(set_a, weights)]).apply()
    warm = time.perf_counter() - t0
    mix.remove()
    print(f"  switch to a new set of 4 adapters: cold {max(cold):.3f} s (worst of 2), warm {warm:.3f} s   "
          f"(target < 0.5 s)")


if __name__ == "__main__":
    main()
