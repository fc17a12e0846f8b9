"""``python -m hetfl`` is the ``hetfl`` command."""

import sys

from hetfl.cli import main

sys.exit(main())
