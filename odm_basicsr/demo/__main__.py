"""``python -m odm_basicsr.demo``: the same as the console script."""
import sys

from . import main

sys.exit(main())
