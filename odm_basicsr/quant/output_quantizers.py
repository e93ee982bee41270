"""Output quantizers that appear after a network is built: for offsets attached at calibration, in a loaded
checkpoint, in BasicSR's separately built EMA copy.

``output_quant: auto`` (:func:`odm_basicsr.archs.quantized_arch.Quantized`) gives an 8-bit output quantizer to every
quantized layer whose output reaches a float operation, found by one forward pass when the network is built. A
distribution offset attached later by calibration puts a float shift or scale in front of its layer's input
quantizer, so the layer feeding it hands its output to a float operation too; :func:`add_auto_output_quantizers`
gives it one before training, so that the network is trained the way it will run. The other two functions create
the same quantizers where a state dict or another network has them, as the offsets' ``ensure_*`` functions do.

Plain PyTorch: no BasicSR import.
"""
import re

from .float_outputs import example_input, float_output_layers
from .layer_selection import quantized_layers

_STATE_KEY = re.compile(r'^(?:(.*)\.)?out_quant\.(?:lower_raw|upper_raw|range_scale|initialized)$')


def _options(model):
    """``(bits, learnable)`` of the output quantizers ``model`` was built for (8, True by default)."""
    config = getattr(model, 'quant_config', None) or {}
    return config.get('output_bits', 8), (config.get('act_options') or {}).get('learnable', True)


def _attach(model, names):
    bits, learnable = _options(model)
    layers = dict(quantized_layers(model))
    created = []
    for name in names:
        if name not in layers:
            raise ValueError(f'output quantizer of {name!r}: not a quantized layer of {type(model).__name__}')
        if layers[name].out_quant is None:
            layers[name].attach_output_quantizer(bits, learnable=learnable)
            created.append(name)
    config = getattr(model, 'quant_config', None)
    if created and config is not None:
        config['output_layers'] = [n for n, m in quantized_layers(model) if m.out_quant is not None]
    return created


def add_auto_output_quantizers(model):
    """For a network built with ``output_quant: auto``: an output quantizer on every quantized layer whose output
    now reaches a float operation (after offsets were attached) and has none. Returns the names of those layers
    (none for other ``output_quant`` settings). Uses one forward pass of a small random input."""
    config = getattr(model, 'quant_config', None) or {}
    if config.get('output_quant') != 'auto':
        return []
    return _attach(model, float_output_layers(model, example_input(model, config.get('arch'))))


def ensure_output_quantizers_from_state(model, state_dict):
    """Create (uninitialised) output quantizers for the ``<layer>.out_quant.*`` keys of ``state_dict`` whose layer
    has none, so that the state dict loads. Returns the names of those layers.

    Raises:
        ValueError: if a key names a module that is not a quantized layer.
    """
    names = sorted({m.group(1) or '' for m in map(_STATE_KEY.match, state_dict) if m is not None})
    return _attach(model, names)


def ensure_output_quantizers_like(dst_model, src_model):
    """Give ``dst_model`` (built separately from the same options, such as BasicSR's EMA network) the output
    quantizers ``src_model`` has, uninitialised. Returns the names of the layers that got one."""
    return _attach(dst_model, [n for n, m in quantized_layers(src_model) if m.out_quant is not None])
