"""What a quantization job asks for: bits, method, LoRA rank, the distillation budget."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from studio.errors import StudioError

METHODS: tuple[str, ...] = ("efficientdm", "ptq-minmax", "ptq-mse", "qat")
TRAINED: tuple[str, ...] = ("efficientdm", "qat")  # the methods that run the distillation
BITS: tuple[int, ...] = (4, 8)
IO_BITS = 8  # the first and last layers stay at 8 bits without LoRA (EfficientDM, as most diffusion PTQ)


@dataclasses.dataclass
class QuantConfig:
    """One quantization job. Defaults are the micro model's (docs/efficientdm.md has the measurements)."""

    wbits: int = field(default=8, metadata={"help": "weight bits: 4 or 8 (per output channel)"})
    abits: int = field(default=8, metadata={"help": "activation bits: 4 or 8 (per tensor, one step size per step)"})
    method: str = field(default="efficientdm", metadata={"help": "efficientdm | ptq-minmax | ptq-mse | qat"})
    rank: int = field(default=4, metadata={"help": "QALoRA rank (efficientdm)"})
    epochs: int | None = field(default=None, metadata={
        "help": "passes over the distillation prompts (None: 2 for efficientdm, 10 for qat)"})
    samples: int = field(default=32, metadata={"help": "distillation prompts (sampling trajectories) per epoch"})
    batch: int = field(default=8, metadata={"help": "trajectories per optimizer step"})
    lr: float | None = field(default=None, metadata={
        "help": "efficientdm: the LoRA lr in units of each layer's mean weight step size (scale-aware; "
                "default 0.03); qat: the weights' lr in units of the median layer's mean step size "
                "(default 0.001)"})
    act_lr: float = field(default=0.005, metadata={
        "help": "activation step-size/zero-point lr, relative to each quantizer's mean step size"})
    calib_samples: int = field(default=32, metadata={"help": "trajectories for the activation calibration"})
    steps: int | None = field(default=None, metadata={
        "help": "denoising steps of the calibration grid (None: the model's sampling default)"})
    guidance: float | None = field(default=None, metadata={
        "help": "classifier-free guidance of the trajectories (None: the model's default)"})
    weight_sym8: bool = field(default=True, metadata={
        "help": "8-bit weights (W8, and the 8-bit first/last layers) get their zero point fixed at the middle "
                "code 128 (symmetric, per output channel): the int8 kernels then run them with no zero-point "
                "correction (docs/BENCHMARKS.md: a W8A8 step 1.13x faster on micro). False: asymmetric min/max zero "
                "points, as in the paper. 4-bit weights stay asymmetric either way (their export stores "
                "q - z, which fits int8 whole)"})
    seed: int = field(default=0, metadata={"help": "seed of the prompts and noise of calibration and distillation"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda (default: cuda if present)"})
    prompts: str | None = field(default=None, metadata={
        "help": "a text file with one prompt per line (default: micro-world captions on micro, a built-in list "
                "otherwise)"})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise StudioError(f"--method {self.method}: choose one of {', '.join(METHODS)}")
        for flag, bits in (("--wbits", self.wbits), ("--abits", self.abits)):
            if bits not in BITS:
                raise StudioError(f"{flag} {bits}: choose 4 or 8")
        if self.rank < 0:
            raise StudioError(f"--rank {self.rank}: must be >= 0")
        if self.epochs is not None and self.epochs < 0:
            raise StudioError(f"--epochs {self.epochs}: must be >= 0")
        for flag, n in (("--samples", self.samples), ("--batch", self.batch), ("--calib-samples", self.calib_samples)):
            if n <= 0:
                raise StudioError(f"{flag} {n}: must be at least 1")
        if self.steps is not None and self.steps <= 0:
            raise StudioError(f"--steps {self.steps}: must be a positive number of denoising steps")
        if self.guidance is not None and self.guidance < 0:
            raise StudioError(f"--guidance {self.guidance}: must be >= 0")
        if (self.lr is not None and self.lr <= 0) or self.act_lr < 0:
            raise StudioError(f"--lr {self.lr} / --act-lr {self.act_lr}: learning rates must be positive")

    @property
    def trained(self) -> bool:
        return self.method in TRAINED

    @property
    def lora_rank(self) -> int:
        """The LoRA rank the layers get: only EfficientDM has a LoRA branch."""
        return self.rank if self.method == "efficientdm" else 0

    def resolved_epochs(self) -> int:
        if not self.trained:
            return 0
        if self.epochs is not None:
            return self.epochs
        return 2 if self.method == "efficientdm" else 10

    def resolved_lr(self) -> float:
        """The learning rate in step-size units; the defaults come from short sweeps on micro W4A8
        (docs/efficientdm.md): full fine-tuning diverges at the LoRA rate, so QAT's is 30x lower."""
        if self.lr is not None:
            return self.lr
        return 0.001 if self.method == "qat" else 0.03

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
