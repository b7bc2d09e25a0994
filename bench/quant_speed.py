"""Denoising-step speed and weight memory of exported low-bit micro (or, with --base, real-size) UNets against FP32.

    python bench/quant_speed.py [--w8 DIR] [--w4 DIR] [--batch 128 16] [--rounds 5] [--asym]
    python bench/quant_speed.py --base sd15 [--resolution 512] [--width-div 16] [--rounds 3]

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

``--base`` (a diffusers folder, or the name of a seeded real-size model of studio.realsize such as
``sd15``, built or reused by ``studio.realsize.make``; ``--width-div`` for its narrow same-layout
twin) times a real-size UNet instead: W8A8 PTQ min-max of that base (calibrated on
``--calib-samples`` sampling trajectories of ``--calib-steps`` steps at ``--resolution``: the
cheapest calibration; speed and memory do not depend on the ranges found), exported and loaded as
``load_pipeline`` loads it, against FP32 (NCHW, and channels-last with the NHWC group norm), one
denoising step = one UNet call on the classifier-free-guidance batch (``--batch``, default 2) of
``resolution / 8`` latents. To keep the memory of a full-size run down, the plain (unfused) W8A8
forward is the same model unfused for one comparison call, and no W4 model is made.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
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


def _resolve_base(spec: str, width_div: int) -> Path:
    """A diffusers folder for ``--base``: a path, or a studio.realsize model name (built once, then reused)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if width_div != 1:
            raise SystemExit(f"--width-div {width_div}: only for a studio.realsize model name, not a folder ({spec})")
        return path
    from studio import realsize

    return Path(realsize.make(spec, width_div=width_div).folder)


def _make_base(base: Path, folder: Path, latent: int, samples: int, steps: int) -> tuple[Path, float]:
    """W8A8 PTQ min-max of ``base`` calibrated at ``latent`` x ``latent`` latents, exported to ``folder``;
    the folder and the seconds the job took."""
    from studio.loading import load_pipeline
    from studio.quant import QuantConfig, export_quantized, quantize

    t0 = time.perf_counter()
    cfg = QuantConfig(method="ptq-minmax", wbits=8, abits=8, calib_samples=samples, steps=steps, batch=1,
                      device="cpu")
    torch.manual_seed(cfg.seed)
    pipe = load_pipeline(str(base), device="cpu", dtype="fp32")
    size = pipe.unet.config.sample_size
    pipe.unet.register_to_config(sample_size=latent)  # the calibration trajectories' latent size
    report = quantize(pipe, cfg)
    pipe.unet.register_to_config(sample_size=size)
    export_quantized(pipe, folder, config=cfg.to_dict(), report=report)
    del pipe
    return folder, time.perf_counter() - t0


