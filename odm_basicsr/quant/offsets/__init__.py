"""Distribution offsets (METHOD.md section 4.3): a learnable per-channel shift or scale before the activation
quantizer of the layers whose channels mismatch most.

Pipeline, one module each:

1. :mod:`.channel_stats`: per quantized layer, the per-channel mean and standard deviation of its input (measure
   them inside :func:`~odm_basicsr.quant.calibration.calibration`, i.e. on the FP network);
2. :mod:`.selection`: mismatch scores and the layers (and kinds) that get an offset;
3. :mod:`.distribution_offset`: the offset module and its forms; :mod:`.attach`: :func:`add_offsets` scores,
   selects and attaches in one call (then calibrate the ranges again: the quantizer now sees the normalised input);
4. :mod:`.folding`: folding into the layer parameters for deployment, and the cost report.

Plain PyTorch: no BasicSR import.
"""
from .attach import (
    add_offsets,
    attach_offsets,
    ensure_offsets_from_state,
    ensure_offsets_like,
    offset_layers,
)
from .channel_stats import ChannelStats, channel_statistics, collect_channel_stats
from .distribution_offset import MIN_RHO, OFFSET_KINDS, RHO_EPS, DistributionOffset, scale_init, shift_init
from .folding import fold_offset, fold_offsets, offset_report
from .selection import KIND_CHOICES, SELECT_MODES, channel_mismatch, mismatch_scores, select_offset_layers

__all__ = [
    'KIND_CHOICES', 'MIN_RHO', 'OFFSET_KINDS', 'RHO_EPS', 'SELECT_MODES', 'ChannelStats', 'DistributionOffset',
    'add_offsets', 'attach_offsets', 'channel_mismatch', 'channel_statistics', 'collect_channel_stats',
    'ensure_offsets_from_state', 'ensure_offsets_like', 'fold_offset', 'fold_offsets', 'mismatch_scores',
    'offset_layers', 'offset_report', 'scale_init', 'select_offset_layers', 'shift_init'
]
