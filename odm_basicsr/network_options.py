"""An option file read into a network and a scale: how every tool, the demo and the scripts do it.

The file is a BasicSR option file (``network_g``, ``scale``), a YAML holding only the ``network_g`` mapping, or that
mapping under a ``network_g`` key alone. The scale is, in this order: the caller's (``--scale``), the file's
``scale``, the arch's ``upscale`` / ``scale`` option (the inner arch of ``Quantized``), or the default of that
argument in the arch's signature (the network BasicSR builds from the file has that scale).
"""
import inspect
import os
from copy import deepcopy

import odm_basicsr.archs  # noqa: F401  (BasicSR fixes + registration first)
from odm_basicsr.tool_cli import ToolError


class OptionFileError(ToolError, ValueError):
    """An option file that does not describe a network (or its scale); the tools exit with status 2."""


def read_option_file(path):
    """``(whole option dict, network_g)`` of ``path`` (a file, or the name of a packaged option file:
    ``odm-train --list-options``); the whole dict is ``{}`` for a network_g-only file."""
    import yaml

    from odm_basicsr import option_files

    path = option_files.resolve(path) or path
    if not os.path.isfile(path):
        raise OptionFileError(f'option file not found: {path}')
    try:
        with open(path, encoding='utf-8') as f:
            data = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise OptionFileError(f'cannot parse {path}: {e}') from None
    if not isinstance(data, dict):
        raise OptionFileError(f'{path} is not a YAML mapping with a network_g entry')
    if 'network_g' in data:
        opt, net_opt = data, data['network_g']
    elif 'type' in data:  # the network mapping itself
        opt, net_opt = {}, data
    else:
        raise OptionFileError(f'{path} has no network_g entry (keys: {", ".join(map(str, data)) or "none"})')
    if not isinstance(net_opt, dict) or 'type' not in net_opt:
        raise OptionFileError(f'network_g of {path} must be a mapping with a "type" key, got {net_opt!r}')
    return opt, dict(net_opt)


def inner_arch_options(net_opt):
    """The FP arch's options: ``arch`` of a ``Quantized`` network_g, else network_g itself."""
    arch = net_opt.get('arch')
    return dict(arch) if net_opt.get('type') == 'Quantized' and isinstance(arch, dict) else net_opt


def arch_option(net_opt, keys):
    """The first of ``keys`` given to the (inner) arch, else the first with a default in its signature; or None."""
    from basicsr.utils.registry import ARCH_REGISTRY

    arch = inner_arch_options(net_opt)
    for key in keys:
        if arch.get(key) is not None:
            return arch[key]
    arch_type = arch.get('type')
    if arch_type in ARCH_REGISTRY:
        try:
            params = inspect.signature(ARCH_REGISTRY.get(arch_type)).parameters
        except (TypeError, ValueError):
            return None
        for key in keys:
            if key in params and params[key].default not in (inspect.Parameter.empty, None):
                return params[key].default
    return None


def check_scale(scale):
    """``scale`` as an int; OptionFileError unless it is a positive integer."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise OptionFileError(f'scale must be a positive integer, got {scale!r}')
    return scale


def resolve_scale(opt, net_opt):
    """The option file's ``scale``, else the arch's ``upscale`` / ``scale`` option, else that argument's default."""
    scale = opt.get('scale')
    if scale is None:
        scale = arch_option(net_opt, ('upscale', 'scale'))
    if scale is None:
        raise OptionFileError('cannot tell the scale: the option file has no "scale" and network_g no upscale/scale '
                              'option; pass --scale')
    return check_scale(scale)


def read_network_options(path, scale=None):
    """``(network_g, scale)`` of an option file; ``scale`` (e.g. ``--scale``) overrides the file's."""
    opt, net_opt = read_option_file(path)
    check_arch_types(net_opt)  # before the scale, which may come from the arch's signature
    return net_opt, check_scale(scale) if scale is not None else resolve_scale(opt, net_opt)


def in_channels(net_opt):
    """Input channels of the (inner) arch (``num_in_ch`` / ``in_chans``), or None."""
    return arch_option(net_opt, ('num_in_ch', 'in_chans'))


def window_size(net_opt):
    """The window size of a windowed arch (SwinIR), from network_g or its ``arch``; None otherwise."""
    for d in (net_opt, net_opt.get('arch')):
        if isinstance(d, dict) and d.get('window_size'):
            return int(d['window_size'])
    return None


def check_arch_types(net_opt):
    """OptionFileError for an unregistered ``network_g.type`` (or ``network_g.arch.type`` of ``Quantized``)."""
    from basicsr.utils.registry import ARCH_REGISTRY

    types = [('network_g.type', net_opt.get('type'))]
    if net_opt.get('type') == 'Quantized' and isinstance(net_opt.get('arch'), dict):
        types.append(('network_g.arch.type', net_opt['arch'].get('type')))
    for where, arch_type in types:
        if arch_type not in ARCH_REGISTRY:
            registered = ', '.join(sorted(ARCH_REGISTRY._obj_map))
            raise OptionFileError(f'unknown {where} {arch_type!r}; registered: {registered}')


def build_network(net_opt):
    """Build ``network_g`` through BasicSR's arch registry (as ``basicsr.archs.build_network``, without its log)."""
    from basicsr.utils.registry import ARCH_REGISTRY

    check_arch_types(net_opt)
    kwargs = deepcopy(net_opt)
    arch_type = kwargs.pop('type')
    try:
        return ARCH_REGISTRY.get(arch_type)(**kwargs)
    except Exception as e:
        raise OptionFileError(f'cannot build network_g ({arch_type}): {type(e).__name__}: {e}') from None
