"""Break-for-Make (Xu et al., arXiv 2403.19456): content and style adapters in separated halves of one LoRA.

A b4m adapter is a PEFT LoRA whose ``lora_A`` (down) and ``lora_B`` (up) modules are replaced by
:class:`~studio.adapters.b4m.layer.SplitWeight`: frozen halves A (up rows) and C (down input
channels) drawn from a seeded orthonormal basis per layer, learnable halves B and D. Files are
ordinary LoRA files (``lora_A.weight = [C, D]``, ``lora_B.weight = [A; B]``): vanilla diffusers
loads them and the kohya export reads them. See :mod:`studio.adapters.b4m.functional` for the
math and docs/b4m.md for the recipe and measurements. Importing this package registers
``--method b4m``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from studio.adapters.b4m import functional as bf
from studio.adapters.b4m.layer import SplitWeight
from studio.errors import StudioError

log = logging.getLogger(__name__)

DEFAULT_BASIS_SEED = 0
OPTIONS = ("basis_seed", "disjoint")


def layer_split(layer: Any, adapter_name: str) -> bf.Split:
    """The :class:`Split` of one PEFT LoRA layer's adapter."""
    base = layer.get_base_layer()
    r = layer.r[adapter_name]
    if isinstance(base, nn.Linear):
        return bf.Split(d_out=base.out_features, d_in=base.in_features, taps=1, rank=r)
    if isinstance(base, nn.Conv2d):
        if base.groups != 1:
            raise StudioError(f"b4m: grouped convolutions (groups={base.groups}) are not supported")
        kh, kw = layer.lora_A[adapter_name].weight.shape[2:4]
        return bf.Split(d_out=base.out_channels, d_in=base.in_channels, taps=kh * kw, rank=r)
    raise StudioError(f"b4m: cannot split a {type(base).__name__} layer (Linear and Conv2d only)")


def plp_layers(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, Any]]:
    """(name, PEFT LoRA layer) of every layer of ``model`` that holds ``adapter_name``."""
    from studio.adapters.core import tuner_layers

    for name, layer in tuner_layers(model):
        if adapter_name in getattr(layer, "lora_A", {}):
            yield name, layer


def apply_plp(model: nn.Module, adapter_name: str, basis_seed: int = DEFAULT_BASIS_SEED, component: str = "unet",
              disjoint: bool = True) -> int:
    """Turn the freshly injected LoRA ``adapter_name`` of ``model`` into partly learnable projections.

    Every layer gets frozen halves from :func:`functional.frozen_halves` (seeded by ``basis_seed``,
    ``component.layer-name`` and the split) and zero learnable halves, so the adapter starts as the
    identity. ``disjoint``: the learnable halves use only the rank components their frozen partner
    pairs with, so ``B D = 0`` (:func:`functional.live_components`). Returns the number of layers
    converted.
    """
    n = 0
    for name, layer in plp_layers(model, adapter_name):
        down_mod, up_mod = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        if isinstance(down_mod, SplitWeight):
            continue
        s = layer_split(layer, adapter_name)
        a, c = bf.frozen_halves(basis_seed, f"{component}.{name}", s)
        dev, dt = down_mod.weight.device, down_mod.weight.dtype
        conv_a = conv_b = None
        if down_mod.weight.dim() == 4:
            kh, kw = down_mod.weight.shape[2:4]
            c = c.reshape(s.rank, s.h_in, kh, kw)
            a = a[:, :, None, None]
            conv_a = {"stride": down_mod.stride, "padding": down_mod.padding, "dilation": down_mod.dilation}
            conv_b = {"stride": up_mod.stride, "padding": up_mod.padding, "dilation": up_mod.dilation}
        d = torch.zeros((s.rank, s.d_in - s.h_in, *c.shape[2:]), dtype=dt, device=dev)
        b = torch.zeros((s.d_out - s.h_out, *a.shape[1:]), dtype=dt, device=dev)
        live_d, live_b = ((bf.live_components(s, "down"), bf.live_components(s, "up")) if disjoint
                          else (None, None))
        layer.lora_A[adapter_name] = SplitWeight(c.to(dev, dt), d, dim=1, role="down", conv=conv_a, live=live_d)
        layer.lora_B[adapter_name] = SplitWeight(a.to(dev, dt), b, dim=0, role="up", conv=conv_b, live=live_b)
        n += 1
    if not n:
        raise StudioError(f"b4m: adapter {adapter_name!r} has no LoRA layer to split")
    return n


