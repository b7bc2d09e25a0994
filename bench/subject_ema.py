"""A subject run with an exponential moving average of the trained weights saved instead of the last step.

    OMP_NUM_THREADS=1 python bench/subject_ema.py DECAY IMAGES OUT SEED
    studio eval subject --base micro --adapter OUT --subject SHAPE --json

An experiment, not a trainer option yet (docs/training.md, "Session 13"): the default subject recipe
(`studio train --kind subject --images IMAGES --base micro --seed SEED`) with an optimizer post-step
hook that keeps ``shadow = decay * shadow + (1 - decay) * weights`` for every trained tensor (LoRA
and the learned trigger row), and the shadow copied into the adapter just before it is saved.
Checkpoints and samples made during the run hold the live weights, not the average.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("decay", type=float)
    ap.add_argument("images")
    ap.add_argument("out")
    ap.add_argument("seed", type=int)
    args = ap.parse_args()

    import studio.trainers.loop as loop
    from studio import adapters
    from studio.trainers.config import TrainConfig

    state: dict[str, list[torch.Tensor]] = {}
    make_optimizer, save = loop._optimizer, adapters.save_adapter

    def optimizer_with_ema(groups, device, choice="auto"):
        opt = make_optimizer(groups, device, choice)
        params = [p for g in groups for p in g["params"]]
        state["params"], state["shadow"] = params, [p.detach().clone() for p in params]

        def after_step(*_):
            with torch.no_grad():
                torch._foreach_lerp_(state["shadow"], [p.detach() for p in params], 1 - args.decay)

        opt.register_step_post_hook(after_step)
        return opt

    def save_average(*a, **k):
        with torch.no_grad():
            for p, s in zip(state["params"], state["shadow"]):
                p.copy_(s)
        return save(*a, **k)

    loop._optimizer, adapters.save_adapter = optimizer_with_ema, save_average
    loop.train(TrainConfig.from_dict(dict(kind="subject", images=args.images, base="micro", out=args.out,
                                          seed=args.seed, register=False)))


if __name__ == "__main__":
    main()
