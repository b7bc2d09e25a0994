"""`studio convert --to kohya|diffusers IN OUT`: move a LoRA between the diffusers and kohya layouts.

IN is a ``.safetensors`` LoRA (diffusers, PEFT, kohya, kohya with original-LDM names, LyCORIS)
or a folder holding ``pytorch_lora_weights.safetensors``. OUT is a ``.safetensors`` file or a
folder. The written path is printed on stdout; bad input is a one-line error, exit status 2.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from studio.formats.kohya import FAMILIES

    p = sub.add_parser(
        "convert", help="convert a LoRA between the diffusers and kohya (A1111/ComfyUI) layouts",
        description="Convert a LoRA file between diffusers' layout (pipe.load_lora_weights) and the kohya layout "
                    "that sd-scripts, A1111 and ComfyUI use, keeping every module's rank and alpha. LyCORIS "
                    "LoHa/LoKr files can be renamed to kohya names but have no diffusers form.")
    p.add_argument("--to", required=True, choices=("kohya", "diffusers"), help="the layout to write")
    p.add_argument("input", metavar="IN", help="a LoRA .safetensors file, or a folder holding pytorch_lora_weights"
                                               ".safetensors")
    p.add_argument("output", metavar="OUT", help="a .safetensors file, or a folder (diffusers: OUT/pytorch_lora_"
                                                 "weights.safetensors; kohya: OUT/<input name>.safetensors)")
    p.add_argument("--family", choices=FAMILIES, default=None,
                   help="base model family, for the ss_* metadata and original-LDM names (default: guessed)")
    p.add_argument("--unet-names", choices=["auto", "ldm", "diffusers"], default=None,
                   help="kohya: UNet module names; auto (default) as sd-scripts writes them: original-LDM "
                        "names for SDXL (input_blocks_4_1_…), diffusers-style for SD 1.x/2.x "
                        "(down_blocks_1_attentions_0_…)")
    p.add_argument("--ldm-names", dest="unet_names", action="store_const", const="ldm",
                   help="the same as --unet-names ldm")
    t = p.add_argument_group("TLoRA adapters (written as a LoRA by truncated SVD of each layer's update)")
    t.add_argument("--rank", type=int, default=16, help="rank of the LoRA a TLoRA adapter becomes (default 16)")
    t.add_argument("--base", default=None, metavar="SPEC",
                   help="the base model the TLoRA was trained on (default: the one its file names)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from studio.adapters.core import read_metadata
    from studio.errors import StudioError
    from studio.formats.kohya import to_diffusers, to_kohya

    try:
        method = read_metadata(args.input).get("studio.method")
    except StudioError:
        method = None  # the LoRA converters below give their own message
    if method == "tlora":
        from studio.adapters.tlora.export import export_lora, summary

        path, errors = export_lora(args.input, args.output, to=args.to, rank=args.rank, base=args.base)
        for e in errors:
            print(f"{e.layer}\trank {e.rank}\trelative error {e.rel_error:.4f}")
        s = summary(errors)
        print(f"{s['layers']} layers: mean relative error {s['mean']:.4f}, max {s['max']:.4f}")
        print(path)
        return 0
    if args.to == "kohya":
        path = to_kohya(args.input, args.output, family=args.family, unet_names=args.unet_names or "auto")
    else:
        if args.unet_names:
            raise StudioError(f"--unet-names {args.unet_names} applies to --to kohya only")
        path = to_diffusers(args.input, args.output, family=args.family)
    print(path)
    return 0
