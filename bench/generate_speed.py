"""Generation speed of a base model: images/s in fp32 and bf16, side by side in one run.

    python bench/generate_speed.py [--base micro] [--batch 8] [--steps 20] [--repeats 3]

Prints the CPU kind first: bf16 pays on some CPUs (AMX) and costs a lot on others.
"""

from __future__ import annotations

import argparse
import time

import torch

from studio import load_pipeline
from studio.logs import setup_logging
from studio.machine import describe


def images_per_second(pipe, batch: int, steps: int, repeats: int, autocast: bool = False) -> float:
    """Best-of-`repeats` images/s of one pipeline call of `batch` prompts (guidance on)."""
    prompts = ["a striped red circle on a white background"] * batch
    kw = dict(num_inference_steps=steps, guidance_scale=2.5, output_type="np")
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
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
    setup_logging()
    print(describe())
    torch.set_num_threads(torch.get_num_threads())  # the machine's default, printed below
    print(f"threads: {torch.get_num_threads()}")
    pipe32 = load_pipeline(args.base, dtype="fp32", device="cpu")
    pipe16 = load_pipeline(args.base, dtype="bf16", device="cpu")  # what `studio generate --dtype bf16` runs
    # interleave the variants so that machine noise hits them alike
    rates: dict[str, list[float]] = {"fp32": [], "bf16 weights": [], "bf16 autocast": []}
    for _ in range(args.repeats):
        rates["fp32"].append(images_per_second(pipe32, args.batch, args.steps, 1))
        rates["bf16 weights"].append(images_per_second(pipe16, args.batch, args.steps, 1))
        rates["bf16 autocast"].append(images_per_second(pipe32, args.batch, args.steps, 1, autocast=True))
    best = {k: max(v) for k, v in rates.items()}
    print(f"{args.base}: batch {args.batch}, {args.steps} steps, guidance on, best of {args.repeats}")
    for name, rate in best.items():
        print(f"  {name:14s} {rate:7.2f} images/s   ratio to fp32 = {rate / best['fp32']:.2f}")


if __name__ == "__main__":
    main()
