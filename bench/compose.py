"""Break-for-Make against the usual ways of putting a subject and a style in one image (micro model, CPU).

    python bench/compose.py [--budget 1600] [--make N] [--n 48] [--out out/bench-compose]

Every row trains on the same content set (a held-out shape) and style set (a held-out texture on
shapes and colours of its own) with the same total step budget, then runs `studio eval compose`
(`both`, subject and style fidelity, leakage):

  (a) two independent LoRAs (subject, style; budget/2 steps each) mixed at generation, the best
      of a small weight grid by `both`;
  (b) one LoRA trained jointly on both sets (the subject recipe's settings, both prompt kinds);
  (c) Break-for-Make without multi-correspondence (--aux-sets 0);
  (d) Break-for-Make (the default recipe, stage steps scaled to the budget).

Plus the single adapters of (a) alone (subject fidelity of the subject LoRA, style fidelity of the
style LoRA), the yardstick for "within 0.05 of the single adapters alone". Training and
evaluation go through the `studio` command line, so the figures are what a user gets. Prints a
table and writes OUT/compose.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("bench.compose")
ROOT = Path(__file__).resolve().parents[1]
STUDIO = [sys.executable, "-m", "studio.cli"]


def _run(args: list[str], log_file: Path) -> float:
    t0 = time.time()
    with open(log_file, "w") as fh:
        code = subprocess.call(STUDIO + args, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if code:
        raise SystemExit(f"failed ({code}): studio {' '.join(args)}; see {log_file}")
    return time.time() - t0


def _eval(out: Path, tag: str, adapters: list[str], shape: str, texture: str, n: int | None,
          extra: list[str] = ()) -> dict:
    args = ["eval", "compose", "--base", "micro", "--subject", shape, "--texture", texture, "--json", *extra]
    for a in adapters:
        args += ["--adapter", a]
    if n:
        args += ["--n", str(n)]
    t0 = time.time()
    res = subprocess.run(STUDIO + args, capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        raise SystemExit(f"eval {tag} failed: {res.stderr[-600:]}")
    (out / f"eval-{tag}.json").write_text(res.stdout)
    d = json.loads(res.stdout)
    d["eval_seconds"] = round(time.time() - t0, 1)
    return d


def _joint_folder(content: Path, style: Path, dest: Path) -> None:
    """Both sets in one folder; captions already in the form each set's recipe trains on."""
    dest.mkdir(parents=True, exist_ok=True)
    for prefix, src in (("c", content), ("s", style)):
        for img in sorted(src.glob("*.png")):
            shutil.copy(img, dest / f"{prefix}-{img.name}")
            cap = img.with_suffix(".txt")
            if cap.exists():
                shutil.copy(cap, dest / f"{prefix}-{cap.name}")


