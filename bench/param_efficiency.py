"""Fidelity against stored parameters: LoRA at several ranks, LoHa, LoKr, DoRA and TLoRA settings on one subject set.

    OMP_NUM_THREADS=1 python bench/param_efficiency.py [--steps 1000] [--lrs 1e-3,2e-3] [--rows lora-r1,tlora-r4]
        [--out out/param-efficiency] [--png docs/images/param_efficiency.png]

Every row trains `studio train --kind subject` on the bundled subject set with the same steps and
the same learning-rate grid (the best lr by subject_fidelity is kept), then runs
`studio eval subject --json`. Prints stored parameters (every tensor of the adapter file, the
learned trigger included), subject_fidelity, prompt_fidelity, base_drift and s/step per row, and
plots fidelity against parameters. Finished runs are reused (delete --out to start over).

    python bench/param_efficiency.py --rows lora-r16,tlora-t4-lora4 --train-seeds 0,1,2 --eval-seeds 0,1

repeats rows over training seeds (seed 0: the grid's run) and eval noise seeds, and prints the
means: one run per cell cannot resolve differences of 0.02 (docs/tlora.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROWS: dict[str, list[str]] = {
    "lora-r1": ["--method", "lora", "--rank", "1"],
    "lora-r2": ["--method", "lora", "--rank", "2"],
    "lora-r4": ["--method", "lora", "--rank", "4"],
    "lora-r8": ["--method", "lora", "--rank", "8"],
    "lora-r16": ["--method", "lora", "--rank", "16"],  # the micro subject default
    "loha-r4": ["--method", "loha", "--rank", "4"],
    "lokr-r4": ["--method", "lokr", "--rank", "4"],
    "dora-r4": ["--method", "dora", "--rank", "4"],
    "tlora-t4-tr4": ["--method", "tlora", "--transform-rank", "4", "--residual", "tr", "--residual-rank", "4"],
    "tlora-t2-tr8": ["--method", "tlora", "--transform-rank", "2", "--residual", "tr", "--residual-rank", "8"],
    "tlora-t4-lora4": ["--method", "tlora", "--transform-rank", "4", "--residual", "lora", "--residual-rank", "4"],
}


def studio(*args: str, log: Path) -> str:
    exe = [sys.executable, "-m", "studio.cli"]
    with open(log, "a") as fh:
        out = subprocess.run(exe + list(args), stdout=subprocess.PIPE, stderr=fh, text=True)
    if out.returncode:
        raise SystemExit(f"studio {' '.join(args)} failed (exit {out.returncode}); see {log}")
    return out.stdout


def stored(folder: Path) -> int:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    with safe_open(str(files[0]), "pt") as fh:
        return sum(_prod(fh.get_slice(k).get_shape()) for k in fh.keys())


def _prod(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def run_row(name: str, lr: str, args: argparse.Namespace, subject_dir: Path, shape: str) -> dict:
    out = Path(args.out) / f"{name}-lr{lr}"
    result = out / "result.json"
    if result.is_file():
        return json.loads(result.read_text())
    log = Path(args.out) / f"{name}-lr{lr}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    timing = Path(args.out) / f"{name}-lr{lr}.seconds"
    if not any(out.glob("*.safetensors")):  # a run whose eval failed keeps its adapter
        t0 = time.time()
        studio("train", "--kind", "subject", "--images", str(subject_dir), "--base", "micro", "--out", str(out),
               "--steps", str(args.steps), "--lr", lr, "--no-register", "--checkpoint-every", "0", *ROWS[name], log=log)
        timing.write_text(str(time.time() - t0))
    seconds = float(timing.read_text()) if timing.is_file() else float("nan")
    ev = json.loads(studio("eval", "subject", "--base", "micro", "--adapter", str(out), "--subject", shape,
                           "--json", log=log))
    row = {"row": name, "lr": float(lr), "params": stored(out), "subject_fidelity": ev["subject_fidelity"],
           "prompt_fidelity": ev["prompt_fidelity"], "base_drift": ev["base_drift"],
           "s_per_step": seconds / args.steps}  # the whole run (caches, prior images) over its steps
    result.write_text(json.dumps(row))
    return row


def plot(rows: list[dict], png: str) -> None:
    """Fidelity against parameters (log scale) as a PNG: matplotlib when installed, else a plain PIL drawing."""
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib
    except ImportError:
        _plot_pil(rows, png)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["params"], r["subject_fidelity"], color="C1" if r["row"].startswith("tlora") else "C0")
        ax.annotate(r["row"], (r["params"], r["subject_fidelity"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("stored parameters")
    ax.set_ylabel("subject_fidelity")
    ax.set_title("micro subject set: fidelity vs adapter size")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def _plot_pil(rows: list[dict], png: str) -> None:
    """The plot drawn with PIL: log-scale parameter axis with ticks, fidelity axis from the data's
    floor, the default LoRA's fidelity - 0.02 and half its size as guide lines."""
    import math

    from PIL import Image, ImageDraw

    w, h, left, bottom, top, right = 720, 460, 70, 60, 30, 20
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs = [math.log10(r["params"]) for r in rows]
    lo, hi = math.floor(min(xs) * 2) / 2, math.ceil(max(xs) * 2) / 2
    y_lo = min(0.5, math.floor(min(r["subject_fidelity"] for r in rows) * 10) / 10)
    px = lambda lx: left + (lx - lo) / (hi - lo) * (w - left - right)  # noqa: E731
    py = lambda f: h - bottom - (f - y_lo) / (1.0 - y_lo) * (h - bottom - top)  # noqa: E731
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(int(lo * 2), int(hi * 2) + 1):  # ticks every half decade
        x = px(k / 2)
        d.line([x, h - bottom, x, h - bottom + 5], fill="black")
        d.text((x - 18, h - bottom + 8), f"{10 ** (k / 2):,.0f}", fill="black")
    f = y_lo
    while f <= 1.0001:
        d.line([left - 5, py(f), left, py(f)], fill="black")
        d.text((left - 35, py(f) - 6), f"{f:.1f}", fill="black")
        f += 0.1
    ref = next((r for r in rows if r["row"] == "lora-r16"), None)
    if ref:  # the criterion: at most half the default LoRA's size, fidelity within 0.02 of it
        gray = (150, 150, 150)
        d.line([left, py(ref["subject_fidelity"] - 0.02), w - right, py(ref["subject_fidelity"] - 0.02)], fill=gray)
        d.line([px(math.log10(ref["params"] / 2)), top, px(math.log10(ref["params"] / 2)), h - bottom], fill=gray)
        d.text((left + 4, py(ref["subject_fidelity"] - 0.02) + 2), "default LoRA - 0.02", fill=gray)
        d.text((px(math.log10(ref["params"] / 2)) + 3, top + 3), "half its size", fill=gray)
    order = sorted(range(len(rows)), key=lambda i: xs[i])
    for n, i in enumerate(order):
        r = rows[i]
        x, y = px(xs[i]), py(r["subject_fidelity"])
        color = (220, 110, 0) if r["row"].startswith("tlora") else (30, 90, 200)
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        d.text((x + 6, y - 16 if n % 2 else y + 4), r["row"], fill=color)  # alternate sides: neighbours overlap less
    d.text((left, h - bottom + 26), "stored parameters (log scale)", fill="black")
    d.text((4, 8), "subject_fidelity (best lr of the search); orange: TLoRA", fill="black")
    img.save(png)


