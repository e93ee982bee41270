"""Importing this module registers the whole plugin in BasicSR: ``import odm_basicsr.plugin`` (or call
:func:`odm_basicsr.register`). Each subpackage applies the BasicSR 1.4.2 fixes of :mod:`odm_basicsr.compat` first."""
from odm_basicsr import archs, data, losses, models  # noqa: F401  (registration happens on import)
