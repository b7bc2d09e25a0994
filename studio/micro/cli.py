"""`studio micro render` and `studio micro pretrain`: the micro world from the command line."""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
from pathlib import Path

from studio.errors import StudioError

log = logging.getLogger(__name__)

_GROUPS = {"any", "seen", "heldout"}


def _pool(attr: str, value: str) -> list[str]:
    """A --shape/--color/... value: one name, a comma list, or any/seen/heldout."""
    from studio.micro import world

    allowed = world.ATTRIBUTES[attr]
    seen = {"shape": world.SEEN_SHAPES, "texture": world.SEEN_TEXTURES}.get(attr, allowed)
    if value == "any":
        return list(allowed)
    if value == "seen":
        return list(seen)
    if value == "heldout":
        held = [v for v in allowed if v not in seen]
        if not held:
            raise StudioError(f"--{attr} heldout: every {attr} is seen in pre-training; there is no held-out one")
        return held
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in names if v not in allowed]
    if bad or not names:
        raise StudioError(f"--{attr} {value}: unknown {attr} {', '.join(bad) or '(empty)'}; choose from "
                          f"{', '.join(allowed)} or any/seen/heldout")
    return names


def render_set(out: Path, n: int, seed: int, *, shape: str = "seen", color: str = "any", texture: str = "seen",
               background: str = "any", caption: str = "full", overwrite: bool = False) -> list[Path]:
    """Write ``n`` rendered images with ``.txt`` captions into ``out``; returns the image paths."""
    from studio.micro import world

    if n <= 0:
        raise StudioError(f"--n {n}: must be at least 1")
    pools = {"shapes": _pool("shape", shape), "colors": _pool("color", color),
             "textures": _pool("texture", texture), "backgrounds": _pool("background", background)}
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise StudioError(f"--out {out}: folder is not empty; choose another or pass --overwrite")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = random.Random(seed)
    # stratify: a set of 5 over 6 backgrounds shows 5 different ones, not a random repeat. Each pass
    # through a pool is shuffled afresh: one shuffle repeated would tie attributes whose pools have the
    # same length (12 images over 6 shapes and 6 backgrounds would show 6 shape-background pairs, twice)
    strat = {}
    for key, values in pools.items():
        seq: list[str] = []
        while len(seq) < n:
            order = list(values)
            rng.shuffle(order)
            seq += order
        strat[key] = seq[:n]
    scene_list = [world.random_scene(rng, **{k: [v[i]] for k, v in strat.items()}) for i in range(n)]
    names = []
    for i, scene in enumerate(scene_list):
        name = f"{i:03d}-{scene.shape}-{scene.color}-{scene.texture}-{scene.background}"
        world.render(scene).save(tmp / f"{name}.png")
        if caption == "full":
            text = world.caption(scene, rng, full=True)
        elif caption == "content":  # what a user would write for a style set: no texture word
            text = f"a {scene.color} {scene.shape} on a {scene.background} background"
        else:
            text = ""
        if text:
            (tmp / f"{name}.txt").write_text(text + "\n")
        names.append(name)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)  # the set appears whole or not at all
    return [out / f"{n}.png" for n in names]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("micro", help="the micro world: render image sets, pre-train the micro model",
                       description="The embedded micro world: a procedural renderer, its base model and judge.")
    msub = p.add_subparsers(dest="micro_command", metavar="ACTION")
    msub.required = True

    r = msub.add_parser("render", help="write a set of rendered images with .txt captions",
                        description="Render micro-world images of chosen concepts, with .txt captions beside them. "
                                    "Each attribute takes a name, a comma list, or any/seen/heldout.")
    r.add_argument("--shape", default="seen", help="e.g. heart, or circle,square, or seen/heldout/any")
    r.add_argument("--color", default="any")
    r.add_argument("--texture", default="seen")
    r.add_argument("--background", default="any")
    r.add_argument("--n", type=int, default=8, help="number of images")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--caption", default="full", choices=["full", "content", "none"],
                   help="full: name every attribute; content: leave out the texture (style sets); none")
    r.add_argument("--out", required=True, metavar="DIR")
    r.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    r.set_defaults(func=_run_render)

    t = msub.add_parser("pretrain", help="pre-train the micro model and judge (about 80 min on 2 CPU cores)",
                        description="Pre-train the judge, the VAE, then text encoder + UNet. Resumes from the work "
                                    "folder's checkpoints when run again.")
    t.add_argument("--out", default="assets", metavar="DIR", help="writes DIR/micro and DIR/judge")
    t.add_argument("--work", default=None, metavar="DIR", help="checkpoints and caches (default DIR/.pretrain-work)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    t.add_argument("--tiny", action="store_true", help="a tiny architecture (smoke test)")
    for name, default in (("judge-steps", 1500), ("vae-steps", 1600), ("decoder-steps", 2000), ("unet-steps", 8000)):
        t.add_argument(f"--{name}", type=int, default=default)
    t.set_defaults(func=_run_pretrain)


def _run_render(args: argparse.Namespace) -> int:
    paths = render_set(Path(args.out), args.n, args.seed, shape=args.shape, color=args.color, texture=args.texture,
                       background=args.background, caption=args.caption, overwrite=args.overwrite)
    for p in paths:
        print(p)
    return 0


def _run_pretrain(args: argparse.Namespace) -> int:
    from studio.micro.pretrain import PretrainConfig, pretrain

    try:
        cfg = PretrainConfig(out=Path(args.out), work=args.work, seed=args.seed, threads=args.threads, tiny=args.tiny,
                             judge_steps=args.judge_steps, vae_steps=args.vae_steps, decoder_steps=args.decoder_steps,
                             unet_steps=args.unet_steps)
    except ValueError as exc:
        raise StudioError(str(exc)) from exc
    report = pretrain(cfg)
    print(f"wrote {cfg.out / 'micro'} and {cfg.out / 'judge'}; judge accuracy {report.get('judge_accuracy')}, "
          f"quick eval {report.get('quick_eval')}")
    return 0
