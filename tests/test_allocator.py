"""studio.allocator: which allocator a studio process re-executes with, and that it does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from studio import allocator


def _fake_libs(tmp_path: Path, *names: str) -> Path:
    for n in names:
        (tmp_path / n).write_bytes(b"")
    return tmp_path


def test_auto_prefers_tcmalloc_then_jemalloc(tmp_path):
    both = _fake_libs(tmp_path, "libtcmalloc_minimal.so.4", "libjemalloc.so.2")
    assert allocator.find("auto", [both]) == ("tcmalloc", both / "libtcmalloc_minimal.so.4")
    assert allocator.find("jemalloc", [both]) == ("jemalloc", both / "libjemalloc.so.2")
    assert allocator.find("system", [both]) is None
    assert allocator.find("auto", [tmp_path / "empty"]) is None
    with pytest.raises(ValueError, match="choose one of"):
        allocator.find("mimalloc", [both])


def test_preload_environment_decisions(tmp_path):
    libs = [_fake_libs(tmp_path, "libjemalloc.so.2")]
    env = allocator.preload_environment({"LD_PRELOAD": "/x/libfoo.so", "PATH": "/bin"}, "linux", libs)
    assert env["LD_PRELOAD"] == f"{tmp_path / 'libjemalloc.so.2'} /x/libfoo.so"  # the user's preloads kept
    assert env[allocator.ACTIVE_MARK] == "jemalloc" and env["PATH"] == "/bin"
    assert allocator.preload_environment(env, "linux", libs) is None  # never twice
    assert allocator.preload_environment({"STUDIO_ALLOCATOR": "system"}, "linux", libs) is None
    assert allocator.preload_environment({"STUDIO_ALLOCATOR": "tcmalloc"}, "linux", libs) is None  # not installed
    assert allocator.preload_environment({"STUDIO_ALLOCATOR": "bogus"}, "linux", libs) is None
    assert allocator.preload_environment({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "linux", libs) is None
    assert allocator.preload_environment({}, "darwin", libs) is None
    system = allocator.system_environment(env)  # back to glibc, the user's own preload kept
    assert system["LD_PRELOAD"] == "/x/libfoo.so" and allocator.ACTIVE_MARK not in system


def _run(env_extra: dict[str, str]) -> str:
    import os

    code = ("from studio.allocator import reexec_with_allocator, active; reexec_with_allocator(); "
            "import torch; print(active())")
    env = allocator.system_environment(os.environ) | env_extra
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          check=True).stdout.strip()


@pytest.mark.skipif(allocator.find("auto") is None, reason="neither tcmalloc nor jemalloc is installed here")
def test_a_process_reexecutes_under_the_installed_allocator():
    assert _run({}) == allocator.find("auto")[0]
    assert _run({"STUDIO_ALLOCATOR": "system"}) == "system"
