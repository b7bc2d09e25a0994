#!/usr/bin/env bash
# Set up diffusion-studio in .venv inside this checkout: torch (CPU build where no torch is
# present), then the studio with its test extras. Safe to run again; never replaces a torch
# that is already there (a CUDA build stays a CUDA build).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_PIN=${STUDIO_TORCH:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  # reuse a torch the system interpreter already has (e.g. a CUDA build) instead of a second copy
  if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "setup: using the torch of $PYTHON ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing $TORCH_PIN (CPU build here)"
  $PIP install -q "$TORCH_PIN"
fi
echo "setup: installing diffusion-studio, its test extras and the cluster extra (Ray)"
# Ray is optional (`studio batch --cluster`); where it cannot be installed the studio still is, and
# the tests that need Ray skip with a reason
if ! $PIP install -q -e ".[dev,cluster]"; then
  echo "setup: note: the cluster extra (Ray) did not install; --cluster and its tests are unavailable" >&2
  $PIP install -q -e ".[dev]"
fi
# the browser tests (tests/test_ui_browser.py) drive Debian's Chromium through playwright; a
# download of Playwright's own browser is not possible offline, so install the system package
CHROMIUM=${STUDIO_CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$CHROMIUM" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium for the browser tests (about a minute)"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
           DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
      echo "setup: warning: could not install chromium; the browser tests will fail until it is there" >&2
    fi
  else
    echo "setup: note: no Chromium at $CHROMIUM; the browser tests need it: sudo apt-get install chromium" >&2
  fi
fi
# tcmalloc: the studio re-executes itself with it where installed (studio/allocator.py): CPU training
# holds less memory and runs faster than on glibc's malloc (docs/realsize.md); optional
if ! .venv/bin/python -c "import sys; from studio.allocator import find; sys.exit(find() is None)" 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing tcmalloc (libtcmalloc-minimal4) for CPU training's memory"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 ||
           { DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
             DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 >/dev/null; }; }; then
      echo "setup: note: could not install tcmalloc; the studio uses glibc's malloc (slower CPU training)" >&2
    fi
  else
    echo "setup: note: no tcmalloc; CPU training is faster with it: sudo apt-get install libtcmalloc-minimal4" >&2
  fi
fi
.venv/bin/python -c "import torch, diffusers, transformers, peft, accelerate, gradio, studio; \
print(f'setup: ok (torch {torch.__version__}, diffusers {diffusers.__version__}, studio {studio.__version__})')"
