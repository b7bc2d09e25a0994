"""DECOR over alpha on the micro model: the eval suite's numbers for each setting, and a Pareto plot.

    python bench/decor_pareto.py style --adapter DIR --texture checkered --train-images DIR \
        --decor "circle, red" [--rows words,words+end] [--alphas 0,0.25,0.5,0.75,1] \
        [--json out.jsonl] [--plot docs/images/decor-pareto-style.png]
    python bench/decor_pareto.py subject --adapter DIR --subject heart --decor "white" ...
    python bench/decor_pareto.py plot RESULTS.jsonl... --plot PNG [--suite style]   # re-plot saved lines

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


def _axes(suite: str) -> tuple[str, str]:
    """(x, y) keys of the Pareto plot: prompt fidelity against style (subject) fidelity."""
    return ("content_fidelity", "style_fidelity") if suite == "style" else ("prompt_fidelity", "subject_fidelity")


def _plot(lines: list[dict], path: str, suite: str) -> None:
    """One series per (adapter, rows, center), alpha 0 (no DECOR) shared by every series of its adapter."""
    xkey, ykey = _axes(suite)
    lines = [ln for ln in lines if ln["suite"] == suite]
    base = {ln["adapter"]: ln for ln in lines if ln["alpha"] == 0}
    groups: dict[tuple, list[dict]] = {}
    for ln in lines:
        if ln["alpha"] > 0:
            groups.setdefault((ln["adapter"], ln["rows"], ln.get("center", False)), []).append(ln)
    series = []
    for (adapter, rows, center), pts in groups.items():
        pts = sorted(pts + ([base[adapter]] if adapter in base else []), key=lambda ln: ln["alpha"])
        name = f"{adapter.rstrip('/').split('/')[-1]} rows={rows}" + (" centred" if center else "")
        series.append((name, [p[xkey] for p in pts], [p[ykey] for p in pts], [f"{p['alpha']:g}" for p in pts]))
    decor = lines[0]["decor"] if lines else ""
    line_plot(series, path, title=f"DECOR '{decor}' over alpha ({suite} adapter; labels: alpha)",
              xlabel=xkey, ylabel=ykey)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "plot":
        ap = argparse.ArgumentParser(description="re-plot saved JSON lines")
        ap.add_argument("files", nargs="+")
        ap.add_argument("--plot", required=True)
        ap.add_argument("--suite", default="style", choices=["style", "subject"])
        args = ap.parse_args(sys.argv[2:])
        lines = [json.loads(ln) for f in args.files for ln in open(f) if ln.strip().startswith("{")]
        _plot(lines, args.plot, args.suite)
        return
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
    lines = []
    for k, rows in enumerate(args.rows.split(",")):
        for alpha in alphas:
            if alpha == 0 and k > 0:
                continue  # no DECOR: the same run whatever the rows; the plot shares it
            decor = DecorConfig(args.decor, alpha=alpha, rows=rows, center=args.center) if alpha > 0 else None
            t0 = time.perf_counter()
            if args.suite == "style":
                kw = {"n": args.n} if args.n else {}
                r = suites.style_suite(pipe, judge, args.adapter, texture=args.texture,
                                       train_images=args.train_images, drift_n=0, decor=decor, **kw)
            else:
                r = suites.subject_suite(pipe, judge, args.adapter, subject=args.subject, color=args.color,
                                         n=args.n, drift_n=0, decor=decor)
            line = {"rows": rows, "alpha": alpha, "center": args.center, "decor": args.decor, "adapter": args.adapter,
                    "seconds": round(time.perf_counter() - t0, 1), **r}
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()
            if args.json:
                with open(args.json, "a") as fh:
                    fh.write(json.dumps(line) + "\n")
            lines.append(line)
    if args.plot:
        _plot(lines, args.plot, args.suite)


if __name__ == "__main__":
    main()
