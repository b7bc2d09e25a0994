"""CPU seconds per distillation step of EfficientDM and of QAT on micro, same trajectories and batch.

    OMP_NUM_THREADS=1 python bench/quant_step_cost.py [--wbits 4] [--abits 8] [--samples 8]

One short epoch of each method (``--samples`` trajectories, one batch, 20 steps on micro);
process CPU time between the first and the last step, so the calibration and the load of a
shared machine drop out. With the per-step costs, the default budgets (2 epochs against 10 of
the same 32 trajectories) give each method's distillation time; docs/efficientdm.md uses it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wbits", type=int, default=4)
    ap.add_argument("--abits", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8, help="trajectories (one optimizer batch)")
    args = ap.parse_args(argv)

    from studio.loading import load_pipeline
    from studio.machine import describe
    from studio.quant import QuantConfig, quantize

    sys.stdout.write(describe() + "\n")
    for method in ("efficientdm", "qat"):
        torch.manual_seed(0)
        pipe = load_pipeline("micro", dtype="fp32")
        marks: list[float] = []
        cfg = QuantConfig(method=method, wbits=args.wbits, abits=args.abits, epochs=1, samples=args.samples,
                          batch=args.samples, calib_samples=4)
        quantize(pipe, cfg, on_event=lambda e: marks.append(time.process_time()) if e.phase == "train" else None)
        per = (marks[-1] - marks[0]) / (len(marks) - 1)
        sys.stdout.write(f"W{args.wbits}A{args.abits} {method}: {per:.3f} CPU-s per distillation step "
                         f"({len(marks)} steps of {args.samples} trajectories)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
