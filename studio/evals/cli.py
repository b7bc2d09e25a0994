"""`studio eval SUITE`: the evaluation bench on the micro world's judge.

Suites: ``judge``, ``base``, ``subject``, ``style``, ``quant`` (see :mod:`studio.evals.suites`) and
``compose`` (a subject and a style mixed: :mod:`studio.evals.compose`).
With ``--json`` the result is one JSON object on the last line of stdout; otherwise a table.
Progress and notes go to stderr through logging.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from studio.errors import StudioError

log = logging.getLogger(__name__)

SUITES: tuple[str, ...] = ("judge", "base", "subject", "style", "quant", "compose")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object (the last line of stdout)")
    # the judge's folder (default: assets/judge); tests point it at a smoke judge
    p.add_argument("--judge", default=None, metavar="DIR", help=argparse.SUPPRESS)


def _generation(p: argparse.ArgumentParser, n_help: str, n_default: int | None) -> None:
    from studio.commands.generate import add_model_args
    from studio.evals.suites import GenSettings

    d = GenSettings()
    add_model_args(p)
    p.add_argument("--n", type=int, default=n_default, help=n_help)
    p.add_argument("--steps", type=int, default=d.steps, help=f"denoising steps (default {d.steps})")
    p.add_argument("--guidance", type=float, default=d.guidance, help=f"guidance scale (default {d.guidance})")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="noise seed; the prompt sets are fixed, so a seed gives the same numbers every run")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"prompts per pipeline call (default {d.batch_size})")


def register(sub: argparse._SubParsersAction) -> None:
    from studio.evals.suites import DEFAULT_N, JUDGE_SEED, PER_PROMPT

    from studio.cli import add_group

    esub = add_group(sub, "eval", "suite", "SUITE",
                     help="measure the judge, a base model, an adapter or a quantized model",
                     description="Evaluation suites read by the micro world's judge. Each prints a table, or one "
                                 "JSON object with --json.")

    j = esub.add_parser("judge", help="judge accuracy per attribute on fresh renders of every concept")
    _common(j)
    j.add_argument("--n", type=int, default=DEFAULT_N["judge"], help=f"renders (default {DEFAULT_N['judge']})")
    j.add_argument("--seed", type=int, default=JUDGE_SEED, help=f"render seed (default {JUDGE_SEED}, not a "
                                                                 f"training seed)")
    j.set_defaults(func=run)

    b = esub.add_parser("base", help="prompt following of a base model, and held-out concept presence",
                        description="Generate a fixed set of fully specified prompts of seen concepts and a set "
                                    "naming held-out shapes/textures; the judge reads every image.")
    _common(b)
    _generation(b, f"images of seen concepts (default {DEFAULT_N['base']})", DEFAULT_N["base"])
    b.add_argument("--heldout-n", type=int, default=DEFAULT_N["heldout"],
                   help=f"images naming held-out shapes/textures (default {DEFAULT_N['heldout']})")
    b.set_defaults(func=run)

    s = esub.add_parser("subject", help="a subject adapter: subject/prompt fidelity, diversity, base drift",
                        description="DreamBench-style: re-contextualisation and property prompts with the "
                                    "adapter's trigger, plus base prompts without it to measure drift.")
    _common(s)
    _generation(s, f"subject images, cycling over the prompts (default {PER_PROMPT} per prompt)", None)
    _adapter_args(s)
    s.add_argument("--subject", required=True, metavar="SHAPE", help="the subject's shape, e.g. heart")
    s.add_argument("--color", default=None, help="the subject's colour, when it has one")
    s.add_argument("--class-word", default=None,
                   help="class noun after the trigger (default: adapter metadata studio.class_word, else 'shape')")
    s.set_defaults(func=run)

    st = esub.add_parser("style", help="a style adapter: style/content fidelity, leakage, base drift",
                         description="Prompts 'a COLOR SHAPE on a BG background in TOKEN style' over seen content.")
    _common(st)
    _generation(st, f"styled images (default {DEFAULT_N['style']})", DEFAULT_N["style"])
    _adapter_args(st)
    st.add_argument("--texture", required=True, help="the texture the style should produce, e.g. checkered")
    st.add_argument("--train-images", default=None, metavar="DIR",
                    help="the style's training set (captions or images): its dominant shape/colour for leakage")
    st.set_defaults(func=run)

    q = esub.add_parser("quant", help="a quantized model against its full-precision reference",
                        description="Base-suite accuracy of --base, its joint-accuracy drop against --reference, "
                                    "and the judge-FID between the two on the same prompts and seeds.")
    _common(q)
    _generation(q, f"images per model (default {DEFAULT_N['base']})", DEFAULT_N["base"])
    q.add_argument("--reference", required=True, metavar="SPEC", help="the full-precision model to compare with")
    q.set_defaults(func=run)

    from studio.evals.compose import add_parser as add_compose

    add_compose(esub)

    from studio.autolora.cli import add_eval_parser as add_retrieval

    add_retrieval(esub)


def _adapter_args(p: argparse.ArgumentParser) -> None:
    from studio.evals.suites import DEFAULT_N

    p.add_argument("--adapter", required=True, metavar="PATH",
                   help="LoRA .safetensors file, or a folder with pytorch_lora_weights.safetensors")
    p.add_argument("--token", default=None, help="trigger word (default: adapter metadata studio.trigger, else sks)")
    p.add_argument("--drift-n", type=int, default=DEFAULT_N["drift"],
                   help=f"base prompts without the trigger, for base_drift (default {DEFAULT_N['drift']}; 0: skip)")
    from studio.commands.generate import add_decor_args

    add_decor_args(p)


def _load_judge(folder: str | None):
    from studio.micro.judge import default_judge_dir, load_judge

    try:
        return load_judge(folder)
    except (FileNotFoundError, ValueError) as exc:
        raise StudioError(f"judge {folder or default_judge_dir()}: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    """Run the suite named by ``args.suite`` and print its result."""
    from studio.evals import suites

    if args.suite == "judge":
        result = suites.judge_suite(_load_judge(args.judge), n=args.n, seed=args.seed)
        return _emit(result, args.json)

    settings = suites.GenSettings(steps=args.steps, guidance=args.guidance, seed=args.seed,
                                  batch_size=args.batch_size)
    # cheap checks first: a typo should not cost a model load
    if args.suite == "subject":
        suites.check_choice("shape", args.subject, "subject")
        if args.color is not None:
            suites.check_choice("color", args.color)
    if args.suite == "style":
        suites.check_choice("texture", args.texture)
        if args.train_images is not None and not Path(args.train_images).expanduser().is_dir():
            raise StudioError(f"--train-images {args.train_images}: no such folder; pass the folder of the "
                              f"style's training images")
    if args.suite in ("subject", "style"):
        suites.adapter_metadata(args.adapter)  # the file exists and is a safetensors file
    from studio.commands.generate import decor_from_args

    decor = decor_from_args(args) if args.suite in ("subject", "style") else None
    judge = _load_judge(args.judge)

    from studio.commands.generate import load_from_args

    pipe = load_from_args(args)
    if args.suite == "base":
        result = suites.base_suite(pipe, judge, n=args.n, heldout_n=args.heldout_n, settings=settings)
    elif args.suite == "subject":
        result = suites.subject_suite(pipe, judge, args.adapter, subject=args.subject, color=args.color,
                                      token=args.token, class_word=args.class_word, n=args.n, drift_n=args.drift_n,
                                      settings=settings, decor=decor)
    elif args.suite == "style":
        result = suites.style_suite(pipe, judge, args.adapter, texture=args.texture, token=args.token,
                                    train_images=args.train_images, n=args.n, drift_n=args.drift_n,
                                    settings=settings, decor=decor)
    else:
        from studio.loading import load_pipeline

        reference = load_pipeline(args.reference, dtype=args.dtype, device=args.device,
                                  trust_pickle=args.trust_pickle, config=args.config)
        result = suites.quant_suite(pipe, reference, judge, n=args.n, settings=settings)
    return _emit(result, args.json)


def _rows(prefix: str, value: Any) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in _rows(f"{prefix}.{k}" if prefix else k, v)]
    if value is None:
        return [(prefix, "n/a")]
    return [(prefix, f"{value:.4f}" if isinstance(value, float) else str(value))]


def format_table(result: dict[str, Any]) -> str:
    """A result dict as aligned ``name  value`` lines (a per-prompt breakdown as its own table)."""
    rows = _rows("", {k: v for k, v in result.items() if k not in ("suite", "by_prompt", "by_asked")})
    width = max(len(k) for k, _ in rows)
    lines = [f"{result['suite']} suite"] + [f"  {k:<{width}}  {v}" for k, v in rows]
    per = result.get("by_prompt") or {}
    if per:
        cols = [c for c in next(iter(per.values())) if c != "n"]
        pw = max(len(p) for p in per)
        lines += ["", f"  {'per prompt':<{pw}}  " + "  ".join(f"{c:>8}" for c in cols)]
        lines += [f"  {p:<{pw}}  " + "  ".join(f"{r[c]:8.2f}" for c in cols) for p, r in per.items()]
    for attr, groups in (result.get("by_asked") or {}).items():
        if not groups:
            continue
        cols = [c for c in next(iter(groups.values())) if c != "n"]
        w = max(len(attr) + 4, *(len(v) for v in groups))
        lines += ["", f"  {'per ' + attr:<{w}}  " + "  ".join(f"{c:>8}" for c in cols)]
        lines += [f"  {v:<{w}}  " + "  ".join(f"{r[c]:8.2f}" for c in cols) for v, r in groups.items()]
    return "\n".join(lines)


def _emit(result: dict[str, Any], as_json: bool) -> int:
    sys.stdout.write((json.dumps(result) if as_json else format_table(result)) + "\n")
    sys.stdout.flush()
    return 0
