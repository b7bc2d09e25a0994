"""QALoRA layers with temporal LSQ activation quantizers (fake quantization, for calibration and training).

:class:`QuantLayer` wraps a ``Linear`` or ``Conv2d`` (``base_layer``) and computes
``Y = Q_a(X) . Q_w(W0 + B A)``: weights quantized per output channel, activations per tensor
with one step size and zero point per denoising step (temporal LSQ). The step is chosen by a
:class:`StepClock` shared by every layer of a model, which the timestep hook of
:mod:`studio.hooks` sets from the scheduler's timestep. The math lives in
:mod:`studio.quant.functional`; the integer modules that replace these layers after export are
in :mod:`studio.quant.runtime`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from studio.quant import functional as QF


class StepClock:
    """Which denoising step's activation parameters are live: set from the timestep, never counted.

    ``timesteps`` is the grid the parameters were calibrated on (the scheduler's timesteps of the
    calibration run). A timestep on the grid selects its step exactly, so a run with a step count
    whose grid is a subset of the calibration grid (10 of 20 DPM++ steps) subsamples it; a
    timestep between two grid points interpolates linearly between their parameters; one outside
    the grid takes the nearest end.
    """

    def __init__(self, timesteps: Sequence[float]) -> None:
        ts = [float(t) for t in timesteps]
        if not ts:
            raise ValueError("StepClock needs at least one calibration timestep")
        if len(set(ts)) != len(ts):
            raise ValueError(f"calibration timesteps repeat: {ts}; calibrate with a first-order sampler grid")
        self.timesteps = ts
        # ascending copy for bisect, with the step index of each
        order = sorted(range(len(ts)), key=lambda i: ts[i])
        self._asc = [ts[i] for i in order]
        self._idx = order
        self.lo, self.hi, self.w = 0, 0, 0.0
        self.timestep: float | None = None

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def locate(self, t: float) -> tuple[int, int, float]:
        """(step a, step b, weight of b) for timestep ``t``: parameters are (1-w) p[a] + w p[b]."""
        asc = self._asc
        j = bisect.bisect_left(asc, t)
        if j < len(asc) and math.isclose(asc[j], t, rel_tol=0.0, abs_tol=1e-3):
            return self._idx[j], self._idx[j], 0.0
        if j > 0 and math.isclose(asc[j - 1], t, rel_tol=0.0, abs_tol=1e-3):
            return self._idx[j - 1], self._idx[j - 1], 0.0
        if j == 0:
            return self._idx[0], self._idx[0], 0.0
        if j == len(asc):
            return self._idx[-1], self._idx[-1], 0.0
        t0, t1 = asc[j - 1], asc[j]
        w = (t - t0) / (t1 - t0)
        return self._idx[j - 1], self._idx[j], w

    def set_timestep(self, t: float) -> None:
        """The hook's listener: select the parameters of timestep ``t``."""
        self.timestep = t
        self.lo, self.hi, self.w = self.locate(t)

    def set_step(self, i: int) -> None:
        """Select step ``i`` of the calibration grid directly (tests, calibration)."""
        self.set_timestep(self.timesteps[i])

    def pick(self, p: torch.Tensor) -> torch.Tensor:
        """The live value of a per-step parameter ``p`` (first dimension: steps)."""
        if self.w == 0.0:
            return p[self.lo]
        return p[self.lo] * (1.0 - self.w) + p[self.hi] * self.w


