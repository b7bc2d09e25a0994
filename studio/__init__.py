"""diffusion-studio: train, keep and mix adapters for diffusers text-to-image models."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_pipeline", "__version__"]


def __getattr__(name: str) -> Any:
    # torch and diffusers take seconds to import: keep `import studio` (and `studio --help`) fast
    if name == "load_pipeline":
        from studio.loading import load_pipeline

        return load_pipeline
    raise AttributeError(name)