def train_joint(folder: Path, out: Path, steps: int, shape: str) -> float:
    """(b): one LoRA on both sets with the subject recipe's machinery (prior, trigger row of sks).

    Content images train on their captions with the shape word replaced by "sks shape" (and the
    bare "a sks shape" half the time, as the subject recipe does); style images on
    "CAPTION in zwx style". Only the subject trigger's embedding is learned: the loop learns one
    trigger word per adapter.
    """
    from studio.trainers import recipes
    from studio.trainers.config import TrainConfig
    from studio.trainers.loop import train

    class Joint(recipes.SubjectRecipe):
        def instance_prompts(self, cfg, plan, data):
            out = []
            for it in data.items:
                cap = it.caption or ""
                if it.path.name.startswith("c-"):
                    named = recipes._replace_word(cap, shape, f"{cfg.token} {plan.class_word}")
                    plain = f"a {cfg.token} {plan.class_word}"
                    out.append(plain if named is None else (named, plain))
                else:
                    out.append(f"{cap or 'an image'} in zwx style")
            return out

    saved = recipes.RECIPES["subject"]
    recipes.RECIPES["subject"] = Joint()
    t0 = time.time()
    try:
        train(TrainConfig(kind="subject", images=str(folder), base="micro", out=str(out), steps=steps,
                          register=False))
    finally:
        recipes.RECIPES["subject"] = saved
    return time.time() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--content", default="assets/samples/subject-heart-red")
    p.add_argument("--style", default="assets/samples/style-checkered")
    p.add_argument("--shape", default="heart")
    p.add_argument("--texture", default="checkered")
    p.add_argument("--budget", type=int, default=1600, help="total training steps of every row (default 1600, "
                                                             "the b4m micro default 400+400+800; 900 until session 14)")
    p.add_argument("--make", type=int, default=None,
                   help="make-stage steps of rows (c) and (d) (default: half the budget, as the recipe's 800 of "
                        "1600; --budget 900 --make 100 is the split of the session-13 table)")
    p.add_argument("--n", type=int, default=None, help="images per eval (default: the suite's)")
    p.add_argument("--weights", default="0.8,1.0", help="weight grid of (a), each adapter (default 0.8,1.0)")
    p.add_argument("--rows", default="a,b,c,d")
    p.add_argument("--out", default="out/bench-compose")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("STUDIO_HOME", str(out / "home"))
    rows = args.rows.split(",")
    budget = args.budget
    half = budget // 2
    make = args.make or max(1, budget // 2)  # the default recipe's share: 800 of 1600 (100 of 900 until session 14)
    stage = (budget - make) // 2
    res: dict[str, dict] = {}
    secs: dict[str, float] = {}
    common = ["--base", "micro", "--no-register", "--seed", "0"]
    if "a" in rows:
        secs["a"] = _run(["train", "--kind", "subject", "--images", args.content, "--steps", str(half), "--token", "sks",
                          "--out", str(out / "a-subject"), *common], out / "a-subject.log")
        secs["a"] += _run(["train", "--kind", "style", "--images", args.style, "--steps", str(budget - half),
                           "--token", "zwx", "--out", str(out / "a-style"), *common], out / "a-style.log")
        res["subject alone"] = _eval(out, "subject-alone", [str(out / "a-subject")], args.shape, args.texture, args.n,
                                     ["--style-token", "zwx"])
        res["style alone"] = _eval(out, "style-alone", [str(out / "a-style")], args.shape, args.texture, args.n,
                                   ["--subject-token", "sks"])
        best = None
        for ws in args.weights.split(","):
            for wt in args.weights.split(","):
                d = _eval(out, f"a-{ws}-{wt}", [f"{out / 'a-subject'}:{ws}", f"{out / 'a-style'}:{wt}"], args.shape,
                          args.texture, args.n)
                d["weights"] = f"{ws}/{wt}"
                log.info("(a) weights %s/%s: both %.3f", ws, wt, d["both"])
                if best is None or d["both"] > best["both"]:
                    best = d
        res["(a) two LoRAs mixed"] = best
    if "b" in rows:
        _joint_folder(ROOT / args.content, ROOT / args.style, out / "joint-set")
        secs["b"] = train_joint(out / "joint-set", out / "b-joint", budget, args.shape)
        res["(b) one joint LoRA"] = _eval(out, "b", [str(out / "b-joint")], args.shape, args.texture, args.n,
                                          ["--subject-token", "sks", "--style-token", "zwx"])
    for tag, aux in (("c", "0"), ("d", "2")):
        if tag not in rows:
            continue
        secs[tag] = _run(["train", "--method", "b4m", "--content", args.content, "--style", args.style,
                          "--steps-content", str(stage), "--steps-style", str(stage), "--steps-make", str(make),
                          "--aux-sets", aux, "--out", str(out / f"{tag}-b4m"), *common], out / f"{tag}-b4m.log")
        name = "(c) B4M, no multi-correspondence" if tag == "c" else "(d) Break-for-Make"
        res[name] = _eval(out, tag, [str(out / f"{tag}-b4m")], args.shape, args.texture, args.n)
    # the results first: a table that fails to print must not lose forty minutes of training
    (out / "compose.json").write_text(json.dumps({"budget": budget, "results": res, "train_seconds": secs}, indent=1))
    keys = ("both", "subject_fidelity", "style_fidelity", "leakage", "base_drift")
    print(f"budget {budget} steps per row; {args.shape} x {args.texture}; n = {next(iter(res.values()))['n']}")
    print(f"{'row':<36}" + "".join(f"{k:>17}" for k in keys))
    for name, d in res.items():
        cells = "".join(f"{'n/a' if d.get(k) is None else round(d[k], 3):>17}" for k in keys)  # alone: no leakage
        print(f"{name:<36}{cells}" + (f"   weights {d['weights']}" if "weights" in d else ""))
    a, dd = res.get("(a) two LoRAs mixed"), res.get("(d) Break-for-Make")
    if a and dd:
        print(f"(d)/(a): both {dd['both'] - a['both']:+.3f}, leakage ratio "
              f"{dd['leakage'] / a['leakage'] if a['leakage'] else float('nan'):.2f}")
    if dd and "subject alone" in res:
        print(f"(d) - alone: subject {dd['subject_fidelity'] - res['subject alone']['subject_fidelity']:+.3f}, "
              f"style {dd['style_fidelity'] - res['style alone']['style_fidelity']:+.3f}")
    print("train seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in secs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
