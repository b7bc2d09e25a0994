"""TLoRA's PEFT tuner: picks each target layer's factorisation, skips layers that cannot take TLoRA."""

from __future__ import annotations

import logging
from typing import Any

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from studio.adapters.tlora import functional as tf
from studio.adapters.tlora.config import TLoraConfig
from studio.adapters.tlora.layer import TLoraLayer, layer_dims

log = logging.getLogger(__name__)


def layer_factors(base: nn.Module, config: TLoraConfig) -> tuple[list[int], list[int]] | str:
    """(input factors, output factors) of a layer, or the reason it cannot take TLoRA."""
    if isinstance(base, nn.Conv2d) and base.groups != 1:
        return f"a grouped convolution (groups={base.groups})"
    if not isinstance(base, (nn.Linear, nn.Conv2d)):
        return f"a {type(base).__name__} (TLoRA adapts Linear and Conv2d layers)"
    n_in, n_out, _ = layer_dims(base)
    fin = tf.factorize(n_in, config.max_factors)
    if fin is None:
        return f"input width {n_in} has no factorisation into 2-{config.max_factors} factors of at most {tf.MAX_FACTOR}"
    fout: tuple[int, ...] | list[int] = []
    if config.residual == "tr":
        fout = tf.factorize(n_out, config.max_factors)
        if fout is None:
            return (f"output width {n_out} has no factorisation into 2-{config.max_factors} factors of at most "
                    f"{tf.MAX_FACTOR} (a --residual lora adapter can take it)")
    return list(fin), list(fout)


class TLoraModel(BaseTuner):
    """Injects :class:`TLoraLayer` into the target Linear/Conv2d layers."""

    prefix: str = "tlora_"
    tuner_layer_cls = TLoraLayer
    target_module_mapping: dict = {}

    def _create_and_replace(self, config: TLoraConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **kwargs: Any) -> None:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if current_key in config.factors:  # a load: the file's factorisation, whatever the current rule says
            fin, fout = config.factors[current_key]["in"], config.factors[current_key]["out"]
        elif current_key in config.skipped:
            return
        else:
            found = layer_factors(base, config)
            if isinstance(found, str):
                log.warning("TLoRA: skipping %s: %s", current_key, found)
                config.skipped.append(current_key)
                return
            fin, fout = found
            config.factors[current_key] = {"in": fin, "out": fout}
        if isinstance(target, TLoraLayer):
            target.update_layer(adapter_name, fin, fout, config)
        else:
            self._replace_module(parent, target_name, TLoraLayer(target, adapter_name, fin, fout, config), target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """Inject, then refuse an adapter with no layer left and warn when it outgrows the LoRA it replaces."""
        from studio.errors import StudioError

        config = self.peft_config[adapter_name]
        fresh = not config.factors
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        from studio.adapters.tlora import batched

        batched.install(model)  # every layer's transform from a few batched products per forward
        if not config.factors:
            raise StudioError(f"TLoRA: none of the {len(config.skipped)} target layers can take it "
                              f"({', '.join(config.skipped[:3])}...: widths that do not factor); choose other targets")
        if fresh and config.lora_rank:
            mine, lora = stored_params(config, model), lora_params(config, model, config.lora_rank)
            if mine > lora:
                log.warning("TLoRA stores %d values on these layers, more than a rank-%d LoRA (%d); lower "
                            "--transform-rank or --residual-rank", mine, config.lora_rank, lora)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if self.prefix not in n:
                p.requires_grad = False


def stored_params(config: TLoraConfig, model: nn.Module) -> int:
    """Values a TLoRA adapter with this config stores for ``model``'s layers (its factorisations filled in)."""
    total = 0
    for key, f in config.factors.items():
        try:
            base = model.get_submodule(key)
        except AttributeError:
            continue
        base = base.get_base_layer() if isinstance(base, BaseTunerLayer) else base
        n_in, n_out, taps = layer_dims(base)
        ins = f["in"] + ([taps] if taps > 1 else [])
        total += tf.transform_params(f["in"], config.transform_rank)
        total += tf.residual_params(n_out, n_in * taps, f["out"], ins, config.residual, config.residual_rank)
    return total


def lora_params(config: TLoraConfig, model: nn.Module, rank: int) -> int:
    """Values a LoRA of ``rank`` on the same layers would store."""
    total = 0
    for key in config.factors:
        base = model.get_submodule(key)
        base = base.get_base_layer() if isinstance(base, BaseTunerLayer) else base
        n_in, n_out, taps = layer_dims(base)
        total += rank * (n_in * taps + n_out)
    return total
