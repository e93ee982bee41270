"""Folding offsets into the layer parameters for deployment, and what offsets cost.

Folding (:func:`fold_offsets`) bakes the *output* side into the layer:

- scale: ``weight[:, c] *= rho_c``: exact (the same product the unfolded layer computes, so the folded layer gives
  bit-identical outputs);
- shift: ``bias[o] += sum_{c, kh, kw} Q_w(W)[o, c, kh, kw] * delta_c`` (a zero bias is created when the layer has
  none). Exact for linear layers and for convolutions with ``padding_mode`` reflect / replicate / circular or no
  padding. With zero padding it is exact away from the border only: the unfolded layer pads ``q(x - delta) + delta``
  with zeros, the folded one pads ``q(x - delta)`` with zeros and adds the full ``Q_w(W) . delta`` through the bias.

What remains is the *input* side: a per-channel affine map before the quantizer (``x - delta`` or ``x / rho``), i.e.
``C`` parameters and 1 FP operation per input element, equivalently a per-channel static zero point (shift) or step
(scale). The folded state is stored in the buffer ``<layer>.offset.folded``, so a reloaded folded checkpoint
behaves the same. Folding is a deployment step: the folded output side is not updated if the layer trains further.

Cost before folding (training form), per offset layer with ``C`` input channels: ``C`` parameters; a shift costs
2 FP operations per input element (subtract before ``q``, add after it); a scale 1 per input element (divide) plus
one multiply per weight element per forward pass (``W * rho``).
"""
import torch
from torch import nn

from ..layer_selection import quantized_layers
from .attach import _check_offset_layer, offset_layers
from .distribution_offset import _channel_view


@torch.no_grad()
def fold_offset(layer, name='layer'):
    """Fold the output side of ``layer``'s offset into its weight / bias (in place; see the module docstring).

    The weight and bias tensors are modified in place, including when they are shared with another module (a
    quantized layer built by ``from_float`` shares them with the FP layer it replaced). A shift on a layer
    without bias creates one. Folding an already folded offset does nothing.

    Returns:
        bool: True when something was folded.
    """
    offset = layer.offset
    if offset is None or offset.is_folded:
        return False
    _check_offset_layer(layer, name)
    if offset.kind == 'scale':
        layer.weight.mul_(_channel_view(offset.effective_rho(), layer.weight.dim(), 1).to(layer.weight.dtype))
    else:
        qw = layer.quantized_weight().double()
        if qw.dim() > 2:
            qw = qw.sum(dim=tuple(range(2, qw.dim())))
        add = qw @ offset.delta.double()  # (out,)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(add, dtype=layer.weight.dtype))
        layer.bias.add_(add.to(layer.bias.dtype))
    offset.set_folded(True)
    return True


def fold_offsets(model):
    """Fold every offset of ``model`` (:func:`fold_offset`). Returns the names of the layers folded now."""
    return [name for name, layer in quantized_layers(model) if fold_offset(layer, name)]


def offset_report(model):
    """Cost of the offsets of ``model``, one dict per offset layer.

    Keys: ``layer`` (name), ``kind``, ``channels`` (C), ``params`` (offset parameters, C; a bias created by
    folding a shift is an ordinary layer parameter and not counted here), ``fp_ops_per_input_element`` (extra FP
    operations per element of the layer input: unfolded shift 2, unfolded scale 1, folded 1),
    ``fp_ops_per_call`` (extra FP operations per forward pass independent of the input size: the ``W * rho``
    product of an unfolded scale, else 0) and ``folded`` (bool).
    """
    report = []
    for name, layer in offset_layers(model):
        off = layer.offset
        folded = off.is_folded
        per_elem = 1 if folded or off.kind == 'scale' else 2
        per_call = layer.weight.numel() if off.kind == 'scale' and not folded else 0
        report.append(dict(layer=name, kind=off.kind, channels=off.num_channels, params=off.param.numel(),
                           fp_ops_per_input_element=per_elem, fp_ops_per_call=per_call, folded=folded))
    return report
