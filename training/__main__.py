"""``python -m training``: the training command line."""

import sys

from training.cli import main

sys.exit(main())
