"""`python -m serving` runs the ranking service (see serving.ranking)."""

from __future__ import annotations

import sys

from serving.ranking.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