class WeightQuantizer(nn.Module):
    """Per-output-channel quantizer of a weight: scale and zero of shape (O, 1, ...). Asymmetric (min/max),
    or with ``symmetric`` the zero point fixed at the middle code (what int8 kernels run without a
    zero-point correction)."""

    def __init__(self, weight: torch.Tensor, bits: int, symmetric: bool = False) -> None:
        super().__init__()
        self.bits = bits
        self.symmetric = symmetric
        shape = (weight.shape[0],) + (1,) * (weight.dim() - 1)
        self.scale = nn.Parameter(torch.ones(shape, dtype=torch.float32), requires_grad=False)
        self.zero = nn.Parameter(torch.zeros(shape, dtype=torch.float32), requires_grad=False)
        self.g = 1.0

    @torch.no_grad()
    def init_minmax(self, w: torch.Tensor) -> None:
        s, z = QF.minmax_params(w.float(), self.bits, 0, symmetric=self.symmetric)
        self.scale.copy_(s)
        self.zero.copy_(z)

    @torch.no_grad()
    def init_lp(self, w: torch.Tensor, p: float = QF.DEFAULT_P) -> None:
        s, z = QF.lp_search(w.float(), self.bits, channel_dim=0, p=p, symmetric=self.symmetric)
        self.scale.copy_(s)
        self.zero.copy_(z)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return QF.fake_quant(w, self.scale, self.zero, self.bits, self.g)

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """The integer codes of ``w`` (float dtype)."""
        return QF.quantize_codes(w.float(), self.scale, self.zero, self.bits)


class ActQuantizer(nn.Module):
    """Per-tensor asymmetric quantizer of a layer input with one (scale, zero) per denoising step."""

    def __init__(self, steps: int, bits: int, clock: StepClock) -> None:
        super().__init__()
        self.bits = bits
        self.scale = nn.Parameter(torch.ones(steps, dtype=torch.float32), requires_grad=False)
        self.zero = nn.Parameter(torch.zeros(steps, dtype=torch.float32), requires_grad=False)
        self.clock = clock
        self.g = 1.0

    def live(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) for the current step."""
        return self.clock.pick(self.scale), self.clock.pick(self.zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, z = self.live()
        return QF.fake_quant(x, s, z, self.bits, self.g)


class QuantLayer(nn.Module):
    """``Y = Q_a(X) . Q_w(W0 + B A)`` around a Linear or Conv2d ``base_layer`` (QALoRA, He et al. 2024).

    ``rank`` 0 means no LoRA branch (the first and last layers; PTQ). For a conv, A (``lora_down``)
    is a conv with the layer's kernel, stride and padding to ``rank`` channels and B (``lora_up``)
    a 1x1 conv; their product is merged into the weight before quantization, so the forward is
    one quantized conv. ``quant`` False runs the base layer unchanged (full precision).
    """

    def __init__(self, base_layer: nn.Module, *, wbits: int, abits: int, rank: int, clock: StepClock,
                 name: str = "") -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"QuantLayer wraps Linear or Conv2d, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.name = name
        self.conv = isinstance(base_layer, nn.Conv2d)
        self.wbits, self.abits, self.rank = wbits, abits, rank
        w = base_layer.weight
        self.wq = WeightQuantizer(w, wbits)
        self.aq = ActQuantizer(clock.steps, abits, clock)
        self.quant = True
        if rank > 0:
            if self.conv:
                cin = base_layer.in_channels // base_layer.groups
                down = torch.empty(rank, cin, *base_layer.kernel_size)
                up = torch.zeros(w.shape[0], rank, 1, 1)
            else:
                down = torch.empty(rank, base_layer.in_features)
                up = torch.zeros(base_layer.out_features, rank)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # PEFT's LoRA init: A random, B zero
            self.lora_down = nn.Parameter(down.to(w.dtype))
            self.lora_up = nn.Parameter(up.to(w.dtype))
        else:
            self.lora_down = self.lora_up = None

    def merged_weight(self) -> torch.Tensor:
        """W0 + B A (W0 when there is no LoRA branch)."""
        w = self.base_layer.weight
        if self.lora_down is None:
            return w
        return w + QF.lora_delta(w.shape, self.lora_down, self.lora_up)

    def quant_weight(self) -> torch.Tensor:
        """Q_w(W0 + B A)."""
        return self.wq(self.merged_weight())

    def _run(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        b = self.base_layer
        if self.conv:
            return b._conv_forward(x, w, b.bias)
        return F.linear(x, w, b.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quant:
            return self.base_layer(x)
        return self._run(self.aq(x), self.quant_weight())

    def extra_repr(self) -> str:
        return f"W{self.wbits}A{self.abits}, rank {self.rank}"
