"""Low-bit kernels: integer linear and conv for quantized models, a pure-torch reference for each.

Installed as ``studio.kernels``. Entry points (the semantics are those of :mod:`.reference`):

* ``quantize_act(x, scale, zero, bits)`` -> uint8 codes
* ``qlinear(xq, x_scale, x_zero, weight, bias)`` and ``qconv2d(xq, ..., stride, padding, dilation,
  groups)`` -> float32, with ``weight`` an :class:`IntWeight` (int8, per-channel scale and zero)

The backend is chosen per call from the device and the machine: CUDA -> Triton (else
``torch._int_mm`` for linears, reference for convs); CPU -> oneDNN's u8s8 ops where this torch
has them (fast on AVX2, AVX-512 VNNI and AMX kinds alike, MACHINES.md), ``torch._int_mm`` for
linears on AMX, the reference elsewhere. ``STUDIO_KERNELS=reference|onednn|intmm|triton``
forces one. A fast backend that raises is demoted (logged once) and the call is answered by the
next one, so a broken kernel slows a run down instead of ending it.
"""

from __future__ import annotations

import sys as _sys

if __name__ == "kernels":
    # This folder installs as ``studio.kernels``. Run from the repository root (``python -m pytest``,
    # ``python app.py``), Python finds it first on sys.path as a top-level ``kernels`` and would
    # shadow the PyPI package of that name, which transformers imports. Hand the name over to that
    # package, or to nothing where it is not installed. (The rest of this file then runs in the
    # discarded module: its imports are light and name only studio.kernels.)
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root])
    if _spec is None:
        del _sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _real = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _real
    _spec.loader.exec_module(_real)

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from studio.kernels import reference
from studio.kernels.reference import pack_int4, unpack_int4
from studio.kernels.weights import IntWeight

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("triton", "onednn", "intmm", "reference")
_demoted: set[tuple[str, str]] = set()


@functools.lru_cache(maxsize=None)
def _triton_module() -> Any:
    try:
        from studio.kernels import triton_int8
    except Exception as exc:  # noqa: BLE001 - no triton, or a triton that cannot compile here
        log.debug("triton kernels unavailable: %s", exc)
        return None
    return triton_int8


