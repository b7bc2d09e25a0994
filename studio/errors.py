"""The studio's user-facing errors: one clear line naming the input and the fix."""

from __future__ import annotations


class StudioError(Exception):
    """Bad input or a missing resource. The CLI prints it as one line and exits with status 2."""

    exit_code = 2


class MissingDependencyError(StudioError):
    """An optional package (bitsandbytes, xformers, ...) was asked for but is not installed."""


def require(module: str, extra: str, why: str):
    """Import an optional module lazily, or raise a StudioError saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{why} needs the optional package '{module}', which is not installed: "
            f"pip install 'diffusion-studio[{extra}]' (CUDA machines only)"
        ) from exc