def _rss_gib(field: str = "VmRSS") -> float:
    """The process's resident memory (``VmHWM``: its peak) in GiB, from /proc/self/status."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _time(fn, wall: list[float], cpu: list[float]) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)



def _print_machine() -> None:
    """The CPU kind, the load and the integer kernels chosen: the lines every run of this bench starts with."""
    from studio import kernels
    from studio.machine import describe

    print(describe())
    try:
        print(f"load average (1, 5, 15 min): {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    except OSError:
        pass
    print(f"kernels: linear {kernels.chosen('linear')}, conv {kernels.chosen('conv')}, "
          f"quantize {kernels.chosen('quantize')}")

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--w8", default=None, metavar="DIR", help="an exported W8A8 micro model")
    ap.add_argument("--w4", default=None, metavar="DIR", help="an exported W4A8 (or W4A4) micro model")
    ap.add_argument("--batch", type=int, nargs="+", default=None,
                    help="UNet batch sizes (micro default 128 16: the eval's 64 prompts with guidance, and 8 prompts; "
                         "with --base default 2: one prompt with guidance)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--asym", action="store_true",
                    help="also time a W8A8 model with asymmetric 8-bit weights (PTQ min-max, weight_sym8=False: "
                         "the zero-point corrections of the kernels), fused and plain")
    ap.add_argument("--base", default=None, metavar="PATH_OR_NAME",
                    help="time a real-size UNet instead of micro: a diffusers folder or a studio.realsize name (sd15)")
    ap.add_argument("--resolution", type=int, default=None,
                    help="with --base: image size in pixels (latents resolution/8; default the model's own)")
    ap.add_argument("--width-div", type=int, default=1,
                    help="with --base NAME: the narrow same-layout build (e.g. 16) for a fast smoke run")
    ap.add_argument("--calib-samples", type=int, default=1, help="with --base: calibration prompts")
    ap.add_argument("--calib-steps", type=int, default=2, help="with --base: denoising steps of the calibration grid")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.base is not None:
        if args.w8 or args.w4 or args.asym:
            ap.error("--w8, --w4 and --asym are micro options; --base quantizes its own W8A8 model")
        return _main_base(args)
    if args.resolution is not None or args.width_div != 1:
        ap.error("--resolution and --width-div go with --base")
    args.batch = args.batch or [128, 16]

    from studio.loading import load_pipeline
    from studio.quant.model import weight_memory

    _print_machine()
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
    print("\nweight memory (Linear/Conv2d weights; quantized: integer weights + scales + zero points + "
          "per-step activation parameters)")
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
        with torch.no_grad():
            for m in models.values():  # warm-up
                m(x, torch.tensor(ts[0]), e)
            t0 = torch.tensor(ts[0])
            y_fp, y_q, y_plain = fp(x, t0, e).sample, q8(x, t0, e).sample, q8_plain(x, t0, e).sample
            print(f"\nbatch {batch}: mean abs difference of the outputs: fused vs plain {tag(q8)} "
                  f"{float((y_q - y_plain).abs().mean()):.2e}, {tag(q8)} vs fp32 "
                  f"{float((y_q - y_fp).abs().mean()):.2e}")
            _timed_rounds(models, x, e, ts, args.rounds, fp_rows,
                          f"one denoising step, UNet batch {batch} (median of {args.rounds} interleaved rounds; "
                          f"wall time, and the process's CPU time, which other jobs on a shared machine disturb "
                          f"less; x = the best fp32 row's time / this row's)")
    return 0


def _timed_rounds(models: dict, x: torch.Tensor, e: torch.Tensor, ts: list, rounds: int, fp_rows: list[str],
                  header: str) -> None:
    """Time every model once per round, interleaved (load hits all alike), and print the medians against the
    best fp32 row, with each row's round times."""
    wall: dict[str, list[float]] = {k: [] for k in models}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    for r in range(rounds):
        t = torch.tensor(ts[r % len(ts)])
        for name, m in models.items():
            _time(lambda: m(x, t, e), wall[name], cpu[name])
    base_w = min(statistics.median(wall[k]) for k in fp_rows)
    base_c = min(statistics.median(cpu[k]) for k in fp_rows)
    print(header)
    for name in models:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"  {name:<20} wall {w * 1e3:9.1f} ms  x{base_w / w:5.2f}   cpu {c * 1e3:9.1f} ms  x{base_c / c:5.2f}"
              f"   (rounds: {', '.join(f'{v * 1e3:.0f}' for v in wall[name])} ms)")


