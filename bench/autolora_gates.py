"""AutoLoRA gated fusion against static merges: the compose table of docs/autolora.md ("Gated fusion").

    python bench/autolora_gates.py styles --out DIR     # the extra adapters: styles (trigger zwx), longer subjects
    python bench/autolora_gates.py compose --styles DIR --gates NAME=FILE [--gates NAME=FILE ...] \
        [--pairs heart-zigzag,hexagon-zigzag] [--weights 0.5,0.7,1] [--no-static] [--n N] [--json out.jsonl]
    python bench/autolora_gates.py single --styles DIR --gates NAME=FILE [...] [--json out.jsonl]

``styles`` trains small adapters that no gate file has seen: style adapters with their own trigger
``zwx`` (the committed zoo has no held-out style, and every zoo adapter's trigger is ``sks``) with
the zoo's recipe (rank 4 on attention, 100 steps, 8 rendered images, no prior, no trigger
embedding, ``studio train``) on freshly rendered sets of the two textures the base model never
learned, and subject adapters with the same recipe run for 400 steps (the zoo's 100-step held-out
subjects are too weak to compose).

``compose`` loads micro and the judge once and runs the compose suite (studio/evals/compose.py,
the code of ``studio eval compose``) for each pair of (held-out zoo subject, extra style): every
static weight pair of the grid, then the pair ``gated:`` at weights 1/1 with each gate file, same
prompts and noise. ``single`` runs each adapter alone on its own suite's prompts (the subject
suite's or the style suite's), statically and gated alone, same prompts and noise.

The gate file of a ``gated:`` mix is the bundled one unless the mixer is given another;
``studio eval compose`` has no flag for it, so this script points ``DEFAULT_GATES`` at each file
in turn (the row of the committed file is what ``studio eval compose --adapter gated:...`` gives).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from studio.autolora.zoo import Concept, _render
from studio.evals import compose, suites
from studio.evals.suites import GenSettings
from studio.logs import setup_logging
from studio.machine import describe
from studio.mixing import AdapterSpec, Mixer

log = logging.getLogger("bench.autolora_gates")
ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "assets" / "autolora" / "zoo"
STYLE_TOKEN = "zwx"
STYLES = {"zigzag": 5001, "checkered": 5002}  # texture -> seed (images and training)
# the zoo's subject adapters (100 steps) are too weak to compose (heart-blue alone: the judge sees its heart in
# 0.08 of the composed prompts); these are the zoo recipe run longer, and no gate file sees them either
SUBJECT_STEPS = 400
SUBJECTS = {"subject-heart-blue-400": ("heart", "blue", 5003), "subject-crescent-green-400": ("crescent", "green", 5004),
            "subject-hexagon-pink-400": ("hexagon", "pink", 5005)}  # a shape the base knows: the trigger maps to it
# held-out zoo subjects (every fifth concept) paired with an extra style: name -> (subject adapter, shape, colour, texture)
# a "zoo:" subject is the committed zoo's held-out adapter, else one of SUBJECTS in the extra folder
PAIRS = {
    "heart-zigzag": ("subject-heart-blue-400", "heart", "blue", "zigzag"),
    "crescent-checkered": ("subject-crescent-green-400", "crescent", "green", "checkered"),
    "hexagon-zigzag": ("subject-hexagon-pink-400", "hexagon", "pink", "zigzag"),
    "zooheart-zigzag": ("zoo:subject-heart-blue", "heart", "blue", "zigzag"),
}


def _subject_file(name: str, extra: str) -> str:
    return str(ZOO / name[4:] / LORA) if name.startswith("zoo:") else str(Path(extra) / name / LORA)
LORA = "pytorch_lora_weights.safetensors"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _train(out: Path, name: str, concept: Concept, kind: str, token: str, steps: int, seed: int) -> None:
    folder = out / name
    if (folder / LORA).is_file():
        log.info("%s: already trained", folder)
        return
    images = out / "images" / name
    _render(concept, images, 8, seed)
    cmd = [sys.executable, "-m", "studio.cli", "train", "--kind", kind, "--images", str(images),
           "--base", "micro", "--out", str(folder), "--name", name, "--token", token,
           "--rank", "4", "--targets", "attention", "--steps", str(steps), "--no-prior", "--no-train-trigger",
           "--sample-every", "0", "--checkpoint-every", "0", "--seed", str(seed), "--no-register"]
    log.info("training %s: %s", name, " ".join(cmd))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    log.info("%s: %.0f s", name, time.perf_counter() - t0)


def styles(args: argparse.Namespace) -> None:
    """Render and train the extra adapters: styles (the zoo's settings, trigger zwx) and stronger subjects."""
    out = Path(args.out)
    for texture, seed in STYLES.items():
        _train(out, f"style-{texture}-{STYLE_TOKEN}", Concept("style", texture=texture), "style", STYLE_TOKEN,
               100, seed)
    for name, (shape, color, seed) in SUBJECTS.items():
        _train(out, name, Concept("subject", shape=shape, color=color), "subject", "sks", SUBJECT_STEPS, seed)


def _gate_files(items: list[str]) -> list[tuple[str, Path]]:
    out = []
    for it in items:
        name, _, file = it.partition("=")
        if not file or not Path(file).is_file():
            raise SystemExit(f"--gates {it}: give NAME=FILE of an existing gate file")
        out.append((name, Path(file)))
    return out


def _use_gates(file: Path) -> None:
    """Point the mixer's default gate file at ``file`` (what a ``gated:`` spec without gates= loads)."""
    import studio.autolora.gates as G

    G.DEFAULT_GATES = file


def compose_rows(args: argparse.Namespace, pipe, judge, settings: GenSettings) -> None:
    weights = [float(w) for w in args.weights.split(",")]
    gate_files = _gate_files(args.gates)
    out = open(args.json, "a") if args.json else None
    for pair in args.pairs.split(","):
        subj_name, shape, color, texture = PAIRS[pair]
        subj = _subject_file(subj_name, args.styles)
        style = str(Path(args.styles) / f"style-{texture}-{STYLE_TOKEN}" / LORA)
        roles = compose.resolve_roles([AdapterSpec(subj), AdapterSpec(style)], judge=judge)
        rows = []
        grid = [(ws, wt, None) for ws in weights for wt in weights]
        grid = [] if args.no_static else [(1.0, 0.0, None), (0.0, 1.0, None)] + grid
        grid += [(1.0, 1.0, g) for g in gate_files]
        for ws, wt, gate in grid:
            t0 = time.perf_counter()
            prefix = ""
            if gate is not None:
                _use_gates(gate[1])
                prefix = "gated:"
            specs = [prefix + f"{subj}:{ws:g}", prefix + f"{style}:{wt:g}"] if gate else \
                [AdapterSpec(subj, ws), AdapterSpec(style, wt)]
            r = compose.compose_suite(pipe, judge, specs, subject=shape, texture=texture, color=color, n=args.n,
                                      drift_n=0, settings=settings, roles=roles)
            r |= {"pair": pair, "subject_weight": ws, "style_weight": wt, "gates": gate[0] if gate else "static",
                  "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(r)
            if out:
                out.write(json.dumps(r) + "\n")
                out.flush()
            log.info("%s %s %g/%g: both %s subject %s style %s (%.0f s)", pair, r["gates"], ws, wt,
                     _fmt(r["both"]), _fmt(r["subject_fidelity"]), _fmt(r["style_fidelity"]), r["seconds"])
        print(f"\n# {pair}: {subj_name} ({roles.subject_token} {roles.class_word}) + style-{texture}-"
              f"{STYLE_TOKEN}; {rows[0]['n']} images per row, seed {settings.seed}, {settings.steps} steps, "
              f"guidance {settings.guidance}")
        print("| mix | subject w | style w | both | subject | style | prompt |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['gates']} | {r['subject_weight']:g} | {r['style_weight']:g} | {_fmt(r['both'])} | "
                  f"{_fmt(r['subject_fidelity'])} | {_fmt(r['style_fidelity'])} | {_fmt(r['prompt_fidelity'])} |")
        static = [r for r in rows if r["gates"] == "static" and r["subject_weight"] and r["style_weight"]]
        if not static:
            continue
        best = max(static, key=lambda r: r["both"] or 0.0)
        print(f"# best static {best['subject_weight']:g}/{best['style_weight']:g}: both {_fmt(best['both'])}; "
              + "; ".join(f"{r['gates']}: both {_fmt(r['both'])} ({(r['both'] or 0) - (best['both'] or 0):+.3f}, "
                          f"floor +0.10 {'met' if (r['both'] or 0) - (best['both'] or 0) >= 0.10 else 'not met'})"
                          for r in rows if r["gates"] != "static"))
        sys.stdout.flush()
    if out:
        out.close()


def _single(pipe, judge, spec, items, settings: GenSettings) -> dict[str, np.ndarray]:
    with Mixer(pipe, [spec]):
        images = suites.generate(pipe, items, settings)
    return suites.read_attributes(images, judge)


def single_rows(args: argparse.Namespace, pipe, judge, settings: GenSettings) -> None:
    """Each adapter alone on its own suite's prompts: static at weight 1, then gated alone with each gate file."""
    gate_files = _gate_files(args.gates)
    out = open(args.json, "a") if args.json else None
    cases = []
    for pair in args.pairs.split(","):
        subj_name, shape, color, texture = PAIRS[pair]
        cases.append(("subject", subj_name, _subject_file(subj_name, args.styles), shape, color))
        cases.append(("style", f"style-{texture}-{STYLE_TOKEN}",
                      str(Path(args.styles) / f"style-{texture}-{STYLE_TOKEN}" / LORA), texture, None))
    done = set()
    print("\n| adapter | suite | mix | fidelity | delta vs static | within 0.03 |")
    print("|---|---|---|---|---|---|")
    for kind, name, file, what, color in cases:
        if name in done:
            continue
        done.add(name)
        meta = suites.adapter_metadata(file)
        token = meta.get("studio.trigger") or suites.DEFAULT_TRIGGER
        if kind == "subject":
            items = suites.subject_items(token, meta.get("studio.class_word") or suites.DEFAULT_CLASS_WORD,
                                         color=color, n=args.n, seed=settings.seed)
        else:
            items = suites.style_items(token, what, n=args.n or suites.DEFAULT_N["style"], seed=settings.seed)
        static = None
        for gname, gfile in [("static", None)] + gate_files:
            t0 = time.perf_counter()
            if gfile is not None:
                _use_gates(gfile)
            seen = _single(pipe, judge, AdapterSpec(file) if gfile is None else f"gated:{file}", items, settings)
            if kind == "subject":  # the subject suite's subject_fidelity
                ok = [seen["shape"][i] == what and ("color" in it.asked or seen["color"][i] == color)
                      for i, it in enumerate(items)]
            else:  # the style suite's style_fidelity
                ok = suites._hits(seen, items, "texture")
            fid = float(np.mean(ok))
            static = fid if gfile is None else static
            r = {"adapter": name, "suite": kind, "gates": gname, "n": len(items), "fidelity": fid,
                 "delta": fid - static, "seconds": round(time.perf_counter() - t0, 1)}
            if out:
                out.write(json.dumps(r) + "\n")
                out.flush()
            print(f"| {name} | {kind} | {gname} | {fid:.3f} | {fid - static:+.3f} | "
                  f"{'-' if gfile is None else ('yes' if fid - static >= -0.03 else 'no')} |")
            sys.stdout.flush()
    if out:
        out.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("styles")
    s.add_argument("--out", required=True)
    for name in ("compose", "single"):
        c = sub.add_parser(name)
        c.add_argument("--styles", required=True, help="the folder `styles --out` wrote")
        c.add_argument("--gates", action="append", default=[], metavar="NAME=FILE")
        c.add_argument("--pairs", default="heart-zigzag,hexagon-zigzag", help=f"of {', '.join(PAIRS)}")
        c.add_argument("--weights", default="0.5,0.7,1", help="static grid, per adapter")
        c.add_argument("--no-static", action="store_true", help="compose: only the gated rows")
        c.add_argument("--n", type=int, default=None, help="images per row (default: the suite's)")
        c.add_argument("--seed", type=int, default=0)
        c.add_argument("--json", default=None, help="append one JSON line per row here")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    setup_logging()
    torch.set_num_threads(args.threads)
    if args.cmd == "styles":
        styles(args)
        return
    from studio import load_pipeline
    from studio.micro.judge import load_judge

    pipe, judge = load_pipeline("micro", device="cpu"), load_judge()
    settings = GenSettings(seed=args.seed)
    print(f"# {describe()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    (compose_rows if args.cmd == "compose" else single_rows)(args, pipe, judge, settings)


if __name__ == "__main__":
    main()
