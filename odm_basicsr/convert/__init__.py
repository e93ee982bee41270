"""Full-precision EDSR-PyTorch / DAQ / DDTB checkpoints converted to BasicSR / odm_basicsr state dicts.

:mod:`.layout` reads a source checkpoint and recognises its layout, :mod:`.rules` maps its keys (:func:`convert`),
:mod:`.reference` holds minimal copies of the source networks and :func:`check` compares outputs. The command line is
``scripts/convert_edsr_pytorch.py``.
"""
import odm_basicsr.archs  # noqa: F401  (BasicSR fixes + registration first: RDN and SRResNet are the plugin's)

from .layout import ConversionError, detect_layout, load_source, unwrap_state_dict
from .reference import EDSRPyTorchRef, RDNRef, SRResNetDAQRef, SRResNetDDTBRef, build_reference, check
from .rules import ARCHS, DIV2K_MEAN, Conversion, convert, target_state_shapes

__all__ = ['ARCHS', 'DIV2K_MEAN', 'Conversion', 'ConversionError', 'EDSRPyTorchRef', 'RDNRef', 'SRResNetDAQRef',
           'SRResNetDDTBRef', 'build_reference', 'check', 'convert', 'detect_layout', 'load_source',
           'target_state_shapes', 'unwrap_state_dict']
