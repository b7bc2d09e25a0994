"""Writing .safetensors files: atomically, with the usual file permissions."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path

import torch


def _umask() -> int:
    """The process's umask. Linux shows it in /proc; elsewhere os.umask must set it to read it, which
    for an instant would let another thread create files with no mask at all."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` (and the string ``metadata`` header) to ``path``; returns the path.

    A temp file beside ``path`` (same file system), then ``os.replace``: a crash never leaves a
    half-written file under the real name. safetensors creates its files 0600; an adapter or a
    checkpoint is meant to be shared like any other file, so the mode follows the umask.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata=dict(metadata) if metadata is not None else None)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
