"""`studio decor analyze`: the component analysis of a prompt's embeddings (docs/decor.md)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger(__name__)

DEFAULT_PLOT = "out/decor-analysis.png"


def register(sub: argparse._SubParsersAction) -> None:
    from studio.cli import add_group
    from studio.commands.generate import add_model_args
    from studio.text.decor import ROWS

    dsub = add_group(sub, "decor", "action", "ACTION",
                     help="DECOR: analyse prompt embeddings (the projection itself: generate --decor)",
                     description="DECOR projects unwanted words out of prompt embeddings; `studio generate "
                                 "--decor WORDS` applies it, `studio decor analyze` shows the components.")
    a = dsub.add_parser("analyze", help="singular values and token loadings of a prompt's embeddings",
                        description="Decompose the prompt's word-token encoder outputs (X = A S V^T) on each text "
                                    "encoder: singular values, and which tokens load on each component; with "
                                    "--decor, each token's share inside the unwanted words' span. A table on stdout "
                                    "(or --json) and a PNG plot.")
    add_model_args(a, base_required=False)
    a.add_argument("--prompt", required=True, help="the prompt to analyse")
    a.add_argument("--adapter", action="append", default=[], metavar="SPEC",
                   help="mix this adapter in first (a library name or path, as in generate --adapter; repeatable)")
    a.add_argument("--decor", default="", metavar="WORDS", help='unwanted words, e.g. "circle, red": their span')
    a.add_argument("--rows", default="words", choices=ROWS, help="which rows to decompose (default: words)")
    a.add_argument("--top", type=int, default=3, help="tokens listed per component (default 3)")
    a.add_argument("--plot", default=DEFAULT_PLOT, metavar="PNG", help=f"the plot (default {DEFAULT_PLOT})")
    a.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    a.set_defaults(func=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    """Load the model (and adapters), analyse the prompt, print the table and write the plot."""
    import contextlib

    from studio.commands.generate import load_from_args
    from studio.errors import StudioError
    from studio.mixing import Mixer, as_spec
    from studio.text.analysis import analyze, format_table, plot, to_json
    from studio.text.decor import DecorConfig

    if not args.prompt.strip():
        raise StudioError("--prompt: give the prompt to analyse")
    if args.top < 1:
        raise StudioError(f"--top {args.top}: must be at least 1")
    decor = DecorConfig(args.decor) if args.decor.strip() else None
    specs = [as_spec(a) for a in args.adapter]  # a bad spec fails before the model loads
    args.base = args.base or "micro"
    pipe = load_from_args(args)
    with contextlib.ExitStack() as stack:
        if specs:
            stack.enter_context(Mixer(pipe, specs))
        results = analyze(pipe, args.prompt, decor, rows=args.rows)
    if not any(len(r.components.tokens) for r in results):
        raise StudioError(f"--prompt {args.prompt!r}: no rows to analyse")
    title = args.prompt + (f"  [unwanted: {decor.text}]" if decor else "")
    path = plot(results, args.plot, title)
    if args.json:
        sys.stdout.write(json.dumps({**to_json(results, args.prompt), "plot": str(path)}) + "\n")
    else:
        sys.stdout.write(format_table(results, args.prompt, decor, args.top) + f"\nplot: {path}\n")
    return 0
