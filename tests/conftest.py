"""Shared fixtures: offline, CPU, tiny models saved once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test touches the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Every tiny family saved as a diffusers folder: {family: path}."""
    from studio.testing import BUILDERS, save_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {fam: save_tiny(fam, root / fam) for fam in BUILDERS}


@pytest.fixture(autouse=True)
def _studio_home(tmp_path, monkeypatch):
    """Each test gets its own STUDIO_HOME so no test reads or writes ~/.studio."""
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "studio-home"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models (on two busy cores, two threads ran test_mixing 8x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
