"""`studio generate`: text-to-image with any base model; writes PNGs with infotext."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_model_args(p: argparse.ArgumentParser, *, base_required: bool = True) -> None:
    """--base/--device/--dtype/--trust-pickle/--config, shared by every command that loads a model."""
    p.add_argument("--base", required=base_required, metavar="SPEC",
                   help="micro, a diffusers folder, a .safetensors checkpoint, or a hub id (online only)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if present, else cpu)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="weights/compute dtype (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading .ckpt pickle checkpoints")
    p.add_argument("--config", default=None, metavar="DIR",
                   help="diffusers folder whose configs describe a single-file checkpoint")


def load_from_args(args: argparse.Namespace):
    from studio.loading import load_pipeline

    return load_pipeline(args.base, dtype=args.dtype, device=args.device, trust_pickle=args.trust_pickle,
                         config=args.config)


def enable_xformers(pipe) -> None:
    """xformers memory-efficient attention; a clear message where it is absent or unusable."""
    from studio.errors import StudioError, require

    require("xformers", "cuda", "--attention xformers")
    if pipe.device.type != "cuda":
        raise StudioError("--attention xformers: xformers kernels run on CUDA only; use the default sdpa on the CPU")
    pipe.enable_xformers_memory_efficient_attention()


def register(sub: argparse._SubParsersAction) -> None:
    from studio.generation import SAMPLERS

    p = sub.add_parser("generate", help="generate images from a prompt",
                       description="Generate images; writes PNGs with A1111-style parameters and prints their paths.")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, 20 on micro)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=None, help="seed of the first image (image i uses seed+i)")
    p.add_argument("--num", type=int, default=1, help="number of images")
    p.add_argument("--size", default=None, metavar="WxH", help="image size (default: the model's native size)")
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS), help="scheduler (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers"],
                   help="attention kernel: PyTorch SDPA (default) or xformers (optional CUDA extra)")
    p.add_argument("--out", default="out", metavar="DIR", help="output folder (default: out/)")
    mix = p.add_argument_group("adapters", "mix adapters in; <lora:SPEC> tags in the prompt do the same "
                                           "(docs/mixing.md)")
    mix.add_argument("--adapter", action="append", default=[], metavar="SPEC",
                     help="NAME_OR_PATH[:WEIGHT][@START-END][:unet|:te][:BLOCK=WEIGHT...], e.g. heart:0.9 or "
                          "checkered:0.7@0.4-1 (a library name or a path; repeatable)")
    mix.add_argument("--auto", type=int, default=0, metavar="K",
                     help="AutoLoRA: retrieve the K adapters whose weights best match the prompt and apply those that "
                          "match (docs/autolora.md); says which on stderr")
    mix.add_argument("--sweep", default=None, metavar="SPEC=W1,W2,...",
                     help="compare one adapter at several weights, e.g. heart=0,0.5,1: an XY grid of seeds x weights")
    mix.add_argument("--seeds", default=None, metavar="S1,S2,...", help="explicit seeds, one image each (the grid's rows)")
    mix.add_argument("--grid", default=None, metavar="PNG",
                     help="where the labelled grid goes (with --sweep; default: OUT/grid.png)")
    add_decor_args(p)
    p.set_defaults(func=run)


def add_decor_args(p: argparse.ArgumentParser) -> None:
    """--decor/--decor-alpha/--decor-rows/--decor-pooled, shared by generate and the eval suites."""
    from studio.text.decor import DEFAULT_ALPHA, ROWS

    g = p.add_argument_group("DECOR", "project unwanted words out of the prompt embeddings (docs/decor.md)")
    g.add_argument("--decor", default="", metavar="WORDS",
                   help='unwanted words or phrases, comma-separated, e.g. "circle, red"')
    g.add_argument("--decor-alpha", type=float, default=DEFAULT_ALPHA,
                   help=f"projection strength in [0, 1] (default {DEFAULT_ALPHA:g}; 0: no change)")
    g.add_argument("--decor-rows", default="words", choices=ROWS,
                   help="prompt rows projected: words (default), words+end (also EOS and padding), all")
    g.add_argument("--decor-pooled", action="store_true", help="also project SDXL's pooled embedding")
    g.add_argument("--decor-center", action="store_true",
                   help="project about the mean of ordinary words: remove only what sets the unwanted words apart")


def decor_from_args(args: argparse.Namespace):
    """The DecorConfig of the --decor flags, or None without --decor."""
    if not args.decor.strip():
        return None
    from studio.text.decor import DecorConfig

    return DecorConfig(args.decor, alpha=args.decor_alpha, rows=args.decor_rows, pooled=args.decor_pooled,
                       center=args.decor_center)


def parse_seeds(text: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3]."""
    from studio.errors import StudioError

    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise StudioError(f"--seeds {text}: expected comma-separated whole numbers, e.g. 1,2,3") from None


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from studio.errors import StudioError
    from studio.generation import GenerationParams, generate, generate_sweep, parse_size, save_grid, save_images
    from studio.mixing import parse_sweep

    width = height = None
    if args.size:
        width, height = parse_size(args.size)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    if seeds is not None and (args.seed is not None or args.num != 1):
        raise StudioError("--seeds: give either --seeds or --seed/--num, not both")
    if args.grid and not args.sweep:
        raise StudioError("--grid: a grid compares the weights of --sweep; add --sweep NAME=W1,W2,...")
    sweep = parse_sweep(args.sweep) if args.sweep else None
    if args.auto < 0:
        raise StudioError(f"--auto {args.auto}: the number of adapters to retrieve must be 1 or more")
    if args.auto:
        from studio.autolora.retrieval import auto_adapters

        args.adapter = list(args.adapter) + auto_adapters(args.prompt, args.auto)
    params = GenerationParams(prompt=args.prompt, negative=args.negative, steps=args.steps, guidance=args.guidance,
                              seed=args.seed, num=args.num, width=width, height=height, sampler=args.sampler,
                              batch_size=args.batch_size, adapters=list(args.adapter), seeds=seeds,
                              decor=args.decor, decor_alpha=args.decor_alpha, decor_rows=args.decor_rows,
                              decor_pooled=args.decor_pooled, decor_center=args.decor_center)
    params.validate()
    pipe = load_from_args(args)
    if args.attention == "xformers":
        enable_xformers(pipe)
    if sweep is None:
        images = generate(pipe, params)
    else:
        rows, grid = generate_sweep(pipe, params, sweep)
        images = [im for row in rows for im in row]
    for path in save_images(images, args.out):
        print(path)
    if sweep is not None:
        print(save_grid(grid, args.grid or Path(args.out) / "grid.png"))
    return 0
