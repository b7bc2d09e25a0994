"""`studio quantize`: a low-bit model (EfficientDM or a baseline) exported as a folder load_pipeline reads."""

from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from studio.quant.config import METHODS, QuantConfig

    d = QuantConfig()
    p = sub.add_parser(
        "quantize", help="make a low-bit model (EfficientDM, PTQ or QAT) that runs on integer kernels",
        description="Quantize a base model's denoiser to W8A8, W4A8 or W4A4 and export it as a folder that "
                    "`--base DIR` loads everywhere (generate, eval). EfficientDM: QALoRA + temporal LSQ with "
                    "data-free distillation from the full-precision model (docs/efficientdm.md).")
    p.add_argument("--base", required=True, metavar="SPEC", help="micro, a diffusers folder, a checkpoint file")
    p.add_argument("--adapter", default=None, metavar="SPEC",
                   help="fuse this adapter (a library name or path, NAME[:WEIGHT]) into the base before quantizing")
    p.add_argument("--wbits", type=int, default=d.wbits, choices=[4, 8], help="weight bits (default 8)")
    p.add_argument("--abits", type=int, default=d.abits, choices=[4, 8], help="activation bits (default 8)")
    p.add_argument("--method", default=d.method, choices=METHODS, help=f"default {d.method}")
    p.add_argument("--rank", type=int, default=d.rank, help=f"QALoRA rank (default {d.rank})")
    p.add_argument("--epochs", type=int, default=None,
                   help="distillation passes over the prompts (default 2 for efficientdm, 10 for qat)")
    p.add_argument("--samples", type=int, default=d.samples, help=f"trajectories per epoch (default {d.samples})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"trajectories per optimizer step (default {d.batch})")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate in units of the weight step size (default 0.03 for efficientdm, 0.001 for qat)")
    p.add_argument("--act-lr", type=float, default=d.act_lr,
                   help=f"activation quantizer lr, relative to its step size (default {d.act_lr}; 0 freezes them)")
    p.add_argument("--calib-samples", type=int, default=d.calib_samples,
                   help=f"trajectories for the activation calibration (default {d.calib_samples})")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps of the calibration grid (default: the model's, 20 on micro)")
    p.add_argument("--guidance", type=float, default=None, help="guidance of the trajectories (default: the model's)")
    p.add_argument("--prompts", default=None, metavar="FILE", help="prompts for the trajectories, one per line")
    p.add_argument("--weight-zero-point", default="sym" if d.weight_sym8 else "asym", choices=["sym", "asym"],
                   help="8-bit weights: sym fixes each output channel's zero point at the middle code (the int8 "
                        "kernels then need no zero-point correction: faster), asym takes min/max zero points as "
                        "the paper does (default sym; 4-bit weights are asymmetric either way)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of prompts and noise")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda if present)")
    p.add_argument("--out", required=True, metavar="DIR", help="a new folder for the quantized model")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object on the last line")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    """The QuantConfig of the parsed flags (validation raises StudioError)."""
    from studio.quant.config import QuantConfig

    return QuantConfig(wbits=args.wbits, abits=args.abits, method=args.method, rank=args.rank, epochs=args.epochs,
                       samples=args.samples, batch=args.batch, lr=args.lr, act_lr=args.act_lr,
                       calib_samples=args.calib_samples, steps=args.steps, guidance=args.guidance, seed=args.seed,
                       device=args.device, prompts=args.prompts,
                       weight_sym8=getattr(args, "weight_zero_point", "sym") == "sym")


def run(args: argparse.Namespace) -> int:
    from studio.quant import run_job

    cfg = config_from_args(args)
    from studio.trainers.cli import ProgressBar

    report = run_job(args.base, cfg, args.out, adapter=args.adapter, on_event=ProgressBar())
    if args.json:
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        sys.stdout.write(f"{args.out}\n")
    log.info("W%dA%d %s in %.0f s (calibration %.0f s, distillation %s s)", cfg.wbits, cfg.abits, cfg.method,
             report["total_s"], report["calibrate_s"], report.get("distill_s", 0))
    return 0
