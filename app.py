"""`python app.py`: the diffusion-studio web UI on http://127.0.0.1:7860 (see `python app.py --help`)."""

import sys

from studio.ui import main

if __name__ == "__main__":
    sys.exit(main())
