"""Putting offsets on layers: attach from statistics, mirror onto a copy (EMA), or recreate from a checkpoint.

State-dict keys: ``<layer>.offset.delta`` or ``<layer>.offset.rho``, and ``<layer>.offset.folded``. Use
:func:`ensure_offsets_from_state` before loading a checkpoint into a freshly built network, and
:func:`ensure_offsets_like` for a copy such as BasicSR's EMA network.
"""
import re

import torch
from torch import nn

from ..layer_selection import quantized_layers
from ..layers import QUANTIZED_TYPES
from .channel_stats import _in_channels
from .distribution_offset import MIN_RHO, DistributionOffset
from .selection import mismatch_scores, select_offset_layers

_STATE_KEY = re.compile(r'^(?:(.*)\.)?offset\.(delta|rho)$')


def _check_offset_layer(layer, name):
    if not isinstance(layer, QUANTIZED_TYPES):
        raise ValueError(f'{name!r} is not a quantized layer (QConv2d / QLinear), got {type(layer).__name__}')
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        raise ValueError(f'distribution offsets need groups=1, but conv {name!r} has groups={layer.groups}: '
                         f'a per-input-channel offset of a grouped conv is not supported')


def _new_offset(layer, name, kind, num_channels=None):
    _check_offset_layer(layer, name)
    c = _in_channels(layer)
    if num_channels is not None and num_channels != c:
        raise ValueError(f'offset of {name!r} has {num_channels} channels, the layer {c} input channels')
    offset = DistributionOffset(c, kind, device=layer.weight.device, dtype=layer.weight.dtype)
    layer.offset = offset
    return offset


def _layer_map(model):
    return dict(quantized_layers(model))


def _get_layer(layers, name, model, what):
    if name not in layers:
        raise ValueError(f'{what}: {name!r} is not a quantized layer of {type(model).__name__}; '
                         f'quantized layers: {list(layers)}')
    return layers[name]


def attach_offsets(model, selection, stats, min_rho=MIN_RHO, reset_act_range=True):
    """Create and initialise offsets on the selected layers.

    Args:
        model (nn.Module): Network with quantized layers.
        selection (dict[str, str]): Layer name -> ``'shift'`` | ``'scale'`` (:func:`select_offset_layers`).
        stats (dict[str, ChannelStats]): Statistics of the layer inputs (:func:`channel_statistics`).
        min_rho (float): Lower clamp of the initial ``rho``. Default: 1e-2.
        reset_act_range (bool): Mark the activation quantizer of each offset layer uninitialised, so that its
            range is set again from the normalised input (by the next :func:`calibration`, or else the first
            batch). Default: True.

    Returns:
        dict[str, DistributionOffset]: The new offsets.

    Raises:
        ValueError: for an unknown layer, a layer that already has an offset, missing statistics, a grouped conv,
            or an invalid kind.
    """
    layers = _layer_map(model)
    created = {}
    for name, kind in selection.items():
        layer = _get_layer(layers, name, model, 'attach_offsets')
        if layer.offset is not None:
            raise ValueError(f'attach_offsets: layer {name!r} already has an offset ({layer.offset.kind})')
        if name not in stats:
            raise ValueError(f'attach_offsets: no statistics for layer {name!r}')
        s = stats[name]
        offset = _new_offset(layer, name, kind)
        offset.init_from_stats(s.mean(), s.std(), min_rho)
        if reset_act_range and layer.act_quant is not None:
            layer.act_quant.set_initialized(False)
        created[name] = offset
    return created


def add_offsets(model, stats, select='topk', fraction=0.25, threshold=None, kind='auto', min_rho=MIN_RHO,
                reset_act_range=True):
    """Score, select and attach in one call. Returns ``(selection, scores)``.

    Args are those of :func:`select_offset_layers` and :func:`attach_offsets`.
    """
    scores = mismatch_scores(stats)
    selection = select_offset_layers(scores, select, fraction, threshold, kind)
    attach_offsets(model, selection, stats, min_rho, reset_act_range)
    return selection, scores


def ensure_offsets_from_state(model, state_dict):
    """Create identity offsets for the ``<layer>.offset.delta|rho`` keys of ``state_dict`` whose layer has none.

    Call it before ``model.load_state_dict(state_dict)`` so that the keys match. For a folded shift
    (``<layer>.offset.folded`` true) whose state carries a ``<layer>.bias`` the layer lacks, a zero bias is created
    too (folding created it).

    Args:
        model (nn.Module): Network with quantized layers.
        state_dict (Mapping[str, Tensor]): Keys relative to ``model``.

    Returns:
        list[str]: Names of the layers that got a new offset.

    Raises:
        ValueError: if a key names a module that is not a quantized layer, or an offset of the other kind exists.
    """
    layers = _layer_map(model)
    created = []
    for key, value in state_dict.items():
        m = _STATE_KEY.match(key)
        if m is None:
            continue
        name, param = m.group(1) or '', m.group(2)
        kind = 'shift' if param == 'delta' else 'scale'
        layer = _get_layer(layers, name, model, f'ensure_offsets_from_state (key {key!r})')
        if layer.offset is None:
            _new_offset(layer, name, kind, num_channels=value.numel())
            created.append(name)
        elif layer.offset.kind != kind:
            raise ValueError(f'ensure_offsets_from_state: layer {name!r} has a {layer.offset.kind} offset, the '
                             f'state dict a {kind} one (key {key!r})')
        prefix = f'{name}.' if name else ''
        folded = state_dict.get(prefix + 'offset.folded')
        if (layer.bias is None and prefix + 'bias' in state_dict and folded is not None and bool(folded)):
            bias = state_dict[prefix + 'bias']
            layer.bias = nn.Parameter(torch.zeros(bias.shape, device=layer.weight.device, dtype=layer.weight.dtype))
    return created


def ensure_offsets_like(dst_model, src_model, copy_values=True):
    """Give ``dst_model`` the offsets of ``src_model`` (same layer names, kinds and channels).

    Used for copies built separately from the same options, such as BasicSR's EMA network, whose parameter
    averaging only sees parameters that exist in both.

    Args:
        dst_model (nn.Module): Network to complete.
        src_model (nn.Module): Network whose offsets are mirrored.
        copy_values (bool): Also copy ``delta`` / ``rho`` into offsets created now. Default: True.

    Returns:
        list[str]: Names of the layers that got a new offset.

    Raises:
        ValueError: if a layer is missing in ``dst_model``, has an offset of the other kind, or the source offset
            is folded (folding changed the source weights; load its state dict with
            :func:`ensure_offsets_from_state` instead).
    """
    dst_layers = _layer_map(dst_model)
    created = []
    for name, src_layer in quantized_layers(src_model):
        src = src_layer.offset
        if src is None:
            continue
        layer = _get_layer(dst_layers, name, dst_model, 'ensure_offsets_like')
        if src.is_folded:
            raise ValueError(f'ensure_offsets_like: the offset of {name!r} is folded; copy the folded network '
                             f'with ensure_offsets_from_state + load_state_dict instead')
        if layer.offset is None:
            offset = _new_offset(layer, name, src.kind, num_channels=src.num_channels)
            if copy_values:
                with torch.no_grad():
                    offset.param.copy_(src.param)
            created.append(name)
        elif layer.offset.kind != src.kind:
            raise ValueError(f'ensure_offsets_like: layer {name!r} has a {layer.offset.kind} offset, the source '
                             f'a {src.kind} one')
    return created


def offset_layers(model):
    """``(name, layer)`` pairs of the quantized layers that carry an offset."""
    return [(name, m) for name, m in quantized_layers(model) if m.offset is not None]
