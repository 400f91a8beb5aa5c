"""``python -m hil``: the twinloop command line."""

import sys

from hil.cli import main

sys.exit(main())
