"""One timestep hook on the denoiser: the scheduler's timestep of each call, handed to listeners.

DESIGN.md ("Time"): methods that depend on the denoising step read it from one hook on the
denoiser, set from the timestep the pipeline passes in, never from a call counter (classifier-free
guidance, extra passes and other step counts break counters). :class:`TimestepHook` is that
hook, a named, removable diffusers ``ModelHook``: every call of the denoiser reads its
``timestep`` argument (positional or keyword) and, before the denoiser runs, calls each listener
with it as a float. Listeners turn it into what they need: temporal LSQ (studio.quant) picks a
step size, the mixing clock (studio.mixing) a fraction of the run.

    listen_timestep(unet, on_t)     # installs the hook the first time
    unlisten_timestep(unet, on_t)   # the hook leaves with its last listener
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

HOOK_NAME = "studio.timestep"

TimestepListener = Callable[[float], None]


def timestep_value(timestep: Any) -> float | None:
    """The timestep of one denoiser call as a float (None when there is none).

    A batch of timesteps must be uniform: a denoising step runs every sample (and both halves of
    classifier-free guidance) at the same timestep; a mixed batch (a training step with random
    timesteps) has no single step, so the first one is used and a warning says so once.
    """
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            return None
        flat = timestep.detach().flatten()
        first = float(flat[0])
        if flat.numel() > 1 and not bool((flat == flat[0]).all()):
            _warn_mixed()
        return first
    return float(timestep)


@functools.lru_cache(maxsize=1)
def _warn_mixed() -> None:
    log.warning("the denoiser was called with a batch of different timesteps; step-dependent methods use the "
                "first one (run one denoising step per call)")


@functools.lru_cache(maxsize=1)
def _hook_class() -> type:
    from diffusers.hooks import ModelHook  # diffusers is slow to import: only when a hook is needed

    class TimestepHook(ModelHook):
        """diffusers hook: hands each denoiser call's timestep to its listeners before the call runs."""

        def __init__(self) -> None:
            super().__init__()
            self.listeners: list[TimestepListener] = []
            self.timestep: float | None = None

        def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict]:
            # UNet2DConditionModel/UNet2DModel/transformers all take (sample, timestep, ...)
            t = timestep_value(kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None))
            if t is not None:
                self.timestep = t
                for listener in list(self.listeners):
                    listener(t)
            return args, kwargs

    return TimestepHook


def timestep_hook(module: torch.nn.Module, create: bool = True) -> Any:
    """The denoiser's timestep hook (installed when ``create`` and absent; else None when absent)."""
    from diffusers.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(module) if create else getattr(module, "_diffusers_hook",
                                                                                         None)
    if registry is None:
        return None
    hook = registry.get_hook(HOOK_NAME)
    if hook is None and create:
        hook = _hook_class()()
        registry.register_hook(hook, HOOK_NAME)
    return hook


def listen_timestep(module: torch.nn.Module, listener: TimestepListener) -> None:
    """Call ``listener(t)`` with the timestep of every call of ``module`` (installs the hook if needed)."""
    hook = timestep_hook(module)
    if listener not in hook.listeners:
        hook.listeners.append(listener)


def unlisten_timestep(module: torch.nn.Module, listener: TimestepListener) -> None:
    """Stop calling ``listener``; the hook leaves the module with its last listener."""
    hook = timestep_hook(module, create=False)
    if hook is None:
        return
    hook.listeners = [f for f in hook.listeners if f != listener]  # bound methods are new objects: compare
    if not hook.listeners:
        module._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)


__all__ = ["HOOK_NAME", "listen_timestep", "timestep_hook", "timestep_value", "unlisten_timestep"]
