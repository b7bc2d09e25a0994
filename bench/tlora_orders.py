"""TLoRA's forward orders against LoRA: seconds per training step (forward + backward) of the micro denoiser.

    OMP_NUM_THREADS=1 python bench/tlora_orders.py [--steps 10] [--batch 8] [--targets all]

Orders (studio/adapters/tlora/layer.py): ``weight`` builds W0 T + s Delta once per step and runs one
matmul/conv; ``dense`` builds T and applies it to the activations before the base layer; ``cores``
contracts the activations with the cores one by one. Steps run round robin (every row sees the same\nmachine load); prints the median s/step per row and the ratio to LoRA.
"""

from __future__ import annotations

import argparse
import time

import torch


def build(method: str, order: str | None, args: argparse.Namespace, options: dict):
    """A micro pipeline with one adapter, its optimizer and a fixed batch: a closure running one step."""
    from studio.adapters import AdapterSettings, add_adapter, no_decay_groups
    from studio.adapters.core import tuner_layers
    from studio.loading import load_pipeline

    pipe = load_pipeline("micro", device="cpu", dtype="fp32")
    params = add_adapter(pipe, method, AdapterSettings(rank=args.rank, targets=args.targets, options=options), "a")
    if order:
        for _, layer in tuner_layers(pipe.unet):
            layer.order = order
    from studio.trainers.loop import _optimizer

    opt = _optimizer(no_decay_groups([{"params": params, "lr": 1e-4}]), torch.device("cpu"))  # the trainer's
    g = torch.Generator().manual_seed(0)
    size = pipe.unet.config.sample_size
    x = torch.randn(args.batch, 4, size, size, generator=g)
    t = torch.randint(0, 1000, (args.batch,), generator=g)
    cond = torch.randn(args.batch, 77, pipe.unet.config.cross_attention_dim, generator=g)

    def step() -> float:
        t0 = time.perf_counter()
        pipe.unet(x, t, cond).sample.pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (the micro subject default)")
    ap.add_argument("--targets", default="all")
    ap.add_argument("--transform-rank", type=int, default=4)
    ap.add_argument("--residual", default="lora")
    ap.add_argument("--orders", default="auto,weight,dense,cores")
    ap.add_argument("--residual-rank", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)
    opts = {"transform_rank": args.transform_rank, "residual": args.residual, "residual_rank": args.residual_rank}
    rows = {f"lora r{args.rank}": build("lora", None, args, {})}
    for order in args.orders.split(","):
        rows[f"tlora {order}"] = build("tlora", order, args, opts)
    times: dict[str, list[float]] = {k: [] for k in rows}
    for i in range(args.steps + 2):  # round robin: every row sees the same machine load
        for k, step in rows.items():
            dt = step()
            if i >= 2:  # warm-up steps are not counted
                times[k].append(dt)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    lora = med[f"lora r{args.rank}"]
    print(f"{'row':<16} {'s/step':>8} {'x LoRA':>7}")
    for k, v in med.items():
        print(f"{k:<16} {v:8.4f} {v / lora:7.2f}")


if __name__ == "__main__":
    main()
