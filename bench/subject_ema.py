"""A default subject (or style) run with the weight average saved instead of the last step.

    OMP_NUM_THREADS=1 python bench/subject_ema.py DECAY IMAGES OUT SEED [--kind style --token zwx]
    studio eval subject --base micro --adapter OUT --subject SHAPE --json

The same as ``studio train --kind KIND --images IMAGES --base micro --seed SEED --ema DECAY
--no-register --out OUT`` (docs/training.md, "EMA"). Until session 14 this script patched the
optimizer and the save itself, with a plain decay from the first step; the trainer's ``--ema`` caps
the early decays at ``(1 + t) / (10 + t)`` as diffusers' EMAModel does. In a 1000-step run at 0.99
both give the last 110 steps the same weights; the third of the weight left for the steps before
them sits nearer step 890 with the cap (and none on the starting weights, 4e-5 without it).
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("decay", type=float)
    ap.add_argument("images")
    ap.add_argument("out")
    ap.add_argument("seed", type=int)
    ap.add_argument("--kind", choices=["subject", "style"], default="subject",
                    help="the recipe (style: then `studio eval style --texture TEXTURE`)")
    ap.add_argument("--token", default=None, help="the trigger (style runs in docs/ use zwx)")
    args = ap.parse_args()

    from studio.trainers.config import TrainConfig
    from studio.trainers.loop import train

    fields = dict(kind=args.kind, images=args.images, base="micro", out=args.out, seed=args.seed, register=False,
                  ema=args.decay)
    if args.token:
        fields["token"] = args.token
    train(TrainConfig.from_dict(fields))


if __name__ == "__main__":
    main()
