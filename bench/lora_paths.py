"""One LoRA layer's forward and backward: the low-rank path against the weight path.

    OMP_NUM_THREADS=1 python bench/lora_paths.py [--rank 8] [--repeats 5]

The trainer's lean LoRA layer (studio.adapters.fast) computes ``x W^T + s (x A^T) B^T`` (the
low-rank path: three products forward, six backward) or ``x (W + s B A)^T`` (the weight path: two
ops forward, four products backward, but the gradient of the whole update). For each layer shape
(micro's, then SD's) and token count, both run forward + backward in alternating rounds (best of
``--repeats``) and the ratio weight/low-rank is printed: below 1, the weight path is faster.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from studio.machine import describe

SHAPES = ((64, 64), (64, 128), (128, 128), (128, 1024), (512, 128),  # micro: attention, GEGLU in, GEGLU out
          (320, 320), (768, 320), (640, 640), (1280, 1280))  # SD 1.5: attention, cross-attention k/v
TOKENS = (64, 256, 1024, 4096)


def low_rank(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    return F.linear(x, w) + F.linear(F.linear(x, a), b) * s


def weight(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    return F.linear(x, torch.addmm(w, b, a, alpha=s))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(describe())
    print(f"rank {args.rank}, {torch.get_num_threads()} threads, best of {args.repeats} alternating rounds")
    g = torch.Generator().manual_seed(0)
    for d_in, d_out in SHAPES:
        for n in TOKENS:
            w = torch.randn(d_out, d_in, generator=g) * 0.02
            a = (torch.randn(args.rank, d_in, generator=g) * 0.02).requires_grad_()
            b = (torch.randn(d_out, args.rank, generator=g) * 0.02).requires_grad_()
            x = torch.randn(4, n // 4, d_in, generator=g).requires_grad_()
            calls = min(200, max(3, int(3e7 / (n * d_in * d_out))))  # about the same time per round
            best = {"low-rank": float("inf"), "weight": float("inf")}
            for _ in range(args.repeats):
                for name, f in (("low-rank", low_rank), ("weight", weight)):
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        f(x, w, a, b, 1.0).sum().backward()
                    best[name] = min(best[name], (time.perf_counter() - t0) / calls)
            print(f"  {d_in:5d} -> {d_out:<5d} tokens {n:5d}: low-rank {best['low-rank'] * 1e6:9.1f} us, "
                  f"weight {best['weight'] * 1e6:9.1f} us, weight/low-rank {best['weight'] / best['low-rank']:.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
