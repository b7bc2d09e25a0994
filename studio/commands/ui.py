"""`studio ui`: serve the Gradio studio (the same as `python app.py`)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from studio.ui import add_arguments, run

    p = sub.add_parser("ui", help="open the web UI (Gradio) on 127.0.0.1:7860",
                       description="Serve the studio's Train, Library and Generate tabs in the browser. It listens on "
                                   "127.0.0.1 only and opens no public link unless --share is given.")
    add_arguments(p)
    p.set_defaults(func=run)
