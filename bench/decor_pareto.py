"""DECOR over alpha on the micro model: the eval suite's numbers for each setting, and a Pareto plot.

    python bench/decor_pareto.py style --adapter DIR --texture checkered --train-images DIR \
        --decor "circle, red" [--rows words,words+end] [--alphas 0,0.25,0.5,0.75,1] \
        [--json out.jsonl] [--plot docs/images/decor-pareto-style.png]
    python bench/decor_pareto.py subject --adapter DIR --subject heart --decor "white" ...

Loads the model and the judge once and runs `studio eval style` (or `subject`) for every
(rows, alpha) pair, with the same prompts and seeds each time (alpha 0 is the run without
DECOR). One JSON line per setting; the plot puts style (subject) fidelity against prompt
fidelity (style: content_fidelity; subject: prompt_fidelity), one line per rows choice, each
point labelled with its alpha, and the leakage (style) in the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from studio import load_pipeline
from studio.evals import suites
from studio.logs import setup_logging
from studio.micro.judge import load_judge
from studio.text.decor import DecorConfig
from studio.text.plots import line_plot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite", choices=["style", "subject"])
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--decor", required=True, help="unwanted words, comma-separated")
    ap.add_argument("--texture", default="checkered")
    ap.add_argument("--train-images", default=None)
    ap.add_argument("--subject", default="heart")
    ap.add_argument("--color", default=None)
    ap.add_argument("--rows", default="words", help="comma list of row choices")
    ap.add_argument("--alphas", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--center", action="store_true", help="DecorConfig.center")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--json", default=None, help="append the JSON lines to this file too")
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    setup_logging()
    pipe, judge = load_pipeline("micro"), load_judge()
    alphas = [float(a) for a in args.alphas.split(",")]
    series = []
    for rows in args.rows.split(","):
        xs, ys, labels = [], [], []
        for alpha in alphas:
            decor = DecorConfig(args.decor, alpha=alpha, rows=rows, center=args.center) if alpha > 0 else None
            t0 = time.perf_counter()
            if args.suite == "style":
                kw = {"n": args.n} if args.n else {}
                r = suites.style_suite(pipe, judge, args.adapter, texture=args.texture,
                                       train_images=args.train_images, drift_n=0, decor=decor, **kw)
                x, y = r["content_fidelity"], r["style_fidelity"]
            else:
                r = suites.subject_suite(pipe, judge, args.adapter, subject=args.subject, color=args.color,
                                         n=args.n, drift_n=0, decor=decor)
                x, y = r["prompt_fidelity"], r["subject_fidelity"]
            line = {"rows": rows, "alpha": alpha, "center": args.center, "decor": args.decor, "adapter": args.adapter,
                    "seconds": round(time.perf_counter() - t0, 1), **r}
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()
            if args.json:
                with open(args.json, "a") as fh:
                    fh.write(json.dumps(line) + "\n")
            xs.append(x)
            ys.append(y)
            labels.append(f"{alpha:g}")
        series.append((f"rows={rows}", xs, ys, labels))
    if args.plot:
        what = "style_fidelity" if args.suite == "style" else "subject_fidelity"
        prompt = "content_fidelity" if args.suite == "style" else "prompt_fidelity"
        line_plot(series, args.plot, title=f"DECOR '{args.decor}' over alpha ({args.suite} adapter)",
                  xlabel=prompt, ylabel=what)


if __name__ == "__main__":
    main()
