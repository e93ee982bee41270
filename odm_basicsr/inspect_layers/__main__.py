"""``python -m odm_basicsr.inspect_layers``: the same as the console script."""
import sys

from . import main

sys.exit(main())
