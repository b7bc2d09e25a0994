"""TLoRA (Tao et al., ICCV 2025): a tensor-ring transform of the input plus a compact residual.

``W = W0 T + s Delta``; see :mod:`studio.adapters.tlora.functional` for the math and the
flattening order, docs/tlora.md for use and measurements. Importing this package registers the
method with PEFT (``peft_type`` TLORA) and in the studio's registry as ``--method tlora``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

from peft.utils.peft_types import PeftType


def _peft_type() -> PeftType:
    # PEFT's register_peft_method requires a member of its PeftType enum, which has no public way to
    # grow: add one the way Enum's own constructor does (member maps plus the class attribute)
    if "TLORA" in PeftType.__members__:
        return PeftType.TLORA
    member = str.__new__(PeftType, "TLORA")
    member._name_ = "TLORA"
    member._value_ = "TLORA"
    member.__objclass__ = PeftType
    member.__init__("TLORA")
    PeftType._member_map_["TLORA"] = member
    PeftType._value2member_map_["TLORA"] = member
    PeftType._member_names_.append("TLORA")
    type.__setattr__(PeftType, "TLORA", member)
    assert isinstance(member, enum.Enum)
    return member


PEFT_TYPE = _peft_type()

from studio.adapters.tlora.config import RESIDUALS, TLoraConfig  # noqa: E402 - needs PEFT_TYPE
from studio.adapters.tlora.layer import TLoraLayer  # noqa: E402
from studio.adapters.tlora.model import TLoraModel  # noqa: E402


def _register_peft() -> None:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils.peft_types import register_peft_method

    if PEFT_TYPE not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name="tlora", config_cls=TLoraConfig, model_cls=TLoraModel, prefix="tlora_")


def make_config(settings: Any, targets: Sequence[str]) -> TLoraConfig:
    """The studio registry's factory: AdapterSettings (+ its tlora options) -> TLoraConfig."""
    opts = dict(settings.options)
    unknown = sorted(set(opts) - {"transform_rank", "residual", "residual_rank", "max_factors"})
    if unknown:
        from studio.errors import StudioError

        raise StudioError(f"tlora: unknown option(s) {', '.join(unknown)}; valid: transform_rank, residual, "
                          f"residual_rank, max_factors")
    kw = {k: v for k, v in opts.items() if v is not None}
    return TLoraConfig(target_modules=list(targets), alpha=settings.alpha, lora_rank=settings.rank, **kw)


_register_peft()


def _register_studio() -> None:
    from studio.adapters.methods import AdapterMethod, register_method

    register_method(AdapterMethod(
        "tlora", "Tensor-ring transform plus residual (TLoRA): W0 T + s Delta, a fraction of LoRA's size",
        make_config, default_lr=1e-3, default_rank=4, diffusers_loadable=False, kohya_export=False))


_register_studio()

__all__ = ["PEFT_TYPE", "RESIDUALS", "TLoraConfig", "TLoraLayer", "TLoraModel", "make_config"]
