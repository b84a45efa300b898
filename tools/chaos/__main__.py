"""``python -m tools.chaos`` from the repository's root (or ``python tools/chaos``): a chaos run.
See `tools.chaos.harness.main` for the options and the exit codes."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a directory (python tools/chaos): make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.chaos.harness import main

sys.exit(main())
