"""``Quantized``: any BasicSR arch with selected layers swapped for quantized ones."""
import difflib
import inspect

from basicsr.utils.registry import ARCH_REGISTRY

from odm_basicsr.quant import (
    FP_BITS,
    ActQuantizer,
    WeightQuantizer,
    check_bits,
    quantizable_layers,
    quantized_layers,
    select_layers,
    swap_layers,
)
from odm_basicsr.quant.float_outputs import example_input, float_output_layers
from odm_basicsr.quant.layer_selection import names_matching

from .layer_presets import LAYER_PRESETS, all_but_first_last


class QuantizedNetwork:
    """Mixed into the class of every network that :func:`Quantized` returns (``QuantizedEDSR`` etc.)."""

    quant_config = None  # the options it was built with (a plain attribute, not part of the state dict)

    def quantized_layers(self):
        """``(name, module)`` pairs of the quantized layers."""
        return quantized_layers(self)


_CLASSES = {}


def _quantized_class(cls):
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f'Quantized{cls.__name__}', (QuantizedNetwork, cls), {'__module__': cls.__module__})
    return _CLASSES[cls]


def _suggest(name, choices):
    close = difflib.get_close_matches(name, choices, n=3)
    return f' Did you mean {close}?' if close else ''


def build_inner_arch(arch):
    """Build the FP network described by ``arch`` (``{'type': ..., **kwargs}``), rejecting unknown keys."""
    if not isinstance(arch, dict) or 'type' not in arch:
        raise ValueError(f'Quantized: "arch" must be a mapping with a "type" key (e.g. {{type: EDSR, ...}}), '
                         f'got {arch!r}')
    kwargs = dict(arch)
    arch_type = kwargs.pop('type')
    registered = sorted(ARCH_REGISTRY._obj_map)
    if arch_type == 'Quantized':
        raise ValueError('Quantized: "arch" must be an FP architecture, not Quantized itself')
    if arch_type not in ARCH_REGISTRY:
        raise ValueError(f'Quantized: unknown arch type {arch_type!r}.{_suggest(arch_type, registered)} '
                         f'Registered archs: {", ".join(registered)}')
    cls = ARCH_REGISTRY.get(arch_type)
    params = inspect.signature(cls).parameters
    named = [n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    unknown = [k for k in kwargs if k not in named]
    if unknown:  # also for archs that swallow **kwargs (SwinIR), where a typo would be silently ignored
        hint = ''.join(_suggest(k, named) for k in unknown)
        raise ValueError(f'Quantized: unknown option(s) {unknown} for arch {arch_type}.{hint} '
                         f'Accepted: {", ".join(named)}')
    return cls(**kwargs)


def resolve_layer_names(net, arch_type, layers='default', exclude=None):
    """Names of the layers to quantize for ``layers`` = 'default' | 'all' | list of patterns."""
    candidates = quantizable_layers(net)
    if layers == 'default':
        if arch_type not in LAYER_PRESETS:
            raise ValueError(f'Quantized: no default layer set for arch {arch_type}; give "layers" as a list of '
                             f'glob or "re:" patterns. Candidate layers: {", ".join(candidates)}')
        layers = LAYER_PRESETS[arch_type]
    elif layers == 'all':
        layers = all_but_first_last(candidates)
    return select_layers(net, layers, exclude or (), model_name=arch_type)


@ARCH_REGISTRY.register()
def Quantized(arch,
              w_bits=4,
              a_bits=4,
              layers='default',
              exclude=None,
              act_init='auto',
              act_percentile=99.0,
              act_learnable=True,
              weight_granularity='layer',
              weight_range=None,
              weight_percentile=99.0,
              clip_correction=False,
              offsets=None,
              act_grid='free',
              weight_grid='midrise',
              output_quant=None,
              output_bits=8,
              **unknown):
    """Build a registered BasicSR arch and quantize the selected convolution/linear layers.

    The returned network is the inner arch itself (class ``Quantized<Arch>``), so its state-dict keys are the
    FP arch's keys plus the quantizer entries: an FP checkpoint of the inner arch loads without renaming.

    Args:
        arch (dict): The FP network, as BasicSR's ``network_g``: ``{type: EDSR, upscale: 4, ...}``.
        w_bits (int): Weight bits, 2..8, or 32 for FP. Default: 4.
        a_bits (int): Input-activation bits, 2..8, or 32 for FP. Default: 4.
        layers (str | list[str]): ``'default'`` (the arch's preset, see ``layer_presets.py``), ``'all'`` (every
            Conv2d/Linear but the first and last), or glob / ``re:`` patterns on module names. Default: 'default'.
        exclude (list[str]): Patterns removed from the selection. Default: None.
        act_init (str): Activation range statistic of calibration: ``'mse'`` (the range minimising the
            quantization MSE at ``a_bits``), ``'percentile'``, ``'minmax'``, or ``'auto'`` (chosen per bit width by
            measurement: ``quant.quantizers.default_act_init``). Default: 'auto'.
        act_percentile (float): Upper percentile p; the lower bound uses 100 - p. Default: 99.
        act_learnable (bool): Learn the activation bounds. Default: True.
        weight_granularity (str): ``'layer'`` or ``'channel'`` (per output channel). Default: 'layer'.
        weight_range (str | None): ``'mse'`` (the symmetric range minimising the quantization MSE of W at
            ``w_bits``), ``'maxabs'`` or ``'percentile'`` of |W|; None or ``'auto'``: chosen per bit width by
            measurement (``quant.quantizers.default_weight_range``; the 2024 percentile with clip_correction).
            Default: None.
        weight_percentile (float): Percentile of |W| for ``weight_range: percentile``. Default: 99.
        clip_correction (bool): 2024 version's weight clipping correction (learnable factor on the weight
            range). Default: False.
        offsets (dict | None): Distribution offsets (METHOD.md 4.3), attached by ``ODMModel`` at calibration:
            ``{select: topk | threshold, fraction: 0.25, threshold: ~, kind: auto | shift | scale}``.
            None or false: no offsets. Default: None.
        act_grid (str): ``'free'`` (``2**a_bits`` levels spanning the learned range) or ``'aligned'`` (the same step
            with 0 on the grid: an integer zero point, exactly what the exported integer network computes).
            Default: 'free'.
        weight_grid (str): ``'midrise'`` (``2**w_bits`` levels, no zero level) or ``'midtread'`` (``2**w_bits - 1``
            symmetric levels with a zero level). Default: 'midrise'.
        output_quant (str | list[str] | None): Quantize the output of these quantized layers too (8-bit by default,
            zero-aligned grid containing 0), so that they run as integer convolutions when deployed: ``'auto'``
            (every quantized layer whose output reaches a float operation, found by one forward pass:
            ``quant.float_outputs``), or glob / ``re:`` patterns among the quantized layers. Default: None.
        output_bits (int): Bits of the output quantizers, 2..8. Default: 8.
    """
    if unknown:
        accepted = [n for n in inspect.signature(Quantized).parameters if n != 'unknown']
        hint = ''.join(_suggest(k, accepted) for k in unknown)
        raise ValueError(f'Quantized: unknown option(s) {sorted(unknown)}.{hint} Accepted: {", ".join(accepted)}')
    w_bits, a_bits = check_bits(w_bits, 'w_bits'), check_bits(a_bits, 'a_bits')
    act_options = dict(init=act_init, init_percentile=act_percentile, learnable=bool(act_learnable), grid=act_grid)
    weight_options = dict(granularity=weight_granularity, range_method=weight_range, percentile=weight_percentile,
                          clip_correction=clip_correction, grid=weight_grid)
    ActQuantizer(4, **act_options), WeightQuantizer(4, **weight_options)  # validate options before building
    output_bits = check_bits(output_bits, 'output_bits')
    if output_bits == FP_BITS:
        raise ValueError('Quantized: output_bits must be 2..8 (leave output_quant empty for float outputs)')
    if output_quant not in (None, False, 'auto') and not isinstance(output_quant, (list, tuple)):
        raise ValueError(f'Quantized: output_quant must be "auto", a list of patterns or null, got {output_quant!r}')
    offsets = _check_offsets(offsets)
    if layers not in ('default', 'all') and not isinstance(layers, (list, tuple)):
        raise ValueError(f'Quantized: layers must be "default", "all" or a list of patterns, got {layers!r}')

    net = build_inner_arch(arch)
    names = resolve_layer_names(net, arch['type'], layers, exclude)
    if not names:
        raise ValueError(f'Quantized: the layer selection for {arch["type"]} is empty (layers={layers!r}, '
                         f'exclude={exclude!r})')
    swap_layers(net, names, w_bits, a_bits, act_options, weight_options)
    out_names = _output_layers(net, arch, names, output_quant) if output_quant else []
    modules = dict(net.named_modules())
    for name in out_names:
        modules[name].attach_output_quantizer(output_bits, learnable=bool(act_learnable))
    net.__class__ = _quantized_class(type(net))
    net.quant_config = dict(arch=dict(arch), w_bits=w_bits, a_bits=a_bits, layers=names,
                            fp=w_bits == FP_BITS and a_bits == FP_BITS, act_options=act_options,
                            weight_options=weight_options, offsets=offsets, output_layers=out_names,
                            output_bits=output_bits)
    return net


def _output_layers(net, arch, names, output_quant):
    if output_quant == 'auto':
        return float_output_layers(net, example_input(net, arch))
    quantized = [n for n, _ in quantized_layers(net)]
    try:
        return names_matching(quantized, list(output_quant), 'Quantized: output_quant')
    except ValueError as e:
        raise ValueError(f'{e} (output_quant selects among the quantized layers; a layer that is not quantized '
                         'has no integer form)') from None


OFFSET_KEYS = ('select', 'fraction', 'threshold', 'kind')


def _check_offsets(offsets):
    """Validate the ``offsets`` option; returns a dict of selection options or None."""
    if offsets in (None, False):
        return None
    if offsets is True:
        offsets = {}
    if not isinstance(offsets, dict):
        raise ValueError(f'Quantized: offsets must be a mapping ({{select: topk, fraction: 0.25}}) or null, '
                         f'got {offsets!r}')
    unknown = sorted(set(offsets) - set(OFFSET_KEYS))
    if unknown:
        raise ValueError(f'Quantized: unknown offsets option(s) {unknown}. Accepted: {", ".join(OFFSET_KEYS)}')
    from odm_basicsr.quant.offsets import select_offset_layers
    select_offset_layers({'probe': {'shift': 1.0, 'scale': 0.5}}, **offsets)  # raises on bad values
    return dict(offsets)