def _main_base(args: argparse.Namespace) -> int:
    """The --base run: FP32 and W8A8 of a real-size UNet, side by side (see the module docstring)."""
    from diffusers import UNet2DConditionModel

    base = _resolve_base(args.base, args.width_div)
    config = UNet2DConditionModel.load_config(base / "unet")
    latent = (args.resolution // 8) if args.resolution else int(config["sample_size"])
    batches = args.batch or [2]
    _print_machine()
    print(f"base {base}; latents {latent}x{latent} ({latent * 8} px), UNet batch {', '.join(map(str, batches))}")
    tmp = Path(tempfile.mkdtemp(prefix="quant-bench-"))
    try:
        return _time_base(args, base, tmp, latent, batches)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a real-size export is gigabytes


def _time_base(args: argparse.Namespace, base: Path, tmp: Path, latent: int, batches: list[int]) -> int:
    from diffusers import UNet2DConditionModel

    from studio.loading import trim_memory
    from studio.quant import fused
    from studio.quant.export import load_quantized_unet
    from studio.quant.model import weight_memory

    w8, make_s = _make_base(base, tmp / "w8a8", latent, args.calib_samples, args.calib_steps)
    print(f"W8A8 PTQ min-max ({args.calib_samples} calibration prompt(s), {args.calib_steps}-step grid, "
          f"{latent * 8} px): calibrated and exported in {make_s:.0f} s")

    trim_memory()  # the quantization job's freed heap back to the system, so that the growth below is the model's
    rss0 = _rss_gib()
    q8 = load_quantized_unet(w8)
    rt = q8.studio_quant_runtime
    ts = rt.clock.timesteps
    cross = q8.config.cross_attention_dim
    with torch.no_grad():  # one call fills the kernels' caches (oneDNN prepacked weights)
        q8(torch.randn(2, 4, 8, 8), torch.tensor(ts[0]), torch.randn(2, 77, cross))
    rss_q8 = _rss_gib() - rss0  # the loaded model, prepacked, after a call at 8x8 latents (small activations)
    fp = UNet2DConditionModel.from_pretrained(base / "unet", torch_dtype=torch.float32).eval()
    fp_cl_gn = UNet2DConditionModel.from_pretrained(base / "unet", torch_dtype=torch.float32).eval()
    fp_cl_gn.to(memory_format=torch.channels_last)
    fused.fast_group_norms(fp_cl_gn)
    n_fused = fused.fuse(q8)
    n_int = len(rt.layers)
    n_lin = sum(1 for m in q8.modules() if isinstance(m, torch.nn.Linear))
    n_conv = sum(1 for m in q8.modules() if isinstance(m, torch.nn.Conv2d))
    sym = all(layer.int_weight().symmetric for layer in rt.layers.values())
    print(f"W8A8 int: {n_int} integer layers ({n_lin} Linear and {n_conv} Conv2d left in float), "
          f"{'symmetric' if sym else 'asymmetric'} 8-bit weights, {n_fused} fused blocks")
    models = {"fp32": fp, "fp32 CL + NHWC GN": fp_cl_gn, "W8A8 int": q8}
    fp_rows = ("fp32", "fp32 CL + NHWC GN")

    fp_bytes = weight_memory(fp)
    n_fp_params = sum(p.numel() for p in fp.parameters())
    print(f"UNet: {n_fp_params / 1e6:.1f}M parameters")
    print("\nweight memory (Linear/Conv2d weights; quantized: integer weights + scales + zero points + "
          "per-step activation parameters)")
    print(f"  fp32                {fp_bytes / 2**20:9.1f} MiB  1.000x")
    print(f"  W8A8 int            {rt.stored_bytes() / 2**20:9.1f} MiB  {rt.stored_bytes() / fp_bytes:.3f}x stored, "
          f"{rt.resident_bytes() / fp_bytes:.3f}x resident with kernel caches")
    print(f"  process RSS grew {rss_q8:.2f} GiB loading the W8A8 UNet and running it once at 8x8 latents "
          f"(whole model, all parameters: fp32 UNet parameters {n_fp_params * 4 / 2**30:.2f} GiB)")

    for batch in batches:
        x = torch.randn(batch, 4, latent, latent)
        e = torch.randn(batch, 77, cross)
        with torch.no_grad():
            t0 = torch.tensor(ts[0])
            outs = {name: m(x, t0, e).sample for name, m in models.items()}  # warm-up, and the outputs
            fused.unfuse(q8)
            y_plain = q8(x, t0, e).sample
            fused.fuse(q8)
            y_fp, y_q = outs["fp32"], outs["W8A8 int"]
            print(f"\nbatch {batch}: mean abs difference of the outputs: fused vs plain W8A8 "
                  f"{float((y_q - y_plain).abs().mean()):.2e}, W8A8 vs fp32 {float((y_q - y_fp).abs().mean()):.2e} "
                  f"(fp32 output mean abs {float(y_fp.abs().mean()):.2e}); process RSS {_rss_gib():.1f} GiB")
            del outs, y_plain, y_fp, y_q
            _timed_rounds(models, x, e, ts, args.rounds, fp_rows,
                          f"one denoising step, UNet batch {batch}, {latent}x{latent} latents (median of "
                          f"{args.rounds} interleaved rounds; wall time, and the process's CPU time; x = the best "
                          f"fp32 row's time / this row's)")
    print(f"peak process RSS {_rss_gib('VmHWM'):.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
