"""Training step time under each memory allocator: glibc's malloc against tcmalloc / jemalloc (studio.allocator).

    python bench/allocator.py [--base micro] [--steps 40] [--rounds 3]

The studio trainer and the plain diffusers-example loop of ``bench/train_throughput.py`` (same
settings: micro, batch 4, rank-8 attention LoRA, no prior), each in a fresh process per
allocator, in ``--rounds`` alternating rounds (the machine's speed drifts). Prints the median
ms/step of each (loop, allocator) and each allocator's time over the system allocator's; the
first line names the CPU kind. What the ``studio`` command gains by re-executing itself under
tcmalloc (docs/training.md); the one-process ratio of ``train_throughput.py`` does not change with
the allocator, since both loops share it there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(loop: str, base: str, images: str, steps: int) -> None:
    """One timed run in this process: prints {"ms": ...}."""
    sys.path.insert(0, str(HERE))
    from train_throughput import plain_loop, studio_loop

    fn = studio_loop if loop == "studio" else plain_loop
    fn(base, images, 3, 4, 8, 0)  # warm-up: first-call costs out of the timed run
    print(json.dumps({"ms": fn(base, images, steps, 4, 8, 1) / steps * 1000}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="micro")
    ap.add_argument("--images", default=str(HERE.parent / "assets/samples/subject-heart-red"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", choices=["studio", "plain"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.base, args.images, args.steps)
        return
    from studio import allocator
    from studio.machine import describe

    print(describe())
    libs = {"system": None}
    for name in ("tcmalloc", "jemalloc"):
        found = allocator.find(name)
        if found is not None:
            libs[name] = str(found[1])
    if len(libs) == 1:
        print("neither tcmalloc nor jemalloc is installed: nothing to compare (apt-get install libtcmalloc-minimal4)")
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for loop in ("studio", "plain"):
            for name, lib in libs.items():
                env = allocator.system_environment(os.environ)
                if lib:
                    env["LD_PRELOAD"] = f"{lib} {env['LD_PRELOAD']}".strip()
                out = subprocess.run([sys.executable, __file__, "--child", loop, "--base", args.base, "--images",
                                      args.images, "--steps", str(args.steps)], env=env, check=True,
                                     capture_output=True, text=True)
                ms = json.loads(out.stdout.strip().splitlines()[-1])["ms"]
                times.setdefault((loop, name), []).append(ms)
                print(f"  round {r + 1}: {loop:6s} {name:8s} {ms:7.1f} ms/step", flush=True)
    print(f"{args.base}, batch 4, {args.steps} steps per run, median of {args.rounds} rounds")
    for loop in ("studio", "plain"):
        base = statistics.median(times[(loop, "system")])
        for name in libs:
            m = statistics.median(times[(loop, name)])
            print(f"  {loop:6s} {name:8s} {m:7.1f} ms/step   {m / base:.2f}x system")


if __name__ == "__main__":
    main()
