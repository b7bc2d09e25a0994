"""Portable adapter files: LoRA between the diffusers/PEFT and the kohya/A1111/ComfyUI layouts, and
community LyCORIS files (LoCon, LoHa, LoKr) loaded into a pipeline through PEFT's tuners."""

from studio.formats.kohya import (
    LAYOUTS, KohyaNames, LoraFile, ModuleWeights, detect_lora_format, load_lycoris_into, lycoris_delta, read_lora,
    to_diffusers, to_kohya,
)

__all__ = [
    "LAYOUTS", "KohyaNames", "LoraFile", "ModuleWeights", "detect_lora_format", "load_lycoris_into", "lycoris_delta",
    "read_lora", "to_diffusers", "to_kohya",
]
