"""`studio realsize make MODEL`: a full-size, randomly initialised SD 1.5 / SD 2.1 / SDXL checkpoint."""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from studio.cli import add_group
    from studio.realsize import MODELS

    group = add_group(sub, "realsize", "action", "ACTION", help="full-size random-weight base models (offline)",
                      description="Build full-size SD 1.5, SD 2.1 (768-v) and SDXL base models with seeded random "
                                  "weights, as a diffusers folder and an A1111 single file, to run every path of "
                                  "the studio at real size offline (docs/realsize.md).")
    p = group.add_parser("make", help="build one model into the cache (or --out) and print where it is")
    p.add_argument("model", choices=sorted(MODELS), help="which architecture")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder for the build (default: $STUDIO_HOME/cache/realsize/MODEL-seedN, else "
                        "~/.cache/diffusion-studio/realsize/MODEL-seedN)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--width-div", dest="width_div", type=int, default=1,
                   help="divide every width by this (same layers and key names; for quick tests; default 1)")
    p.add_argument("--force", action="store_true", help="rebuild even when a complete build is there")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from studio.realsize import make

    files = make(args.model, args.out, seed=args.seed, width_div=args.width_div, force=args.force)
    info = {"model": files.model, "folder": str(files.folder), "single_file": str(files.single_file),
            "parameters": files.parameters}
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"diffusers folder  {info['folder']}")
    print(f"single file       {info['single_file']}")
    total = sum(files.parameters.values())
    print(f"parameters        {total / 1e6:.1f}M (" +
          ", ".join(f"{c} {n / 1e6:.1f}M" for c, n in files.parameters.items()) + ")")
    return 0
