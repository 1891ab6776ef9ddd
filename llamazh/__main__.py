"""``python -m llamazh``: the same as the ``llamazh`` console script."""

import sys

from llamazh.cli import main

sys.exit(main())
