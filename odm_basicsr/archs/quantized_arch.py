"""``Quantized``: any BasicSR arch with selected layers swapped for quantized ones."""
import difflib
import inspect
import textwrap

from basicsr.utils.registry import ARCH_REGISTRY

from odm_basicsr.option_schema import QUANTIZED
from odm_basicsr.quant import FP_BITS, quantizable_layers, quantized_layers, select_layers, swap_layers
from odm_basicsr.quant.float_outputs import example_input, float_output_layers
from odm_basicsr.quant.layer_selection import names_matching
from odm_basicsr.utils.schema import REQUIRED

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
def Quantized(arch=REQUIRED, **options):
    """Build a registered BasicSR arch and quantize the selected convolution/linear layers.

    The returned network is the inner arch itself (class ``Quantized<Arch>``), so its state-dict keys are the
    FP arch's keys plus the quantizer entries: an FP checkpoint of the inner arch loads without renaming. The
    options it was built with (validated, defaults filled in) are its ``quant_config``.

    The arguments, their defaults and their checks are declared once in
    :data:`odm_basicsr.option_schema.QUANTIZED` (listed below); a wrong one raises ``OptionError`` (a ValueError)
    naming it.
    """
    if arch is not REQUIRED:
        options['arch'] = arch
    opt = QUANTIZED.validate(options)
    arch, layers, exclude = opt['arch'], opt['layers'], opt['exclude']
    w_bits, a_bits = opt['w_bits'], opt['a_bits']
    act_options = dict(init=opt['act_init'], init_percentile=opt['act_percentile'], learnable=opt['act_learnable'],
                       grid=opt['act_grid'])
    weight_options = dict(granularity=opt['weight_granularity'], range_method=opt['weight_range'],
                          percentile=opt['weight_percentile'], clip_correction=opt['clip_correction'],
                          grid=opt['weight_grid'])

    net = build_inner_arch(arch)
    names = resolve_layer_names(net, arch['type'], layers, exclude)
    if not names:
        raise ValueError(f'Quantized: the layer selection for {arch["type"]} is empty (layers={layers!r}, '
                         f'exclude={exclude!r})')
    swap_layers(net, names, w_bits, a_bits, act_options, weight_options)
    out_names = _output_layers(net, arch, names, opt['output_quant']) if opt['output_quant'] else []
    modules = dict(net.named_modules())
    for name in out_names:
        modules[name].attach_output_quantizer(opt['output_bits'], learnable=opt['act_learnable'])
    net.__class__ = _quantized_class(type(net))
    net.quant_config = dict(arch=dict(arch), w_bits=w_bits, a_bits=a_bits, layers=names,
                            fp=w_bits == FP_BITS and a_bits == FP_BITS, act_options=act_options,
                            weight_options=weight_options, offsets=opt['offsets'], output_layers=out_names,
                            output_quant=opt['output_quant'], output_bits=opt['output_bits'])
    return net


Quantized.__doc__ += '\n' + textwrap.indent(QUANTIZED.args_doc(), '    ') + '\n'


def _output_layers(net, arch, names, output_quant):
    if output_quant == 'auto':
        return float_output_layers(net, example_input(net, arch))
    quantized = [n for n, _ in quantized_layers(net)]
    try:
        return names_matching(quantized, list(output_quant), 'Quantized: output_quant')
    except ValueError as e:
        raise ValueError(f'{e} (output_quant selects among the quantized layers; a layer that is not quantized '
                         'has no integer form)') from None

