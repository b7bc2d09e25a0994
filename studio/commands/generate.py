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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from studio.generation import GenerationParams, generate, parse_size, save_images

    width = height = None
    if args.size:
        width, height = parse_size(args.size)
    params = GenerationParams(prompt=args.prompt, negative=args.negative, steps=args.steps, guidance=args.guidance,
                              seed=args.seed, num=args.num, width=width, height=height, sampler=args.sampler,
                              batch_size=args.batch_size)
    params.validate()
    pipe = load_from_args(args)
    if args.attention == "xformers":
        enable_xformers(pipe)
    images = generate(pipe, params)
    for path in save_images(images, args.out):
        print(path)
    return 0
