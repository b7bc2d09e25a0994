"""What this machine is: CPU model, torch's CPU capability, matrix-unit flags, CUDA device.

Benchmarks print it beside their ratios (docs/BENCHMARKS.md keeps figures per CPU kind), and
code that picks a dtype or a kernel at run time asks it rather than assuming.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The matrix/vector flags of interest found in /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return frozenset(f for f in _FLAGS if f in have)
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_kind() -> str:
    """One of 'amx', 'avx512-bf16', 'avx2', 'other': the kinds docs/BENCHMARKS.md separates."""
    f = cpu_flags()
    if "amx_tile" in f:
        return "amx"
    if "avx512_bf16" in f:
        return "avx512-bf16"
    if "avx2" in f:
        return "avx2"
    return "other"


def describe() -> str:
    """One line for benchmark headers."""
    cap = torch.backends.cpu.get_cpu_capability()
    line = (f"CPU: {cpu_model()} | kind {cpu_kind()} | torch capability {cap} | flags "
            f"{','.join(sorted(cpu_flags())) or '-'} | threads {torch.get_num_threads()} | torch {torch.__version__}")
    if torch.cuda.is_available():
        line += f" | CUDA: {torch.cuda.get_device_name(0)}"
    return line
