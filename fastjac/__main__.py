"""``python -m fastjac``: the ``fastjac`` command line (see :mod:`fastjac.cli`)."""
import sys

from .cli import main

sys.exit(main())