def repeat_row(name: str, lr: str, args: argparse.Namespace, subject_dir: Path, shape: str) -> dict:
    """One row at one lr over ``--train-seeds`` x ``--eval-seeds``: per training seed the mean over eval
    seeds, then the mean over training seeds (training seed 0 is the grid's own run and result)."""
    per_train = []
    for ts in (int(x) for x in args.train_seeds.split(",")):
        out = Path(args.out) / (f"{name}-lr{lr}" if ts == 0 else f"{name}-lr{lr}-seed{ts}")
        log = Path(args.out) / f"{out.name}.log"
        if not any(out.glob("*.safetensors")):
            studio("train", "--kind", "subject", "--images", str(subject_dir), "--base", "micro", "--out", str(out),
                   "--steps", str(args.steps), "--lr", lr, "--no-register", "--checkpoint-every", "0", "--seed",
                   str(ts), *ROWS[name], log=log)
        evals = []
        for es in (int(x) for x in args.eval_seeds.split(",")):
            f = out / ("result.json" if ts == 0 and es == 0 else f"eval{es}.json")
            if not f.is_file():  # base_drift is the grid's (eval seed 0 of training seed 0); skipped here
                f.write_text(studio("eval", "subject", "--base", "micro", "--adapter", str(out), "--subject", shape,
                                    "--seed", str(es), "--drift-n", "0", "--json", log=log))
            evals.append(json.loads(f.read_text()))
        per_train.append({k: sum(e[k] for e in evals) / len(evals) for k in ("subject_fidelity", "prompt_fidelity")})
    mean = {k: sum(t[k] for t in per_train) / len(per_train) for k in ("subject_fidelity", "prompt_fidelity")}
    return {"row": name, "lr": float(lr), "per_train_seed": per_train, **mean}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lrs", default="1e-3,2e-3", help="comma-separated learning rates tried for every row")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows of: {', '.join(ROWS)}")
    ap.add_argument("--out", default="out/param-efficiency")
    ap.add_argument("--png", default="docs/images/param_efficiency.png")
    ap.add_argument("--train-seeds", default="", help="repeat the rows over these training seeds (e.g. 0,1,2) "
                    "and --eval-seeds, and print means instead of the grid (no plot)")
    ap.add_argument("--eval-seeds", default="0,1", help="with --train-seeds: eval noise seeds per adapter")
    args = ap.parse_args()
    subject_dir = sorted(Path("assets/samples").glob("*subject*"))[0]
    shape = re.sub(r"[-_].*", "", subject_dir.name.split("subject", 1)[1].lstrip("-_"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.train_seeds:
        for name in args.rows.split(","):
            for lr in args.lrs.split(","):
                r = repeat_row(name, lr, args, subject_dir, shape)
                per = " ".join(f"{t['subject_fidelity']:.3f}/{t['prompt_fidelity']:.3f}" for t in r["per_train_seed"])
                print(f"{name:<16} lr {lr:<6} training seeds {args.train_seeds}: subject/prompt per seed {per}  "
                      f"mean subject {r['subject_fidelity']:.3f} prompt {r['prompt_fidelity']:.3f}", flush=True)
        return
    best = []
    for name in args.rows.split(","):
        runs = [run_row(name, lr, args, subject_dir, shape) for lr in args.lrs.split(",")]
        best.append(max(runs, key=lambda r: r["subject_fidelity"]))
        r = best[-1]
        print(f"{r['row']:<16} lr {r['lr']:<7g} params {r['params']:>8d}  subject {r['subject_fidelity']:.3f}  "
              f"prompt {r['prompt_fidelity']:.3f}  drift {r['base_drift']:.3f}  {r['s_per_step']:.3f} s/step (whole run)",
              flush=True)
    plot(best, args.png)
    print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
