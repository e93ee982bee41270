"""Registers every `*_loss.py` module of this folder in BasicSR's registries on import."""
from odm_basicsr.compat import apply_compat
from odm_basicsr.utils.registration import import_modules_with_suffix

apply_compat()  # BasicSR 1.4.2 must be importable (and fixed) before the modules below import it

_modules = import_modules_with_suffix(__name__, __file__, '_loss')
