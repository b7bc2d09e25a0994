"""The TLoRA layer: wraps a Linear or Conv2d and keeps every adapter's cores in dicts keyed by adapter name.

Per adapter ``a`` with multiplier ``m_a`` (``set_scale``: mixing weights) the layer computes::

    W = W0 + sum_a m_a * (W0 T_a - W0 + s_a Delta_a)

which is ``W0 T + s Delta`` for one adapter at weight 1. The transform cores train without weight
decay (``no_weight_decay`` on the parameter; the training loop honours it): decay would pull T
towards zero, i.e. the layer towards a zero weight, not towards the base model.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from studio.adapters.tlora import functional as tf

# how the transform meets the activations (measured in bench/tlora_orders.py, docs/tlora.md):
# "weight": W0 T (+ s Delta) built once per forward, one matmul/conv; "dense": T built per forward
# and applied to the activations, then the base layer; "cores": activations contracted core by core;
# "auto": per call, the cheaper of weight and dense (see TLoraLayer.pick_order)
ORDERS: tuple[str, ...] = ("auto", "weight", "dense", "cores")
DEFAULT_ORDER = "auto"


def layer_dims(base: nn.Module) -> tuple[int, int, int]:
    """(in channels, out channels, kernel taps) of a Linear or Conv2d."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, 1
    return base.in_channels, base.out_channels, math.prod(base.kernel_size)


