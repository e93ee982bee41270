"""odm-basicsr: ODM quantization-aware training of SR networks, as a BasicSR plugin.

Importing this package first makes BasicSR 1.4.2 work with current software (see :mod:`odm_basicsr.compat`),
then registers the plugin's archs, datasets, losses and models in BasicSR's registries.
"""
from odm_basicsr.compat import apply_compat as _apply_compat

_apply_compat()

from odm_basicsr import archs, data, losses, models  # noqa: E402  (registration happens on import)

__version__ = '0.1.0'
__all__ = ['archs', 'data', 'losses', 'models']
