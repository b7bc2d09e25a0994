"""Every TLoRA layer's transform built in a few batched products per forward pass of the model.

Built one layer at a time, T (two einsums over the cores) and ``W0 T + s Delta`` cost a dozen
small ops per layer and again as many in the backward: on the micro denoiser (125 layers) that
per-op overhead, not the arithmetic, made a TLoRA training step about 1.5x a LoRA step
(docs/tlora.md). Layers whose cores have the same shapes are built together: their cores are
stacked and contracted with one batched einsum; layers whose base weights have the same shape
then get ``W0 T`` from one ``bmm`` and their LoRA residual from one ``baddbmm``. The values are
the per-layer ones (the same products, batched; tests/test_tlora.py compares them bit for bit);
gradients reach every layer's cores through the stacks.

:class:`StepBuilder` sits on the adapted model as a forward pre-hook (build) and forward hook
(drop): layers read their entries while that forward runs and fall back to building their own
outside it (a layer called on its own, merged or disabled adapters, several adapters at weights
other than 1, gradient checkpointing, whose recomputation must see the same ops as the forward).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# stacked copies of the frozen base weights are kept between steps up to this size per group
# (micro: all of them, 15 MiB); larger groups are stacked anew at each forward
MAX_CACHED_STACK_BYTES = 64 << 20


def tr_matrix_batched(cores: list[torch.Tensor]) -> torch.Tensor:
    """:func:`studio.adapters.tlora.functional.tr_matrix` over a leading batch dimension: cores ``(L, I_d, J_d, R, R)``."""
    g = cores[0]
    if len(cores) == 1:
        return torch.diagonal(g, dim1=3, dim2=4).sum(-1)
    for c in cores[1:-1]:
        n, i, j, r0, _ = g.shape
        _, k, l, _, r2 = c.shape
        g = torch.einsum("nijab,nklbc->nikjlac", g, c).reshape(n, i * k, j * l, r0, r2)
    c = cores[-1]
    return torch.einsum("nijab,nklba->nikjl", g, c).reshape(g.shape[0], g.shape[1] * c.shape[1],
                                                            g.shape[2] * c.shape[2])


class StepBuilder:
    """Builds every TLoRA layer's T (and, for layers that took the weight order last time, the adapted
    weight) at the start of each forward of ``model``; drops them when the forward ends."""

    default_enabled = True  # what new builders start with (benches switch it to time the per-layer build)

    def __init__(self) -> None:
        self.layers: list[Any] = []
        self._stacks: dict[Any, tuple[tuple[Any, ...], torch.Tensor]] = {}
        self.enabled = self.default_enabled
        self.built = 0  # forwards that used the batched build (tests and benches read it)

    # ------------------------------------------------------------------ hooks

    def before(self, module: nn.Module, args: Any, kwargs: Any = None) -> None:
        from studio.adapters.tlora.layer import TLoraLayer

        self.drop()
        if not self.enabled:
            return
        modules = list(module.modules())  # read every time: adapters come and go (a few hundred us on micro)
        if torch.is_grad_enabled() and any(getattr(m, "gradient_checkpointing", False) for m in modules):
            return  # a recomputed forward must run the ops the first one ran: the layers build their own
        self.layers = [m for m in modules if isinstance(m, TLoraLayer)]
        if not self.layers:
            return
        try:
            self._build()
        except Exception as exc:  # noqa: BLE001 - a faster path only: the layers build their own
            self.drop()
            self.enabled = False
            log.warning("TLoRA: batched transform build failed (%s: %s); building per layer from now on",
                        type(exc).__name__, exc)

    def after(self, module: nn.Module, args: Any, output: Any, kwargs: Any = None) -> None:
        self.drop()

    def drop(self) -> None:
        for layer in self.layers:
            layer._batched = None

    # ------------------------------------------------------------------ the build

    def _build(self) -> None:
        first = self.layers[0]
        if first.disable_adapters:
            return
        # one group per (core shapes, dtype, device); layers whose last call took the weight order with a LoRA
        # residual are grouped by base-weight shape too, so that their W0 T comes from one bmm over the group's
        # whole batch of Ts: slicing or regathering one batch for several uses costs a zero-filled copy of it
        # per use in the backward
        groups: dict[Any, list[tuple[Any, str]]] = defaultdict(list)
        for layer in self.layers:
            if layer.merged:
                continue
            layer._batched = {}
            w0 = layer.get_base_layer().weight
            for a in layer.active_adapters:
                if a not in layer.tlora_T:
                    continue
                key: tuple[Any, ...] = (tuple(tuple(c.shape) for c in layer.tlora_T[a]), w0.dtype, w0.device)
                if layer.last_order == "weight" and layer.residual_kind[a] == "lora":
                    key += (tuple(w0.shape), layer.tlora_R[a][0].shape[0], layer.base_scale[a])
                groups[key].append((layer, a))
        if not groups:  # every layer merged, or no active TLoRA adapter
            return
        for key, members in groups.items():
            dtype = key[1]
            n_cores = len(key[0])
            stacked = [torch.stack([layer.tlora_T[a][d] for layer, a in members]).to(dtype) for d in range(n_cores)]
            tb = tr_matrix_batched(stacked)
            if len(key) == 3:
                for (layer, a), t in zip(members, tb.unbind(0)):
                    layer._batched[("T", a)] = t
                continue
            shape, scale = key[3], key[5]
            down = torch.stack([layer.tlora_R[a][0] for layer, a in members])
            up = torch.stack([layer.tlora_R[a][1] for layer, a in members])
            res = torch.bmm(up, down).reshape(len(members), *shape).to(dtype)  # as the layer: B A, then its dtype
            wt = torch.bmm(self._w0_stack(key, [layer for layer, _ in members]), tb)
            if len(shape) == 4:  # conv: W0 as (out * kh * kw, in) rows, T over the input channels, back
                o, i, kh, kw = shape
                wt = wt.reshape(len(members), o, kh, kw, i).permute(0, 1, 4, 2, 3)
            w = wt + scale * res
            for (layer, a), wa in zip(members, w.contiguous().unbind(0)):
                layer._batched[("W", a)] = wa
        self.built += 1

    def _w0_stack(self, key: Any, layers: list[Any]) -> torch.Tensor:
        """The group's frozen base weights stacked (conv: as (out * kh * kw, in) rows), kept while they stand."""
        weights = [layer.get_base_layer().weight for layer in layers]
        stamp = tuple((w.data_ptr(), w._version) for w in weights)
        hit = self._stacks.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        with torch.no_grad():
            rows = [w if w.dim() == 2 else w.permute(0, 2, 3, 1).reshape(-1, w.shape[1]) for w in weights]
            stack = torch.stack(rows)
        if stack.numel() * stack.element_size() <= MAX_CACHED_STACK_BYTES:
            self._stacks[key] = (stamp, stack)
        return stack


def install(model: nn.Module) -> StepBuilder:
    """Put a :class:`StepBuilder` on ``model`` (once); returns it."""
    builder = getattr(model, "_tlora_builder", None)
    if builder is not None:
        return builder
    builder = StepBuilder()
    model.register_forward_pre_hook(builder.before, with_kwargs=True)
    model.register_forward_hook(builder.after, with_kwargs=True, always_call=True)
    object.__setattr__(model, "_tlora_builder", builder)  # not a submodule: state_dict and .to() leave it alone
    return builder
