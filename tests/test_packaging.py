"""The repository's top-level folders must not shadow installed packages when run from its root."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    """Run ``code`` the way ``python -c`` / ``python -m pytest`` do from the root: cwd first on sys.path."""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_top_level_kernels_folder_hands_the_name_to_the_pypi_package():
    # transformers 5 imports the PyPI package `kernels`; our kernels/ folder (installed as
    # studio.kernels) sat first on sys.path from the root and broke every transformers model import.
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the PyPI package 'kernels' is not installed here")
    got = _run("import kernels, studio.kernels as k; print(kernels.__file__); print(k.__file__)").splitlines()
    assert "site-packages" in got[0], got
    assert Path(got[1]) == ROOT / "kernels" / "__init__.py"


def test_transformers_models_import_from_the_repository_root():
    assert _run("import transformers.modeling_utils, studio.kernels; print('ok')") == "ok"
