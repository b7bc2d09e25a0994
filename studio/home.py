"""The studio's home folder (library, caches): $STUDIO_HOME, else ~/.studio."""

from __future__ import annotations

import os
from pathlib import Path


def studio_home() -> Path:
    """The studio's home folder: $STUDIO_HOME, else ~/.studio (not created here)."""
    return Path(os.environ.get("STUDIO_HOME") or Path.home() / ".studio")