class TLoraLayer(nn.Module, BaseTunerLayer):
    """A Linear/Conv2d with TLoRA adapters (the base layer is kept and frozen)."""

    adapter_layer_names = ("tlora_T", "tlora_R")
    other_param_names = ("r", "scaling", "multiplier", "base_scale", "residual_kind", "in_factors", "out_factors")

    def __init__(self, base_layer: nn.Module, adapter_name: str, in_factors: list[int], out_factors: list[int],
                 config: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.tlora_T = nn.ModuleDict()
        self.tlora_R = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}  # m_a * s_a: the residual's factor
        self.multiplier: dict[str, float] = {}  # m_a: the mixing weight
        self.base_scale: dict[str, float] = {}  # s_a = alpha / residual rank
        self.residual_kind: dict[str, str] = {}
        self.in_factors: dict[str, list[int]] = {}
        self.out_factors: dict[str, list[int]] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._w0: torch.Tensor | None = None  # the base weight while adapters are merged (exact unmerge)
        self.order = DEFAULT_ORDER
        self.last_order: str | None = None  # the order the last call took (the batched build reads it)
        # ("T", adapter) / ("W", adapter) -> this forward's transform / adapted weight, built for all
        # layers at once by studio.adapters.tlora.batched while the model's forward runs; None outside it
        self._batched: dict[tuple[str, str], torch.Tensor] | None = None
        self.conv = isinstance(base_layer, nn.Conv2d)
        self.in_features, self.out_features, self.taps = layer_dims(base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, in_factors, out_factors, config)

    def update_layer(self, adapter_name: str, in_factors: list[int], out_factors: list[int], config: Any) -> None:
        """Create one adapter's cores: T exactly the identity, Delta exactly zero."""
        w = self.get_base_layer().weight
        rank, rr = config.transform_rank, config.residual_rank
        cores = tf.identity_cores(in_factors, rank)
        t = nn.ParameterList([nn.Parameter(c.to(device=w.device, dtype=torch.float32)) for c in cores])
        for p in t:
            p.no_weight_decay = True
        if config.residual == "lora":
            down = torch.randn(rr, self.in_features * self.taps) / rr  # PEFT's "gaussian" LoRA init
            res = [down, torch.zeros(self.out_features, rr)]
        else:
            sizes = list(out_factors) + list(in_factors) + ([self.taps] if self.taps > 1 else [])
            res = tf.residual_cores(sizes, rr)
        self.tlora_T[adapter_name] = t
        self.tlora_R[adapter_name] = nn.ParameterList([nn.Parameter(r.to(w.device)) for r in res])
        self.r[adapter_name] = rr
        self.multiplier[adapter_name] = 1.0
        self.scaling[adapter_name] = config.scale
        self.base_scale[adapter_name] = config.scale
        self.residual_kind[adapter_name] = config.residual
        self.in_factors[adapter_name] = list(in_factors)
        self.out_factors[adapter_name] = list(out_factors)
        self.set_adapter(self.active_adapters)

    # ------------------------------------------------------------------ scales (mixing weights)

    def set_scale(self, adapter: str, scale: float) -> None:
        """Set adapter ``adapter``'s multiplier (diffusers' ``set_adapters`` weights land here)."""
        if adapter not in self.tlora_T:
            return
        self.multiplier[adapter] = float(scale)
        self.scaling[adapter] = float(scale) * self.base_scale[adapter]

    def scale_layer(self, scale: float) -> None:
        for a in self.active_adapters:
            if a in self.tlora_T:
                self.set_scale(a, self.multiplier[a] * scale)

    def unscale_layer(self, scale: float | None = None) -> None:
        for a in self.active_adapters:
            if a in self.tlora_T:
                self.set_scale(a, 1.0 if scale is None else self.multiplier[a] / scale)

    # ------------------------------------------------------------------ the math per adapter

    def transform_cores(self, adapter: str, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        return [c if dtype is None else c.to(dtype) for c in self.tlora_T[adapter]]

    def residual_matrix(self, adapter: str) -> torch.Tensor:
        """Delta as (out x in * taps), unscaled."""
        res = list(self.tlora_R[adapter])
        if self.residual_kind[adapter] == "lora":
            return res[1] @ res[0]
        return tf.residual_matrix(res, self.out_features)

    def get_delta_weight(self, adapter: str, w0: torch.Tensor | None = None) -> torch.Tensor:
        """``m (W0 T - W0 + s Delta)`` in the base weight's shape (W0: the unmerged base weight)."""
        base_w = self.get_base_layer().weight if w0 is None else w0
        w = base_w.float()
        d = tf.delta_weight(w, self.transform_cores(adapter), self.residual_matrix(adapter),
                            self.base_scale[adapter], self.multiplier[adapter])
        return d.to(base_w.dtype)

    # ------------------------------------------------------------------ merge

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fuse adapters into the base weight; deltas are always taken against the unmerged W0."""
        names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.tlora_T]
        if not names:
            return
        base = self.get_base_layer()
        if self._w0 is None:
            self._w0 = base.weight.data.clone()
        new = base.weight.data.clone()
        for a in names:
            new += self.get_delta_weight(a, self._w0)
        if safe_merge and not torch.isfinite(new).all():
            raise ValueError(f"non-finite weights when merging TLoRA adapter(s) {names}; the adapter is broken")
        base.weight.data = new
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Take merged adapters out again; with none left the base weight is restored bit for bit."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            a = self.merged_adapters.pop()
            if self.merged_adapters:
                base.weight.data -= self.get_delta_weight(a, self._w0)
        base.weight.data = self._w0
        self._w0 = None

    # ------------------------------------------------------------------ forward

    def _base_call(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        if self.conv:
            return base._conv_forward(x, weight, base.bias)
        return F.linear(x, weight, base.bias)

    def _transform(self, adapter: str, dtype: torch.dtype) -> torch.Tensor:
        """T of ``adapter``: this forward's batched build when there is one, else built here."""
        built = self._batched.get(("T", adapter)) if self._batched else None
        if built is not None:
            return built.to(dtype)
        return tf.tr_matrix(self.transform_cores(adapter, dtype))

    def _transformed_weight(self, adapter: str, w0: torch.Tensor) -> torch.Tensor:
        """``W0 T + s Delta`` of ``adapter`` in W0's shape and dtype."""
        built = self._batched.get(("W", adapter)) if self._batched else None
        if built is not None:
            return built
        wt = tf.transformed_weight(w0, self._transform(adapter, w0.dtype))
        return wt + self.base_scale[adapter] * self.residual_matrix(adapter).reshape(w0.shape).to(w0.dtype)

    def _apply_transform(self, adapter: str, x: torch.Tensor, order: str) -> torch.Tensor:
        if order == "dense":
            t = self._transform(adapter, x.dtype)
            if self.conv:  # T over the channels as one batched product: a 1x1 conv took the slow kernel here
                return torch.matmul(t, x.flatten(2)).view_as(x)
            return F.linear(x, t)
        cores = self.transform_cores(adapter, x.dtype)
        if self.conv:
            return tf.tr_apply(cores, x.movedim(1, -1)).movedim(-1, 1)
        return tf.tr_apply(cores, x)

    def _residual_out(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        res = [r.to(x.dtype) for r in self.tlora_R[adapter]]
        s = self.scaling[adapter]
        if self.residual_kind[adapter] == "lora":
            if self.conv:
                h = F.conv2d(x, res[0].reshape(-1, self.in_features, *base.kernel_size), None, base.stride,
                             base.padding, base.dilation)
                return F.conv2d(h, res[1][:, :, None, None]) * s
            return F.linear(F.linear(x, res[0]), res[1]) * s
        delta = tf.residual_matrix(res, self.out_features) * s
        if self.conv:
            return base._conv_forward(x, delta.reshape(base.weight.shape), None)
        return F.linear(x, delta)

    def pick_order(self, x: torch.Tensor) -> str:
        """The order of this call: ``auto`` picks the cheaper of weight and dense by their products.

        W0 T costs out * in^2 * taps multiply-adds, T applied to the activations N * in^2 (N the
        positions of the batch), each about three times over with the backward: deep convolutions
        see few positions (dense wins), the wide top levels many (weight wins).
        """
        if self.order != "auto":
            return self.order
        positions = x.numel() // self.in_features
        return "dense" if positions < self.out_features * self.taps else "weight"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        active = [a for a in self.active_adapters if a in self.tlora_T]
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        if self.merged or not active:
            return base(x, *args, **kwargs)
        order = self.last_order = self.pick_order(x)
        if order == "weight":
            # one matmul/conv with W0 + sum m (W0 T - W0 + s Delta); a LoRA residual folds in too: its
            # (out x r)(r x in) product is cheaper than the two extra thin products and their backward
            w0 = base.weight
            w = None
            for a in active:
                wt = self._transformed_weight(a, w0)
                if len(active) == 1 and self.multiplier[a] == 1.0:
                    w = wt  # the common case, two ops fewer
                else:
                    w = (w0 if w is None else w) + self.multiplier[a] * (wt - w0)
            # contiguous: a permuted weight can send the conv to another kernel, which rounds differently
            return self._base_call(x, w.to(x.dtype).contiguous())
        xt = x
        for a in active:
            xt = xt + self.multiplier[a] * (self._apply_transform(a, x, order) - x)
        y = base(xt, *args, **kwargs)
        for a in active:
            y = y + self._residual_out(a, x)
        return y

    def __repr__(self) -> str:
        return "tlora." + super().__repr__()
