"""The integer weight that every kernel takes: int8 data, per-channel scale and zero point, caches."""

from __future__ import annotations

from typing import Any

import torch


class IntWeight:
    """``W = scale[o] * (data - zero[o])`` with ``data`` int8 (O, ...), ``scale`` float32 (O,), ``zero`` int32 (O,).

    Backends keep what they derive from the weight (oneDNN's prepacked copy, column sums,
    zero-point corrections) in ``cache``, built on first use; ``drop_cache`` frees it.
    """

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        if data.dtype != torch.int8:
            raise TypeError(f"IntWeight data must be int8, not {data.dtype}")
        if scale.shape != (data.shape[0],) or zero.shape != (data.shape[0],):
            raise ValueError(f"IntWeight: scale {tuple(scale.shape)} / zero {tuple(zero.shape)} must be "
                             f"({data.shape[0]},)")
        self.data = data
        self.scale = scale.float()
        self.zero = zero.to(torch.int32)
        self.cache: dict[str, Any] = {}

    @property
    def out_features(self) -> int:
        return self.data.shape[0]

    @property
    def symmetric(self) -> bool:
        """Whether every zero point is 0 (then no zero-point correction is needed)."""
        if "symmetric" not in self.cache:
            self.cache["symmetric"] = not bool(self.zero.any())
        return self.cache["symmetric"]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        shape = (-1,) + (1,) * (self.data.dim() - 1)
        return (self.data.to(dtype) - self.zero.to(dtype).view(shape)) * self.scale.to(dtype).view(shape)

    def drop_cache(self) -> None:
        self.cache.clear()

    def to(self, device: torch.device | str) -> IntWeight:
        return IntWeight(self.data.to(device), self.scale.to(device), self.zero.to(device))
