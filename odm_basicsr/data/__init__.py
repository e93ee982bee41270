"""Registers every `*_dataset.py` module of this folder in BasicSR's registries on import."""
from odm_basicsr.utils.registration import import_modules_with_suffix

_modules = import_modules_with_suffix(__name__, __file__, '_dataset')
