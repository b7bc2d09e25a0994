"""Denoising-step speed and weight memory of exported low-bit micro UNets against FP32, side by side.

    python bench/quant_speed.py [--w8 DIR] [--w4 DIR] [--batch 128 16] [--rounds 5] [--asym]

Without --w8/--w4 the bench quantizes micro itself with PTQ min-max into a temporary folder
(speed and memory do not depend on how the parameters were found). Each round times one
denoising step (one UNet call at a calibration timestep, the classifier-free-guidance batch)
of every model in turn, so load on a shared machine hits all of them alike; the medians are
compared. FP32 is the model as loaded (NCHW, as `studio generate` runs it); FP32 channels-last
is shown beside it, and FP32 channels-last with the group norm the integer model uses for NHWC
tensors (studio.kernels.cpu.group_norm: torch's own is slow on channels-last); the ratios are taken
against the fastest of the three (the best float baseline of that batch). The integer models run
as `load_pipeline` gives them (fused block forwards, channels-last throughout: studio.quant.fused);
the W8 model also runs plain (STUDIO_FUSED=0's model: diffusers' forwards over the integer layers,
the reference the fused forwards are tested against), and the outputs' differences are printed.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# no sys.path insert: the repository root holds a folder named kernels, which would shadow the PyPI
# "kernels" package that transformers probes for (studio is installed, editable, in the venv)

log = logging.getLogger("bench.quant_speed")


def _make(wbits: int, abits: int, folder: Path, weight_sym8: bool = True) -> Path:
    from studio.quant import QuantConfig, run_job

    run_job("micro", QuantConfig(method="ptq-minmax", wbits=wbits, abits=abits, calib_samples=8,
                                 weight_sym8=weight_sym8), folder)
    return folder


def _time(fn, wall: list[float], cpu: list[float]) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--w8", default=None, metavar="DIR", help="an exported W8A8 micro model")
    ap.add_argument("--w4", default=None, metavar="DIR", help="an exported W4A8 (or W4A4) micro model")
    ap.add_argument("--batch", type=int, nargs="+", default=[128, 16],
                    help="UNet batch sizes (128: the eval's 64 prompts with guidance; 16: 8 prompts)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--asym", action="store_true",
                    help="also time a W8A8 model with asymmetric 8-bit weights (PTQ min-max, weight_sym8=False: "
                         "the zero-point corrections of the kernels), fused and plain")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from studio import kernels
    from studio.loading import load_pipeline
    from studio.machine import describe
    from studio.quant.model import weight_memory

    print(describe())
    try:
        print(f"load average (1, 5, 15 min): {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    except OSError:
        pass
    print(f"kernels: linear {kernels.chosen('linear')}, conv {kernels.chosen('conv')}, "
          f"quantize {kernels.chosen('quantize')}")
    tmp = Path(tempfile.mkdtemp(prefix="quant-bench-"))
    w8 = Path(args.w8) if args.w8 else _make(8, 8, tmp / "w8a8")
    w4 = Path(args.w4) if args.w4 else _make(4, 8, tmp / "w4a8")

    from studio.quant import fused

    fp = load_pipeline("micro").unet.eval()
    fp_cl = load_pipeline("micro").unet.eval().to(memory_format=torch.channels_last)
    fp_cl_gn = load_pipeline("micro").unet.eval().to(memory_format=torch.channels_last)
    fused.fast_group_norms(fp_cl_gn)
    q8 = load_pipeline(w8).unet
    q8_plain = load_pipeline(w8).unet
    fused.unfuse(q8_plain)
    q4 = load_pipeline(w4).unet

    def tag(m: torch.nn.Module) -> str:
        mk = m.studio_quant_runtime.marker
        return f"W{mk['wbits']}A{mk['abits']} int"

    fp_rows = ("fp32", "fp32 channels-last", "fp32 CL + NHWC GN")
    models = {"fp32": fp, "fp32 channels-last": fp_cl, "fp32 CL + NHWC GN": fp_cl_gn, tag(q8): q8,
              tag(q8) + " plain": q8_plain, tag(q4): q4}
    if args.asym:
        wa = _make(8, 8, tmp / "w8a8-asym", weight_sym8=False)
        qa, qa_plain = load_pipeline(wa).unet, load_pipeline(wa).unet
        fused.unfuse(qa_plain)
        models.update({tag(qa) + " asym": qa, tag(qa) + " asym plain": qa_plain})
    sym = all(layer.int_weight().symmetric for layer in q8.studio_quant_runtime.layers.values())
    print(f"{tag(q8)}: {'symmetric' if sym else 'asymmetric (zero-point corrections)'} 8-bit weights; "
          f"{fused.fuse(q8)} fused blocks")
    ts = q8.studio_quant_runtime.clock.timesteps
    cross = fp.config.cross_attention_dim

    fp_bytes = weight_memory(fp)
    print(f"\nweight memory (Linear/Conv2d weights; quantized: integer weights + scales + zero points + "
          f"per-step activation parameters)")
    print(f"  fp32                {fp_bytes / 2**20:7.2f} MiB  1.000x")
    for name, m in [(k, v) for k, v in models.items() if k.endswith(("int", "asym"))]:
        rt = m.studio_quant_runtime
        with torch.no_grad():  # one call fills the kernels' caches (oneDNN prepacked weights)
            m(torch.randn(2, 4, 16, 16), torch.tensor(ts[0]), torch.randn(2, 77, cross))
        print(f"  {name:<18}  {rt.stored_bytes() / 2**20:7.2f} MiB  {rt.stored_bytes() / fp_bytes:.3f}x stored, "
              f"{rt.resident_bytes() / fp_bytes:.3f}x resident with kernel caches")

    for batch in args.batch:
        x = torch.randn(batch, 4, 16, 16)
        e = torch.randn(batch, 77, cross)
        wall: dict[str, list[float]] = {k: [] for k in models}
        cpu: dict[str, list[float]] = {k: [] for k in models}
        with torch.no_grad():
            for m in models.values():  # warm-up
                m(x, torch.tensor(ts[0]), e)
            t0 = torch.tensor(ts[0])
            y_fp, y_q, y_plain = fp(x, t0, e).sample, q8(x, t0, e).sample, q8_plain(x, t0, e).sample
            print(f"\nbatch {batch}: mean abs difference of the outputs: fused vs plain {tag(q8)} "
                  f"{float((y_q - y_plain).abs().mean()):.2e}, {tag(q8)} vs fp32 "
                  f"{float((y_q - y_fp).abs().mean()):.2e}")
            for r in range(args.rounds):
                t = torch.tensor(ts[r % len(ts)])
                for name, m in models.items():
                    _time(lambda: m(x, t, e), wall[name], cpu[name])
        base_w = min(statistics.median(wall[k]) for k in fp_rows)
        base_c = min(statistics.median(cpu[k]) for k in fp_rows)
        print(f"one denoising step, UNet batch {batch} (median of {args.rounds} interleaved rounds; wall time, "
              f"and the process's CPU time, which other jobs on a shared machine disturb less; x = the best "
              f"fp32 row's time / this row's)")
        for name in models:
            w, c = statistics.median(wall[name]), statistics.median(cpu[name])
            print(f"  {name:<20} wall {w * 1e3:8.1f} ms  x{base_w / w:5.2f}   cpu {c * 1e3:8.1f} ms  "
                  f"x{base_c / c:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
