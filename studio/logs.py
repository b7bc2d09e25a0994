"""Logging set-up shared by the CLI, the UI and the benches."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(debug: bool = False, quiet: bool = False) -> None:
    """Studio log format on stderr; libraries' own chatter and progress bars off unless debugging."""
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s" if not debug else "%(levelname)s %(name)s: %(message)s")
    if not debug:
        # the libraries' own chatter (weights loading bars, deprecation notes) hides our output
        for noisy in ("diffusers", "transformers", "accelerate", "peft", "httpx", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")  # weight-loading bars of diffusers/transformers
        quiet_libraries()
        import warnings

        warnings.filterwarnings("ignore")


def quiet_libraries() -> None:
    """Turn off progress bars of libraries already imported (when main() runs in-process).

    The environment variables above are read at import time, so a library imported before
    main() (a test, a notebook, the UI) needs its own switch.
    """
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
