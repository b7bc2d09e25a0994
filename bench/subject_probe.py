"""A quick probe of a micro subject adapter trained on the heart set (faster than `studio eval subject`).

    python bench/subject_probe.py ADAPTER_DIR [--subject heart] [--token sks]

Prints how often the judge sees the subject in 16 images of "a TOKEN shape on a BG background"
(4 backgrounds), how often the background is right, and the joint (shape and colour) accuracy
of 32 base prompts without the trigger before and after loading the adapter.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from studio import load_pipeline
from studio.adapters import load_adapter
from studio.logs import setup_logging
from studio.micro.judge import classify, load_judge
from studio.micro.world import BACKGROUNDS, COLORS, SEEN_SHAPES, SHAPES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapter")
    ap.add_argument("--subject", default="heart")
    ap.add_argument("--token", default="sks")
    args = ap.parse_args()
    setup_logging()
    pipe = load_pipeline("micro")
    judge = load_judge()
    colors, bgs = list(COLORS), list(BACKGROUNDS)[:4]

    def read(prompts: list[str], seed: int) -> dict[str, np.ndarray]:
        ims = pipe(prompts, num_inference_steps=20, guidance_scale=2.5, output_type="np",
                   generator=torch.Generator().manual_seed(seed)).images
        return classify((ims * 255).round().astype("uint8"), judge)

    base = [(colors[i % len(colors)], SEEN_SHAPES[i % len(SEEN_SHAPES)], bgs[i % len(bgs)]) for i in range(32)]
    base_prompts = [f"a {c} {s} on a {b} background" for c, s, b in base]

    def joint(p: dict[str, np.ndarray]) -> float:
        return float(np.mean([SHAPES[p["shape"][i]] == s and colors[p["color"][i]] == c for i, (c, s, _) in enumerate(base)]))

    before = joint(read(base_prompts, 5))
    load_adapter(pipe, args.adapter)
    prompts = [f"a {args.token} shape on a {b} background" for b in bgs for _ in range(4)]
    p = read(prompts, 1)
    subject = np.mean([SHAPES[s] == args.subject for s in p["shape"]])
    bg = np.mean([bgs[i // 4] == list(BACKGROUNDS)[b] for i, b in enumerate(p["background"])])
    after = joint(read(base_prompts, 5))
    print(f"{args.adapter}: {args.subject} {subject:.2f} bg {bg:.2f} base joint {before:.2f} -> {after:.2f}")


if __name__ == "__main__":
    main()
