"""``python -m batchlab``: the command line of :mod:`batchlab.cli`."""

import sys

from .cli import main

sys.exit(main())
