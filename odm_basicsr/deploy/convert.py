"""From a trained fake-quantization network to its deploy form (integer codes and scales, everything folded).

:func:`to_deploy` takes a calibrated ``Quantized`` network and returns a copy in which every quantized layer is an
:class:`~odm_basicsr.deploy.integer_layers.IntegerConv2d`:

* **activation grids** become zero-aligned (``step * (low .. low + 2**b - 1)``, integer zero point). A network trained
  with ``act_grid: aligned`` keeps its grid exactly; one trained on the free grid moves each range by less than half
  a step (the "nudge"; its cost is measured by the export report);
* **weights** become int8 codes times a per-output-channel float32 scale (``WeightQuantizer.integer_codes``), the bias
  int32 codes on the scale ``step_in * weight_scale``;
* **distribution offsets**: a scale folds into the weight (exact), a shift into the bias (exact away from the
  zero-padded border, see ``quant.offsets``); what remains is the float ``x - delta`` or ``x / rho`` before the
  input quantizer;
* **residual scalings** of BasicSR's ``ResidualBlockNoBN`` (``identity + res_scale * conv2(...)``) fold into
  ``conv2``'s scales (and its output grid), and the block's ``res_scale`` becomes 1;
* **output quantizers**: a trained ``out_quant`` keeps its grid; with ``output_quant='auto'`` a layer whose output
  would reach a float operation gets an 8-bit one calibrated on ``batches`` (``quant.float_outputs``);
* **requantization into the next layer**: a layer whose output feeds only the input quantizer of one integer layer
  (through a ReLU at most) writes its output on that layer's input grid, from the exact integer accumulator, as
  onnxruntime's fused ``QLinearConv`` does; the consumer's quantizer then leaves it unchanged.

Plain PyTorch: no BasicSR import.
"""
import copy
import sys

import torch
from torch import nn

from odm_basicsr.quant import QConv2d, QLinear, quantized_layers
from odm_basicsr.quant.float_outputs import example_input, float_output_layers, requantizing_consumers

from .integer_layers import IntegerConv2d, IntegerLinear, integer_layers

#: Blocks whose residual scaling multiplies one convolution's output: class name -> that convolution's name.
RESIDUAL_SCALED = {'ResidualBlockNoBN': 'conv2'}
#: Bits of the output quantizers that ``output_quant='auto'`` adds.
OUTPUT_BITS = 8
OUTPUT_CHOICES = ('trained', 'auto', 'none')
INT32_LIMIT = 2**31 - 1


class DeployError(ValueError):
    """The network cannot be put in deploy form (FP checkpoint, uncalibrated quantizer, unsupported layer...)."""


def fp_arch_class(net):
    """The importable FP class of ``net`` (``EDSR`` for the ``QuantizedEDSR`` that ``Quantized`` builds)."""
    for cls in type(net).__mro__:
        module = sys.modules.get(cls.__module__)
        if issubclass(cls, nn.Module) and getattr(module, cls.__name__, None) is cls:
            return cls
    raise DeployError(f'no importable class for {type(net).__name__}')


def _check_quantized(net):
    layers = quantized_layers(net)
    if not layers:
        raise DeployError('the network has no quantized layers: is this an FP checkpoint or network? Deployment '
                          'needs a network built with type: Quantized and trained or calibrated')
    for name, layer in layers:
        if layer.act_quant is None or layer.weight_quant is None:
            what = 'activations' if layer.act_quant is None else 'weights'
            raise DeployError(f'layer {name!r} has full-precision {what} (w_bits={layer.w_bits}, '
                              f'a_bits={layer.a_bits}): an integer layer needs both quantized')
        quantizers = [(layer.act_quant, 'input')] + ([(layer.out_quant, 'output')] if layer.out_quant else [])
        for q, what in quantizers:
            if not bool(q.initialized):
                raise DeployError(f'the {what} quantizer of layer {name!r} is not calibrated: export a checkpoint '
                                  f'saved after calibration or training (not a freshly built network)')
    return layers


@torch.no_grad()
def _calibrate_output_quantizers(net, names, batches):
    """Attach and calibrate 8-bit output quantizers on ``names`` of the (quantized, as trained) ``net``."""
    modules = dict(net.named_modules())
    added = [modules[n].attach_output_quantizer(OUTPUT_BITS, learnable=False) for n in names]
    for q in added:
        q.start_calibration()
    try:
        for x in batches:
            net(x)
    finally:
        for q in added:
            q.finish_calibration()
    missing = [n for n, q in zip(names, added) if not bool(q.initialized)]
    if missing:
        raise DeployError(f'output quantizers of {missing} saw no data (empty calibration batches?)')


