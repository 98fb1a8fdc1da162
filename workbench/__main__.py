"""``python -m workbench``: see :mod:`workbench.cli`."""

import sys

from workbench.cli import main

sys.exit(main())
