"""Generation speed of a base model: images/s in fp32 and bf16, side by side in one run.

    python bench/generate_speed.py [--base micro] [--batch 8] [--steps 20] [--repeats 3]

Prints the CPU kind first: bf16 pays on some CPUs (AMX) and costs a lot on others.
"""

from __future__ import annotations

import argparse
import time

import torch

from studio import load_pipeline
from studio.machine import describe


def images_per_second(pipe, batch: int, steps: int, repeats: int, dtype: torch.dtype) -> float:
    prompts = ["a striped red circle on a white background"] * batch
    kw = dict(num_inference_steps=steps, guidance_scale=5.0, output_type="np")
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), ctx:
        pipe(prompts[:1], num_inference_steps=2, output_type="np")  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            pipe(prompts, generator=torch.Generator().manual_seed(0), **kw)
            best = min(best, time.perf_counter() - t0)
    return batch / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="micro")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(describe())
    pipe = load_pipeline(args.base, dtype="fp32", device="cpu")
    fp32 = images_per_second(pipe, args.batch, args.steps, args.repeats, torch.float32)
    bf16 = images_per_second(pipe, args.batch, args.steps, args.repeats, torch.bfloat16)
    print(f"{args.base}: {args.batch} images, {args.steps} steps, guidance on")
    print(f"  fp32            {fp32:7.2f} images/s")
    print(f"  bf16 (autocast) {bf16:7.2f} images/s   ratio bf16/fp32 = {bf16 / fp32:.2f}")


if __name__ == "__main__":
    main()
