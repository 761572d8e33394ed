"""``python -m clear_surgery.surgery.cli``: the console script (torchrun relaunches commands this way)."""

import sys

from . import main

sys.exit(main())
