"""TLoRA's PEFT config: transform rank, residual kind and rank, and the per-layer factorisations."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from studio.errors import StudioError

RESIDUALS: tuple[str, ...] = ("tr", "lora")


@dataclass
class TLoraConfig(PeftConfig):
    """What a TLoRA adapter is made of; the layers' factorisations are written in at injection time."""

    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "module-name suffixes to adapt (PEFT's target_modules)"})
    transform_rank: int = field(default=4, metadata={"help": "ring rank R of the transform T's cores (I_d, I_d, R, R)"})
    residual: str = field(default="lora", metadata={"help": "the residual Delta: lora (TLoRA*, the default) or tr "
                                                             "(tensor ring)"})
    residual_rank: int = field(default=4, metadata={"help": "ring rank of a tr residual, or the rank of a lora one"})
    alpha: Optional[float] = field(default=None, metadata={"help": "residual scale s = alpha / residual_rank "
                                                                    "(default alpha = residual_rank: s = 1)"})
    max_factors: int = field(default=3, metadata={"help": "most factors of a layer width (cores per transform)"})
    factors: dict = field(default_factory=dict, metadata={
        "help": "module key -> {'in': [...], 'out': [...]}: the factorisation of every adapted layer, chosen "
                "automatically on injection and kept in the file so that a load rebuilds the same cores"})
    skipped: list = field(default_factory=list, metadata={"help": "module keys whose widths cannot take TLoRA"})
    lora_rank: int = field(default=0, metadata={"help": "rank of the LoRA this adapter is compared with: a "
                                                        "warning when TLoRA would store more (0: no comparison)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        from studio.adapters.tlora import PEFT_TYPE

        self.peft_type = PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        for name in ("transform_rank", "residual_rank", "max_factors"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise StudioError(f"--{name.replace('_', '-')} {v}: must be a positive integer")
        if self.max_factors < 2:
            raise StudioError(f"max_factors {self.max_factors}: a tensor ring needs at least 2 factors")
        if self.residual not in RESIDUALS:
            raise StudioError(f"--residual {self.residual}: choose tr or lora")

    @property
    def scale(self) -> float:
        """The residual's scale s."""
        return float(self.residual_rank if self.alpha is None else self.alpha) / self.residual_rank