def _fold_residual_scales(net):
    """Fold each ``ResidualBlockNoBN.res_scale`` into its ``conv2``; returns ``{block name: factor}``."""
    folded = {}
    for name, block in net.named_modules():
        conv_name = RESIDUAL_SCALED.get(type(block).__name__)
        scale = getattr(block, 'res_scale', None)
        if conv_name is None or scale is None or float(scale) == 1.0:
            continue
        conv = getattr(block, conv_name)
        if isinstance(conv, (IntegerConv2d, IntegerLinear)):
            conv.weight_scale.mul_(scale)
            if conv.out_step is not None:
                conv.out_step.mul_(scale)
        elif isinstance(conv, nn.Conv2d):
            conv.weight.mul_(scale)
            if conv.bias is not None:
                conv.bias.mul_(scale)
        else:
            continue
        block.res_scale = 1.0
        folded[name] = float(scale)
    return folded


def _requantize_into_consumers(net, consumers):
    """Give each integer layer that feeds one integer layer's input quantizer (and has no output quantizer) that
    layer's input grid as its output grid (``out_kind='next'``)."""
    modules = dict(net.named_modules())
    for name, target in consumers.items():
        producer = modules[name]
        if target is None or producer.out_bits is not None:
            continue
        consumer = modules[target[0]]
        producer.out_bits, producer.out_low, producer.out_kind = consumer.in_bits, consumer.in_low, 'next'
        producer.register_buffer('out_step', consumer.in_step.detach().clone())


def _integer_layer(name, layer, container):
    """Build the integer twin of a calibrated ``QConv2d`` / ``QLinear``."""
    aq, wq, offset = layer.act_quant, layer.weight_quant, layer.offset
    step, low = aq.integer_grid()
    n = 2**aq.bits - 1
    lo_limit, hi_limit = (-255, 255 - n) if container == 'uint8' else (-128, 127 - n)
    if not lo_limit <= low <= hi_limit:
        raise DeployError(f'layer {name!r}: input grid codes {low}..{low + n} (step {float(step):.4g}) do not fit '
                          f'an {container} container with an integer zero point (the range lies too far from 0)')
    if wq.grid == 'midrise' and wq.bits > 7:
        raise DeployError(f'layer {name!r}: {wq.bits}-bit midrise weight codes reach +-{2**wq.bits - 1}, beyond '
                          'int8; use weight_grid: midtread for 8-bit weights')
    weight = layer.weight if offset is None else offset.scale_weight(layer.weight)
    codes, unit = wq.integer_codes(weight.float())
    bias = None if layer.bias is None else layer.bias.detach().double().clone()
    pre, pre_param = None, None
    if offset is not None:
        pre = offset.kind
        if offset.kind == 'shift':
            pre_param = offset.delta.detach().float()
            if not offset.is_folded:  # the output side "+ delta" goes into the bias
                qw = codes.double() * unit.double().view(-1, *([1] * (codes.dim() - 1)))
                qw = qw.sum(dim=tuple(range(2, qw.dim()))) if qw.dim() > 2 else qw
                shift = qw @ offset.delta.detach().double()
                bias = shift if bias is None else bias + shift
        else:
            pre_param = offset.effective_rho().detach().float()
    kwargs = dict(weight_bits=wq.bits, weight_grid=wq.grid, in_bits=aq.bits, in_low=low, bias=bias is not None,
                  pre=pre)
    out = layer.out_quant
    if out is not None:
        out_step, out_low = out.integer_grid()
        kwargs.update(out_bits=out.bits, out_low=out_low, out_kind='own')
    if isinstance(layer, QConv2d):
        deployed = IntegerConv2d(tuple(codes.shape), stride=layer.stride, padding=layer.padding,
                                 dilation=layer.dilation, groups=layer.groups, padding_mode=layer.padding_mode,
                                 **kwargs)
    elif isinstance(layer, QLinear):
        deployed = IntegerLinear(tuple(codes.shape), **kwargs)
    else:
        raise DeployError(f'layer {name!r}: {type(layer).__name__} has no integer form')
    deployed.weight_codes.copy_(codes.to(torch.int8))
    deployed.weight_scale.copy_(unit)
    deployed.in_step.copy_(step)
    if out is not None:
        deployed.out_step.copy_(out_step)
    if pre_param is not None:
        deployed.pre_param.copy_(pre_param)
    if bias is not None:  # float32 division: the codes QConv2d.quantized_bias trains with
        bias_codes = torch.round(bias.float() / deployed.bias_scale())
        if bias_codes.abs().max() > INT32_LIMIT:
            raise DeployError(f'layer {name!r}: the bias does not fit int32 codes on the scale step_in * '
                              'weight_scale (the input step or the weight range is tiny)')
        deployed.bias_codes.copy_(bias_codes.to(torch.int32))
    return deployed


