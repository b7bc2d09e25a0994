"""The studio's adapter-method registry: name -> PEFT config, recipe defaults, capabilities.

LoRA and PEFT's LoHa, LoKr and DoRA come first; the mission's own methods (EfficientDM,
Break-for-Make, TLoRA, ...) register here too, each from its own package. Adding a method
touches nothing else: the trainer, the test matrix and the CLI read this registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from studio.errors import StudioError

# module-name suffixes (PEFT matches target_modules against the end of the qualified name)
UNET_ATTENTION: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
UNET_RESNET: tuple[str, ...] = ("conv1", "conv2", "conv_shortcut", "time_emb_proj")
UNET_PROJ: tuple[str, ...] = ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_ATTENTION: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclasses.dataclass(frozen=True)
class AdapterSettings:
    """What the user chooses about an adapter, whatever its method."""

    rank: int = 8
    alpha: float | None = None  # None: alpha = rank (scale 1)
    targets: str = "attention"  # attention | attention+resnet | all
    text_encoder: bool = False  # also adapt the text encoder(s)
    blocks: tuple[str, ...] = ()  # denoiser module-name prefixes to adapt (empty: all)
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)  # regex of module name -> rank
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    dropout: float = 0.0
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # method-specific (tlora: transform_rank, ...)

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise StudioError(f"--rank {self.rank}: must be a positive integer")
        if self.targets not in TARGET_SETS:
            raise StudioError(f"--targets {self.targets}: choose one of {', '.join(TARGET_SETS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise StudioError(f"dropout {self.dropout}: must be in [0, 1)")


TARGET_SETS: dict[str, tuple[str, ...]] = {
    "attention": UNET_ATTENTION,
    "attention+resnet": UNET_ATTENTION + UNET_RESNET,
    "all": UNET_ATTENTION + UNET_RESNET + UNET_PROJ,
}


@dataclasses.dataclass(frozen=True)
class AdapterMethod:
    """One registered method."""

    name: str
    description: str
    make_config: Callable[[AdapterSettings, Sequence[str]], Any]  # (settings, target modules) -> PEFT config
    default_lr: float = 1e-3
    default_rank: int = 8
    diffusers_loadable: bool = True  # vanilla `pipe.load_lora_weights` reads its files
    kohya_export: bool = True
    can_merge: bool = True  # static mixes fuse it into the weights
    # (model, adapter name, settings, component) -> None: runs after PEFT injected the adapter into a
    # component (Break-for-Make splits the injected LoRA into frozen and learnable halves there)
    after_inject: Callable[[Any, str, AdapterSettings, str], None] | None = None


_REGISTRY: dict[str, AdapterMethod] = {}


def register_method(method: AdapterMethod) -> AdapterMethod:
    """Add a method to the registry (re-registering a name replaces it)."""
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> AdapterMethod:
    """The method called ``name``, or a StudioError listing the valid ones."""
    if name not in _REGISTRY:
        raise StudioError(f"--method {name}: unknown adapter method; choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def methods() -> dict[str, AdapterMethod]:
    """Every registered method, by name."""
    return dict(_REGISTRY)


def _alpha(s: AdapterSettings) -> float:
    return float(s.rank if s.alpha is None else s.alpha)


def _lora_config(use_dora: bool) -> Callable[[AdapterSettings, Sequence[str]], Any]:
    def make(s: AdapterSettings, targets: Sequence[str]):
        from peft import LoraConfig

        return LoraConfig(r=s.rank, lora_alpha=_alpha(s), target_modules=list(targets), lora_dropout=s.dropout,
                          init_lora_weights="gaussian", use_dora=use_dora, rank_pattern=dict(s.rank_pattern),
                          alpha_pattern=dict(s.alpha_pattern))

    return make


def _loha_config(s: AdapterSettings, targets: Sequence[str]):
    from peft import LoHaConfig

    return LoHaConfig(r=s.rank, alpha=_alpha(s), target_modules=list(targets), rank_dropout=s.dropout,
                      rank_pattern=dict(s.rank_pattern), alpha_pattern=dict(s.alpha_pattern))


def _lokr_config(s: AdapterSettings, targets: Sequence[str]):
    from peft import LoKrConfig

    return LoKrConfig(r=s.rank, alpha=_alpha(s), target_modules=list(targets), rank_dropout=s.dropout,
                      rank_pattern=dict(s.rank_pattern), alpha_pattern=dict(s.alpha_pattern))


register_method(AdapterMethod("lora", "Low-rank adaptation (LoRA): W + (alpha/r) B A", _lora_config(False)))
register_method(AdapterMethod("dora", "Weight-decomposed LoRA (DoRA): magnitude and direction", _lora_config(True),
                              kohya_export=False))
register_method(AdapterMethod("loha", "Low-rank Hadamard product (LyCORIS LoHa)", _loha_config, default_lr=2e-3,
                              diffusers_loadable=False, kohya_export=False))
register_method(AdapterMethod("lokr", "Low-rank Kronecker product (LyCORIS LoKr)", _lokr_config, default_lr=2e-3,
                              diffusers_loadable=False, kohya_export=False))
