"""`studio info SPEC`: family, components, parameter counts, dtype, scheduler."""

from __future__ import annotations

import argparse
import json
from typing import Any


def describe(pipe: Any) -> dict[str, Any]:
    """A JSON-able summary of a loaded pipeline."""
    from studio.generation import native_size, sampler_name, vae_factor

    src = pipe.studio_source
    comps = {}
    for name, comp in pipe.components.items():
        if comp is None:
            continue
        entry: dict[str, Any] = {"class": type(comp).__name__}
        if hasattr(comp, "parameters"):
            params = list(comp.parameters())
            entry["parameters"] = sum(p.numel() for p in params)
            if params:
                entry["dtype"] = str(params[0].dtype).replace("torch.", "")
        comps[name] = entry
    sched = pipe.scheduler
    w, h = native_size(pipe)
    return {
        "spec": src.spec, "source": src.kind, "path": src.path, "family": src.family,
        "pipeline": type(pipe).__name__, "components": comps,
        "parameters": sum(c.get("parameters", 0) for c in comps.values()),
        "scheduler": {"class": type(sched).__name__, "sampler": sampler_name(pipe),
                      "prediction_type": sched.config.get("prediction_type", "epsilon"),
                      "train_timesteps": sched.config.get("num_train_timesteps")},
        "native_size": f"{w}x{h}", "vae_factor": vae_factor(pipe),
        "device": str(pipe.device),
    }


def register(sub: argparse._SubParsersAction) -> None:
    from studio.commands.generate import add_model_args

    p = sub.add_parser("info", help="describe a base model: family, components, sizes",
                       description="Load a model and describe it: family, components, parameter counts, dtype, scheduler.")
    p.add_argument("spec", help="micro, a diffusers folder, a .safetensors checkpoint, or a hub id")
    add_model_args(p, base_required=False)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from studio.loading import load_pipeline

    pipe = load_pipeline(args.spec, dtype=args.dtype, device=args.device, trust_pickle=args.trust_pickle,
                         config=args.config)
    info = describe(pipe)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"model      {info['spec']} ({info['source']}: {info['path']})")
    print(f"family     {info['family']}   pipeline {info['pipeline']}")
    print(f"size       {info['native_size']} native, VAE factor {info['vae_factor']}")
    print(f"scheduler  {info['scheduler']['class']} ({info['scheduler']['sampler']}), "
          f"prediction {info['scheduler']['prediction_type']}")
    print(f"device     {info['device']}")
    print("components:")
    for name, c in info["components"].items():
        extra = f"{c['parameters'] / 1e6:9.2f}M params  {c.get('dtype', '')}" if "parameters" in c else ""
        print(f"  {name:15s} {c['class']:34s} {extra}")
    print(f"total      {info['parameters'] / 1e6:.2f}M parameters")
    return 0
