"""``python -m llara.cli ...``: the same as the ``llara`` script."""
import sys

from . import main

sys.exit(main())
