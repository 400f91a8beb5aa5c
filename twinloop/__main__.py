"""``python -m twinloop``: the twinloop command line."""

import sys

from twinloop.cli.main import main

sys.exit(main())
