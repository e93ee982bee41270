"""Quantization core: plain PyTorch, no BasicSR import, usable on its own."""
from .calibration import (
    CALIBRATION_MODES,
    CalibrationError,
    act_quantizers,
    all_initialized,
    calibrate,
    calibration,
    check_ranges,
    weights_unquantized,
)
from .fake_quant import FP_BITS, VALID_BITS, check_bits, clip_to_range, fake_quantize, round_ste
from .layer_selection import quantizable_layers, quantized_layers, quantizer_state_keys, select_layers, swap_layers
from .layers import QUANTIZED_TYPES, QConv2d, QLinear, QuantizedLayerMixin
from .offsets import (
    OFFSET_KINDS,
    ChannelStats,
    DistributionOffset,
    add_offsets,
    attach_offsets,
    channel_mismatch,
    channel_statistics,
    collect_channel_stats,
    ensure_offsets_from_state,
    ensure_offsets_like,
    fold_offset,
    fold_offsets,
    mismatch_scores,
    offset_layers,
    offset_report,
    scale_init,
    select_offset_layers,
    shift_init,
)
from .output_quantizers import (
    add_auto_output_quantizers,
    ensure_output_quantizers_from_state,
    ensure_output_quantizers_like,
)
from .quantizers import ActQuantizer, WeightQuantizer, mse_range, mse_symmetric_range, percentile

__all__ = [
    'CALIBRATION_MODES', 'CalibrationError', 'calibrate', 'check_ranges', 'weights_unquantized', 'mse_range',
    'mse_symmetric_range',
    'ActQuantizer', 'ChannelStats', 'DistributionOffset', 'FP_BITS', 'OFFSET_KINDS', 'QConv2d', 'QLinear',
    'QUANTIZED_TYPES', 'QuantizedLayerMixin', 'VALID_BITS', 'WeightQuantizer', 'act_quantizers', 'add_offsets',
    'all_initialized', 'attach_offsets', 'calibration', 'channel_mismatch', 'channel_statistics', 'check_bits',
    'add_auto_output_quantizers', 'clip_to_range', 'collect_channel_stats', 'ensure_offsets_from_state',
    'ensure_offsets_like', 'ensure_output_quantizers_from_state', 'ensure_output_quantizers_like', 'fake_quantize',
    'fold_offset', 'fold_offsets', 'mismatch_scores', 'offset_layers', 'offset_report', 'percentile',
    'quantizable_layers', 'quantized_layers', 'quantizer_state_keys', 'round_ste', 'scale_init', 'select_layers',
    'select_offset_layers', 'shift_init', 'swap_layers'
]
