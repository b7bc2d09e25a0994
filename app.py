"""`python app.py`: the diffusion-studio web UI on http://127.0.0.1:7860 (see `python app.py --help`)."""

import sys

if __name__ == "__main__":
    from studio.allocator import reexec_with_allocator

    reexec_with_allocator()  # before torch is imported (studio.allocator)
    from studio.ui import main

    sys.exit(main())