def available(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on ``device`` here, fastest first."""
    from studio.kernels.cpu import onednn_available
    from studio.machine import cpu_kind

    dev = torch.device(device)
    if dev.type == "cuda":
        out = ["triton"] if _triton_module() is not None else []
        return out + ["intmm", "reference"]
    out = []
    if onednn_available():
        out.append("onednn")
    if cpu_kind() == "amx":  # _int_mm pays only with AMX-class units (MACHINES.md); oneDNN stays first
        out.append("intmm")
    return out + ["reference"]


_orders: dict[tuple[Any, ...], list[str]] = {}


def backend_for(op: str, device: torch.device | str) -> list[str]:
    """Backends to try for ``op`` ('linear'|'conv'|'quantize') on ``device``, in order (cached per op, device
    type, CPU kind, ``STUDIO_KERNELS`` and demotions: a model calls this several hundred times per step)."""
    from studio.machine import cpu_kind

    forced = os.environ.get("STUDIO_KERNELS")
    dev = torch.device(device).type if not isinstance(device, torch.device) else device.type
    key = (op, dev, cpu_kind(), forced, frozenset(_demoted))
    hit = _orders.get(key)
    if hit is not None:
        return hit
    _orders[key] = out = _backend_order(op, dev, forced)
    return out


def _backend_order(op: str, device: str, forced: str | None) -> list[str]:
    order = available(device)
    if forced:
        if forced not in BACKENDS:
            from studio.errors import StudioError

            raise StudioError(f"STUDIO_KERNELS={forced}: choose one of {', '.join(BACKENDS)}")
        order = [forced] + [b for b in order if b != forced]
    if op == "conv":
        order = [b for b in order if b != "intmm"]  # no im2col on the CPU: oneDNN or the reference
    return [b for b in order if (op, b) not in _demoted]


def _run(op: str, device: torch.device, impls: dict[str, Callable[[], torch.Tensor]]) -> torch.Tensor:
    for name in backend_for(op, device):
        fn = impls.get(name)
        if fn is None:
            continue
        if name == "reference":
            return fn()
        try:
            return fn()
        except NotImplementedError:  # this call's case is not covered (e.g. grouped + asymmetric): next one
            continue
        except Exception as exc:  # noqa: BLE001 - demote the backend, answer with the next one
            _demoted.add((op, name))
            log.warning("kernel %s/%s failed (%s: %s); using the next backend from now on", op, name,
                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
    return impls["reference"]()


def chosen(op: str, device: torch.device | str = "cpu") -> str:
    """The backend a call of ``op`` on ``device`` uses now."""
    return backend_for(op, device)[0]


def quantize_act(x: torch.Tensor, scale: torch.Tensor | float, zero: int, bits: int,
                 channels_last: bool = False) -> torch.Tensor:
    """Unsigned activation codes (uint8) of ``x``; NHWC when ``channels_last`` (what conv kernels read)."""
    return quantize_act_sums(x, scale, zero, bits, channels_last=channels_last)[0]


def quantize_act_sums(x: torch.Tensor, scale: torch.Tensor | float, zero: int, bits: int, *,
                      channels_last: bool = False, sums_dim: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes of ``x`` and, with ``sums_dim``, the float sums of ``codes - zero`` over that dimension (keepdim):
    what the zero-point correction of an asymmetric weight needs, computed in the same pass."""
    from studio.kernels import cpu

    def ref() -> tuple[torch.Tensor, torch.Tensor | None]:
        q = reference.quantize_act(x, scale, zero, bits)
        sums = None if sums_dim is None else (q.double() - zero).sum(sums_dim, keepdim=True).float()
        return (q.contiguous(memory_format=torch.channels_last) if channels_last and q.dim() == 4 else q), sums

    impls: dict[str, Callable[[], Any]] = {"reference": ref}
    if x.device.type != "cuda":
        fast = lambda: cpu.quantize_act_sums(x, scale, zero, bits, channels_last=channels_last,  # noqa: E731
                                             sums_dim=sums_dim)
        impls.update(onednn=fast, intmm=fast)
    return _run("quantize", x.device, impls)


def norm_act_quant(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float, scale: torch.Tensor, zero: int, bits: int, *, add: torch.Tensor | None = None,
                   sums: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes of ``silu(group_norm(x + add))`` (NHWC when 4-d, what conv kernels read) and, with ``sums``, the
    float sums of ``codes - zero`` over the channels: a ResNet block's norm, activation and quantization as
    one op (fused on the CPU; the reference composes the torch ops)."""
    from studio.kernels import cpu

    def ref() -> tuple[torch.Tensor, torch.Tensor | None]:
        q = reference.norm_act_quant(x, groups, weight, bias, eps, scale, zero, bits, add)
        s = (q.double() - zero).sum(1, keepdim=True).float() if sums else None
        return (q.contiguous(memory_format=torch.channels_last) if q.dim() == 4 else q), s

    impls: dict[str, Callable[[], Any]] = {"reference": ref}
    if x.device.type != "cuda":
        fast = lambda: cpu.norm_act_quant(x, groups, weight, bias, eps, scale, zero, bits,  # noqa: E731
                                          add=add, sums=sums)
        impls.update(onednn=fast, intmm=fast)
    return _run("quantize", x.device, impls)


def geglu_quant(h: torch.Tensor, scale: torch.Tensor, zero: int, bits: int, *,
                sums: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes of GEGLU's ``a * gelu(gate)`` (``a, gate = h.chunk(2, -1)``) and, with ``sums``, the float sums of
    ``codes - zero`` over the last dimension: a feed-forward's gate and its output layer's quantization as one op."""
    from studio.kernels import cpu

    def ref() -> tuple[torch.Tensor, torch.Tensor | None]:
        q = reference.geglu_quant(h, scale, zero, bits)
        return q, ((q.double() - zero).sum(-1, keepdim=True).float() if sums else None)

    impls: dict[str, Callable[[], Any]] = {"reference": ref}
    if h.device.type != "cuda":
        fast = lambda: cpu.geglu_quant(h, scale, zero, bits, sums=sums)  # noqa: E731
        impls.update(onednn=fast, intmm=fast)
    return _run("quantize", h.device, impls)


def multi_quant(x: torch.Tensor, scales: list[torch.Tensor], zeros: list[int], bits: int) -> list[torch.Tensor]:
    """Codes of ``x`` under each (scale, zero): several layers that read one input, quantized in one pass."""
    from studio.kernels import cpu

    impls: dict[str, Callable[[], Any]] = {
        "reference": lambda: [reference.quantize_act(x, s, z, bits) for s, z in zip(scales, zeros)]}
    if x.device.type != "cuda":
        fast = lambda: cpu.multi_quant(x, scales, zeros, bits)  # noqa: E731
        impls.update(onednn=fast, intmm=fast)
    return _run("quantize", x.device, impls)


def heads_quant(o: torch.Tensor, scale: torch.Tensor, zero: int, bits: int) -> torch.Tensor:
    """Codes of an attention output (B, heads, L, d) with its heads merged: (B, L, heads * d), contiguous."""
    from studio.kernels import cpu

    impls: dict[str, Callable[[], Any]] = {"reference": lambda: reference.heads_quant(o, scale, zero, bits)}
    if o.device.type != "cuda":
        fast = lambda: cpu.heads_quant(o, scale, zero, bits)  # noqa: E731
        impls.update(onednn=fast, intmm=fast)
    return _run("quantize", o.device, impls)


def qlinear(xq: torch.Tensor, x_scale: float, x_zero: int, weight: IntWeight,
            bias: torch.Tensor | None = None, act_sums: torch.Tensor | None = None) -> torch.Tensor:
    """Integer linear: ``x_scale (xq - x_zero) . W^T + bias`` in float32 (``act_sums``: see quantize_act_sums)."""
    from studio.kernels import cpu

    impls: dict[str, Callable[[], torch.Tensor]] = {
        "reference": lambda: reference.qlinear(xq, x_scale, x_zero, weight, bias),
        "intmm": lambda: cpu.intmm_qlinear(xq, x_scale, x_zero, weight, bias),
    }
    if xq.device.type == "cpu":
        impls["onednn"] = lambda: cpu.onednn_qlinear(xq, x_scale, x_zero, weight, bias, act_sums)
    elif _triton_module() is not None:
        impls["triton"] = lambda: _triton_module().qlinear(xq, x_scale, x_zero, weight, bias)
    return _run("linear", xq.device, impls)


def qconv2d(xq: torch.Tensor, x_scale: float, x_zero: int, weight: IntWeight, bias: torch.Tensor | None,
            stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int] = (1, 1),
            groups: int = 1, out_layout: torch.memory_format | None = None,
            act_sums: torch.Tensor | None = None) -> torch.Tensor:
    """Integer conv2d in float32 (zero padding is a real 0); ``out_layout`` fixes the output's memory format."""
    from studio.kernels import cpu

    def ref() -> torch.Tensor:
        y = reference.qconv2d(xq, x_scale, x_zero, weight, bias, stride, padding, dilation, groups)
        return y if out_layout is None else y.contiguous(memory_format=out_layout)

    impls: dict[str, Callable[[], torch.Tensor]] = {"reference": ref}
    if xq.device.type == "cpu":
        impls["onednn"] = lambda: cpu.onednn_qconv2d(xq, x_scale, x_zero, weight, bias, stride, padding, dilation,
                                                     groups, out_layout, act_sums)
    elif _triton_module() is not None:
        impls["triton"] = lambda: _triton_module().qconv2d(xq, x_scale, x_zero, weight, bias, stride, padding,
                                                           dilation, groups).contiguous(
            memory_format=out_layout or torch.contiguous_format)
    return _run("conv", xq.device, impls)


__all__ = ["BACKENDS", "IntWeight", "available", "backend_for", "chosen", "geglu_quant", "heads_quant",
           "multi_quant", "norm_act_quant", "pack_int4", "qconv2d", "qlinear", "quantize_act", "quantize_act_sums",
           "reference", "unpack_int4"]