@torch.no_grad()
def to_deploy(net, output_quant='trained', batches=None, container='uint8', example=None):
    """The deploy form of a calibrated ``Quantized`` network (see the module docstring).

    Args:
        net (nn.Module): A calibrated or trained network with quantized layers (any device; left unchanged).
        output_quant (str): ``'trained'``: output quantizers exactly where the network has them; ``'auto'``: also
            an 8-bit one, calibrated on ``batches``, on every quantized layer whose output would reach a float
            operation; ``'none'``: no output quantizers (trained ones are dropped). Default: 'trained'.
        batches (list[Tensor] | None): Network inputs for ``'auto'``.
        container (str): ``'uint8'`` (onnxruntime: zero point in 0..255) or ``'int8'`` (TensorRT: zero point 0).
            Only checks that the input grids fit. Default: 'uint8'.
        example (Tensor | None): An input for the analysis of which layer feeds which (``quant.float_outputs``);
            default ``batches[0]``, else a small random input.

    Returns:
        tuple[nn.Module, dict]: The deploy-form network (CPU, float32, eval mode) and a summary: ``integer_layers``,
        ``added_output_quantizers``, ``residual_scales_folded``, ``nudged`` (layer -> the input range moved by the
        zero alignment, in steps).

    Raises:
        DeployError: an FP network, an uncalibrated quantizer, a layer type or grid the integer form cannot express.
    """
    if output_quant not in OUTPUT_CHOICES:
        raise DeployError(f'output_quant must be one of {list(OUTPUT_CHOICES)}, got {output_quant!r}')
    net = copy.deepcopy(net).float().cpu().eval()
    arch_class = fp_arch_class(net)
    layers = _check_quantized(net)
    added = []
    if output_quant == 'none':
        for _, layer in layers:
            layer.out_quant = None
    if example is None:
        example = batches[0] if batches else example_input(net, dict(getattr(net, 'quant_config', None) or {})
                                                           .get('arch'))
    example = example.float().cpu()
    if output_quant == 'auto':
        if not batches:
            raise DeployError('output_quant="auto" needs calibration batches for the output quantizers it adds')
        batches = [b.float().cpu() for b in batches]
        added = [n for n in float_output_layers(net, example) if dict(layers)[n].out_quant is None]
        _calibrate_output_quantizers(net, added, batches)
    consumers = requantizing_consumers(net, example)
    nudged = {}
    modules = dict(net.named_modules())
    for name, layer in layers:
        if layer.act_quant.grid == 'free':  # trained on the free grid: the aligned grid moves the range
            lower, _ = layer.act_quant.bounds()
            step, low = layer.act_quant.integer_grid()
            nudged[name] = round(float((low * step - lower) / step), 4)
        parent_name, _, child = name.rpartition('.')
        setattr(modules[parent_name] if parent_name else net, child, _integer_layer(name, layer, container))
    _requantize_into_consumers(net, consumers)
    folded = _fold_residual_scales(net)
    arch = dict(getattr(net, 'quant_config', None) or {}).get('arch')
    net.__class__ = arch_class  # the FP class: QuantizedNetwork only added helpers for quantized layers
    net.__dict__.pop('quant_config', None)
    net.deploy_info = dict(arch_class=f'{arch_class.__module__}:{arch_class.__name__}',
                           arch=arch,
                           residual_scales_folded=folded)
    summary = dict(integer_layers=[n for n, _ in integer_layers(net)], added_output_quantizers=added,
                   residual_scales_folded=folded, nudged=nudged)
    return net, summary
