"""Quantization core: plain PyTorch, no BasicSR import, usable on its own."""
from .calibration import act_quantizers, all_initialized, calibration
from .fake_quant import FP_BITS, VALID_BITS, check_bits, clip_to_range, fake_quantize, round_ste
from .layer_selection import quantizable_layers, quantized_layers, quantizer_state_keys, select_layers, swap_layers
from .layers import QUANTIZED_TYPES, QConv2d, QLinear, QuantizedLayerMixin
from .quantizers import ActQuantizer, WeightQuantizer, percentile

__all__ = [
    'ActQuantizer', 'FP_BITS', 'QConv2d', 'QLinear', 'QUANTIZED_TYPES', 'QuantizedLayerMixin', 'VALID_BITS',
    'WeightQuantizer', 'act_quantizers', 'all_initialized', 'calibration', 'check_bits', 'clip_to_range',
    'fake_quantize', 'percentile', 'quantizable_layers', 'quantized_layers', 'quantizer_state_keys', 'round_ste',
    'select_layers', 'swap_layers'
]
