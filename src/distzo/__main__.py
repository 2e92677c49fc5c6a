"""``python -m distzo``: the ``distzo`` command."""

import sys

from distzo.cli import main

sys.exit(main())
