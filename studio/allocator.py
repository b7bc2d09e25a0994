"""The memory allocator of studio processes on Linux: tcmalloc or jemalloc where one is installed.

A CPU training step allocates and frees gigabytes of activations. glibc's malloc either keeps the
freed blocks resident (its default: SD 1.5's step at 512 px peaked at 5.4 GiB) or, with the low
mmap threshold the trainer sets (``studio.loading.hand_back_freed_memory``), hands every large
block back and pays a page fault per page on the next one (about 15% of that step). tcmalloc and
jemalloc keep freed blocks in size classes for reuse without that growth: measured in
docs/realsize.md. The choice is made at start-up, as Stable Diffusion web UI's launcher does: the
``studio`` command (and ``app.py``) re-executes itself once, before torch is imported, with the
library in ``LD_PRELOAD``; child processes inherit it.

``STUDIO_ALLOCATOR``: ``auto`` (default: tcmalloc, else jemalloc, else glibc), ``tcmalloc``,
``jemalloc``, or ``system`` (glibc's, no re-execution). Nothing changes where neither library is
installed (Debian/Ubuntu: ``apt-get install libtcmalloc-minimal4``; ``./setup.sh`` does so when it
can) or off Linux.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

LIBRARIES = {"tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"), "jemalloc": ("libjemalloc.so.2",)}
CHOICES = ("auto", "tcmalloc", "jemalloc", "system")
ACTIVE_MARK = "STUDIO_ALLOCATOR_ACTIVE"  # set in the re-executed process: never re-execute twice


def search_dirs() -> list[Path]:
    """Where the shared libraries are looked for: the environment's own lib folder, then the system's."""
    dirs = [Path(sys.prefix) / "lib"]
    if os.environ.get("CONDA_PREFIX"):
        dirs.append(Path(os.environ["CONDA_PREFIX"]) / "lib")
    machine = os.uname().machine if hasattr(os, "uname") else ""
    for base in ("/usr/lib", "/lib"):
        dirs += [Path(base) / f"{machine}-linux-gnu", Path(base)]
    return dirs + [Path("/usr/lib64"), Path("/usr/local/lib")]


def find(choice: str = "auto", dirs: list[Path] | None = None) -> tuple[str, Path] | None:
    """(name, path) of the allocator ``choice`` selects, or None (``system``, or none installed)."""
    if choice not in CHOICES:
        raise ValueError(f"STUDIO_ALLOCATOR={choice!r}: choose one of {', '.join(CHOICES)}")
    names = [] if choice == "system" else list(LIBRARIES) if choice == "auto" else [choice]
    for name in names:
        for d in dirs if dirs is not None else search_dirs():
            for lib in LIBRARIES[name]:
                if (d / lib).is_file():
                    return name, d / lib
    return None


def _ours(entry: str) -> bool:
    """Whether an ``LD_PRELOAD`` entry is one of :data:`LIBRARIES`."""
    return any(lib in entry for libs in LIBRARIES.values() for lib in libs)


def system_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` for a process on the system allocator: tcmalloc and jemalloc taken out of ``LD_PRELOAD``
    (the user's other preloads kept) and the re-execution mark dropped (benches compare against it)."""
    env = {k: v for k, v in environ.items() if k != ACTIVE_MARK}
    env["LD_PRELOAD"] = " ".join(p for p in env.get("LD_PRELOAD", "").split() if not _ours(p))
    return env


def preload_environment(environ: Mapping[str, str], platform: str = sys.platform,
                        dirs: list[Path] | None = None) -> dict[str, str] | None:
    """The environment to re-execute with, or None when this process should go on as it is."""
    if not platform.startswith("linux") or environ.get(ACTIVE_MARK):
        return None
    choice = environ.get("STUDIO_ALLOCATOR", "auto").strip().lower() or "auto"
    preload = environ.get("LD_PRELOAD", "")
    if _ours(preload):
        return None  # the user preloads one already
    try:
        found = find(choice, dirs)
    except ValueError as exc:
        log.warning("%s; using the system allocator", exc)
        return None
    if found is None:
        if choice not in ("auto", "system"):
            log.warning("STUDIO_ALLOCATOR=%s: not installed; using the system allocator", choice)
        return None
    name, path = found
    env = dict(environ)
    env["LD_PRELOAD"] = f"{path} {preload}".strip()
    env[ACTIVE_MARK] = name
    # tcmalloc reports every allocation over 1 GiB on stderr (a model's weights are several); not a problem here
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    return env


def reexec_with_allocator() -> None:
    """Re-execute this process under the chosen allocator (see the module doc); returns where nothing is to do.

    Only from a process's entry point, before torch is imported (after that the old allocator holds
    memory already and the libraries are loaded).
    """
    if "torch" in sys.modules or not getattr(sys, "orig_argv", None):
        return
    env = preload_environment(os.environ)
    if env is None:
        return
    try:
        os.execve(sys.executable, list(sys.orig_argv), env)
    except OSError as exc:  # go on with the system allocator rather than not at all
        log.warning("could not re-execute with %s (%s); using the system allocator", env["LD_PRELOAD"], exc)


def active() -> str:
    """The allocator this process runs on: tcmalloc, jemalloc or system."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for name, libs in LIBRARIES.items():
        if any(lib.split(".so")[0] + ".so" in maps for lib in libs):
            return name
    return "system"