def split_modules(model: nn.Module, adapter_name: str, role: str | None = None) -> Iterator[tuple[str, SplitWeight]]:
    """(layer name, SplitWeight) of the adapter's up and/or down halves (``role`` "up", "down" or None)."""
    for name, layer in plp_layers(model, adapter_name):
        for mod in (layer.lora_B[adapter_name], layer.lora_A[adapter_name]):
            if isinstance(mod, SplitWeight) and (role is None or mod.role == role):
                yield name, mod


def learnable(model: nn.Module, adapter_name: str, role: str) -> list[nn.Parameter]:
    """The learnable halves: B (``role="up"``) or D (``role="down"``)."""
    return [m.learn for _, m in split_modules(model, adapter_name, role)]


def frozen_state(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Copies of every frozen half (A and C), by layer and role: what the tests compare bit for bit."""
    return {f"{name}.{m.role}": m.frozen.detach().clone() for name, m in split_modules(model, adapter_name)}


@contextlib.contextmanager
def route_gradients(model: nn.Module, adapter_name: str, rows: dict[str, torch.Tensor | None],
                    off: dict[str, torch.Tensor | None] | None = None) -> Iterator[None]:
    """Within the block, the up half learns only from the batch rows ``rows["up"]`` and the down half
    from ``rows["down"]`` (bool masks over the batch; None: every row). ``off["up"]`` / ``off["down"]``:
    rows that see that half as zero (partner dropout; None: no row)."""
    mods = list(split_modules(model, adapter_name))
    off = off or {}
    try:
        for _, m in mods:
            m.grad_rows = rows.get(m.role)
            m.off_rows = off.get(m.role)
        yield
    finally:
        for _, m in mods:
            m.grad_rows = None
            m.off_rows = None


def make_config(settings: Any, targets: Sequence[str]) -> Any:
    """The studio registry's factory: a PEFT LoraConfig (the split is applied after injection)."""
    from peft import LoraConfig

    unknown = sorted(set(settings.options) - set(OPTIONS))
    if unknown:
        raise StudioError(f"b4m: unknown option(s) {', '.join(unknown)}; valid: {', '.join(OPTIONS)}")
    if settings.rank < 2:
        raise StudioError(f"b4m: --rank {settings.rank}: must be at least 2 (A and C take half of the rank each)")
    if settings.rank_pattern:
        raise StudioError("b4m: per-layer ranks are not supported (both halves of every layer share one rank)")
    return LoraConfig(r=settings.rank, lora_alpha=float(settings.rank if settings.alpha is None else settings.alpha),
                      target_modules=list(targets), lora_dropout=settings.dropout, init_lora_weights=True,
                      alpha_pattern=dict(settings.alpha_pattern))


def after_inject(model: nn.Module, adapter_name: str, settings: Any, component: str) -> None:
    """Registry hook: split the injected LoRA into frozen and learnable halves."""
    apply_plp(model, adapter_name, int(settings.options.get("basis_seed", DEFAULT_BASIS_SEED)), component,
              disjoint=_flag(settings.options.get("disjoint", True), "disjoint"))


def _flag(value: Any, name: str) -> bool:
    """A boolean option given as a bool or as text (job files and the CLI's KEY=VALUE options)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise StudioError(f"b4m: option {name}={value!r}: use true or false")


def _register() -> None:
    from studio.adapters.methods import AdapterMethod, register_method

    register_method(AdapterMethod(
        "b4m", "Break-for-Make partly learnable projections: LoRA halves A, C frozen, B (style) and D (content) learn",
        make_config, default_lr=1e-3, default_rank=8, after_inject=after_inject))


_register()

__all__ = ["DEFAULT_BASIS_SEED", "SplitWeight", "apply_plp", "frozen_state", "learnable", "make_config",
           "route_gradients", "split_modules"]
