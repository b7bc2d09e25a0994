"""TLoRA's forward orders against LoRA: seconds per training step (forward + backward) of the micro denoiser.

    OMP_NUM_THREADS=1 python bench/tlora_orders.py [--steps 10] [--batch 8] [--targets all]

Orders (studio/adapters/tlora/layer.py): ``weight`` builds W0 T + s Delta once per step and runs one
matmul/conv; ``dense`` builds T and applies it to the activations before the base layer; ``cores``
contracts the activations with the cores one by one. An order with ``/per-layer`` (e.g. ``auto/per-layer``)
builds each layer's transform on its own instead of all layers' in a few batched products per forward
(studio/adapters/tlora/batched.py, the default). The LoRA row runs the trainer's lean LoRA layers
(studio/adapters/fast.py), as `studio train` does. Steps run round robin (every row sees the same
machine load); prints the median s/step per row, wall and CPU time, and the ratios to LoRA.

``--trainer N`` times the studio trainer itself instead (`studio train --kind subject` on the bundled
subject set with the recipe's defaults: batch 4, the output-preservation prior, a learned trigger),
LoRA against TLoRA (batched and per layer), ``--rounds`` alternating runs of N steps each, timed from
the end of step 2 to the end of the last.
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
    if method == "lora":
        from studio.adapters import fast

        fast.speed_up(pipe.unet)  # what the trainer runs
    if order:
        order, _, per_layer = order.partition("/")
        for _, layer in tuner_layers(pipe.unet):
            layer.order = order
        if per_layer:
            pipe.unet._tlora_builder.enabled = False
    from studio.trainers.loop import _optimizer

    opt = _optimizer(no_decay_groups([{"params": params, "lr": 1e-4}]), torch.device("cpu"))  # the trainer's
    g = torch.Generator().manual_seed(0)
    size = pipe.unet.config.sample_size
    x = torch.randn(args.batch, 4, size, size, generator=g)
    t = torch.randint(0, 1000, (args.batch,), generator=g)
    cond = torch.randn(args.batch, 77, pipe.unet.config.cross_attention_dim, generator=g)

    def step() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        pipe.unet(x, t, cond).sample.pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, time.process_time() - c0

    return step


def trainer_step(method: str, per_layer: bool, steps: int, seed: int) -> tuple[float, float]:
    """Wall and CPU seconds per step of one `studio train --kind subject` run (recipe defaults)."""
    import tempfile
    from pathlib import Path

    from studio.adapters.tlora import batched
    from studio.trainers.config import TrainConfig
    from studio.trainers.loop import train

    marks: dict[str, tuple[float, float]] = {}

    def on_event(ev) -> None:
        if ev.phase == "train" and ev.step in (2, ev.total):
            marks["a" if ev.step == 2 else "b"] = (time.perf_counter(), time.process_time())

    root = Path(__file__).resolve().parents[1]
    batched.StepBuilder.default_enabled = not per_layer
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig.from_dict(dict(kind="subject", method=method, base="micro", seed=seed,
                                             images=str(root / "assets/samples/subject-heart-red"),
                                             out=str(Path(tmp) / "a"), steps=steps, checkpoint_every=0,
                                             register=False, samples=False))
            train(cfg, on_event=on_event)
    finally:
        batched.StepBuilder.default_enabled = True
    n = steps - 2
    return (marks["b"][0] - marks["a"][0]) / n, (marks["b"][1] - marks["a"][1]) / n


def trainer_main(args: argparse.Namespace) -> None:
    rows = {"lora (trainer)": ("lora", False), "tlora (trainer)": ("tlora", False),
            "tlora per-layer (trainer)": ("tlora", True)}
    wall: dict[str, list[float]] = {k: [] for k in rows}
    cpu: dict[str, list[float]] = {k: [] for k in rows}
    for r in range(args.rounds):
        for k, (method, per_layer) in rows.items():
            w, c = trainer_step(method, per_layer, args.trainer, r)
            wall[k].append(w)
            cpu[k].append(c)
            print(f"  round {r + 1}/{args.rounds} {k}: {w:.4f} s/step wall, {c:.4f} cpu", flush=True)
    _report(wall, cpu, "lora (trainer)")


def _report(wall: dict[str, list[float]], cpu: dict[str, list[float]], ref: str) -> None:
    # CPU time beside wall time: on a shared machine other jobs stretch wall time far more than CPU time
    med = {k: sorted(v)[len(v) // 2] for k, v in wall.items()}
    med_cpu = {k: sorted(v)[len(v) // 2] for k, v in cpu.items()}
    print(f"{'row':<26} {'s/step':>8} {'x LoRA':>7} {'cpu s/step':>11} {'x LoRA':>7}")
    for k, v in med.items():
        print(f"{k:<26} {v:8.4f} {v / med[ref]:7.2f} {med_cpu[k]:11.4f} {med_cpu[k] / med_cpu[ref]:7.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (the micro subject default)")
    ap.add_argument("--targets", default="all")
    ap.add_argument("--transform-rank", type=int, default=4)
    ap.add_argument("--residual", default="lora")
    ap.add_argument("--orders", default="auto,weight,dense,auto/per-layer",
                    help="comma-separated: auto, weight, dense, cores, each optionally /per-layer")
    ap.add_argument("--residual-rank", type=int, default=4)
    ap.add_argument("--trainer", type=int, default=0, metavar="N",
                    help="time the studio trainer (recipe defaults) for N steps per run instead")
    ap.add_argument("--rounds", type=int, default=3, help="with --trainer: alternating runs per row")
    args = ap.parse_args()
    from studio.machine import describe

    print(describe())
    if args.trainer:
        trainer_main(args)
        return
    torch.manual_seed(0)
    opts = {"transform_rank": args.transform_rank, "residual": args.residual, "residual_rank": args.residual_rank}
    rows = {f"lora r{args.rank}": build("lora", None, args, {})}
    for order in args.orders.split(","):
        rows[f"tlora {order}"] = build("tlora", order, args, opts)
    wall: dict[str, list[float]] = {k: [] for k in rows}
    cpu: dict[str, list[float]] = {k: [] for k in rows}
    for i in range(args.steps + 2):  # round robin: every row sees the same machine load
        for k, step in rows.items():
            dt, dc = step()
            if i >= 2:  # warm-up steps are not counted
                wall[k].append(dt)
                cpu[k].append(dc)
    _report(wall, cpu, f"lora r{args.rank}")


if __name__ == "__main__":
    main()
