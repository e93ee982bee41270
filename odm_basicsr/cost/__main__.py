"""``python -m odm_basicsr.cost``: the same as the console script."""
import sys

from . import main

sys.exit(main())
