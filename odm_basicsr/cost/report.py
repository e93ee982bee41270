"""Cost report of an SR network: MACs, parameters, BitOPs and storage (METHOD.md section 7).

:func:`cost_report` (``odm-cost``) reports, for the LR input whose SR output has the given size (width x height,
default 1280x720, LR = output / scale):

* **MACs** (multiply-accumulates) of every convolution and linear layer: ``out_elements * in_ch / groups * kh *
  kw`` for a convolution (``in_elements * out_ch / groups * kh * kw`` for a transposed one), ``out_elements *
  in_features`` for a linear layer. Matrix products outside them (SwinIR's ``q @ k^T`` and ``attn @ v``, any
  ``matmul`` / ``bmm`` / ``scaled_dot_product_attention``) are counted too, always as FP MACs. Not counted:
  activations, additions and other element-wise operations (fake quantization included), pixel shuffle,
  interpolation, pooling, normalisations, softmax.
* **BitOPs** as the SR-quantization papers count them (CADyQ / ODM): ``OPs(FP layers) + (b_w / 32) * (b_a / 32) *
  OPs(quantized layers)``, i.e. one per FP MAC and ``b_w * b_a / 1024`` per MAC of a quantized layer.
  ``bitops_fp`` is the same network with every layer FP (= the MACs).
* **Parameters** of the FP network (quantizer and offset entries counted separately).
* **Storage**: ``size_bytes_fp`` = 4 bytes per element of every parameter and buffer in the state dict of the FP
  network (FP32; quantizer and offset entries excluded). ``size_bytes`` = quantized weights packed at ``b_w`` bits
  (``ceil(n * b_w / 8)`` bytes per tensor), every other network parameter and buffer (biases included) at FP32,
  every quantizer and offset state entry at FP32, and the step sizes that a packed ``b_w``-bit weight needs to be
  dequantized (one FP32 per layer, or per output channel with per-channel ranges): the weight quantizer recomputes
  them from the FP weights, so they are not in the state dict, but a packed model must store them.
* **Offsets** (:func:`odm_basicsr.quant.offset_report`): parameters and extra FP operations at the output size.

The counts are exact: the network runs once at the LR size on PyTorch's ``meta`` device (shapes only, no
arithmetic, no memory for activations), on a copy stripped of its quantizers, with hooks that read the shapes of
every convolution, linear layer and matrix product. Should an arch not run on ``meta`` (data-dependent Python code
in its forward), a CPU forward pass at a reduced size is scaled by the area ratio instead (``method: scaled``; exact
only when every operation's work is proportional to the image area). A network with windows (an integer
``window_size`` attribute on some module, as in SwinIR) runs on the LR input padded up to multiples of the window,
as SwinIR's test code pads it (BasicSR's SwinIR cannot run on other sizes); the report says so.

MB in the report means 1e6 bytes.
"""
import math
import re
from collections import OrderedDict

import torch
from torch import nn

from odm_basicsr.archs.arch_util import pad_to_window
from odm_basicsr.quant import FP_BITS, offset_report, quantized_layers, quantizer_state_keys
from odm_basicsr.quant.quantizers import WeightQuantizer

from .sizes import DEFAULT_OUTPUT_SIZE, CostError, lr_size, parse_size
from .text import fmt_bytes
from .tracer import trace_ops

NOT_COUNTED = ('activations', 'additions and other element-wise operations (fake quantization included)',
               'pixel shuffle', 'interpolation', 'pooling', 'normalisations', 'softmax')


def _layer_bits(net):
    """``{name: (w_bits, a_bits)}`` of the quantized layers (at least one of the two below 32)."""
    return {name: (m.w_bits, m.a_bits) for name, m in quantized_layers(net)
            if m.w_bits != FP_BITS or m.a_bits != FP_BITS}


def _weight_scale_count(layer):
    """FP32 step sizes a packed weight of ``layer`` needs: 1 per layer or 1 per output channel."""
    wq = layer.weight_quant
    if wq is None:
        return 0
    return layer.weight.shape[0] if isinstance(wq, WeightQuantizer) and wq.granularity == 'channel' else 1


def storage(net):
    """Storage of ``net`` in bytes: ``(size_bytes, size_bytes_fp, breakdown)`` (see the module docstring)."""
    quant_keys = set(quantizer_state_keys(net))
    layers = dict(quantized_layers(net))
    packed = {f'{name}.weight' if name else 'weight': m.w_bits for name, m in layers.items() if m.w_bits != FP_BITS}
    b = dict(quantized_weights=0, quantized_weight_elements=0, fp_params=0, fp_buffers=0, quantizer=0,
             quantizer_elements=0, offsets=0, offset_elements=0, weight_scales=0, weight_scale_elements=0)
    param_ids = {id(p) for p in net.parameters()}
    seen = set()
    quantizer_entries = []
    buffers = {}  # buffer elements by the last part of their name (running_mean, attn_mask, ...)
    for key, t in net.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        n = t.numel()
        if key in quant_keys:
            part = 'offset' if re.search(r'(^|\.)offset\.', key) else 'quantizer'
            b[part + ('s' if part == 'offset' else '')] += 4 * n
            b[part + '_elements'] += n
            quantizer_entries.append(dict(key=key, elements=n, bytes=4 * n))
        elif key in packed:
            b['quantized_weights'] += math.ceil(n * packed[key] / 8)
            b['quantized_weight_elements'] += n
        elif id(t) in param_ids:
            b['fp_params'] += 4 * n
        else:
            b['fp_buffers'] += 4 * n
            leaf = key.rpartition('.')[2]
            buffers[leaf] = buffers.get(leaf, 0) + n
    for m in layers.values():
        n = _weight_scale_count(m)
        b['weight_scales'] += 4 * n
        b['weight_scale_elements'] += n
    size_fp = 4 * b['quantized_weight_elements'] + b['fp_params'] + b['fp_buffers']
    size = b['quantized_weights'] + b['fp_params'] + b['fp_buffers'] + b['quantizer'] + b['offsets'] \
        + b['weight_scales']
    b['quantizer_entries'] = quantizer_entries
    b['buffer_elements'] = buffers
    return size, size_fp, b


def _count_params(net):
    """``(network params, quantizer params, offset params)``, shared tensors counted once."""
    quant = {}
    for _, m in quantized_layers(net):
        for sub in ('act_quant', 'weight_quant', 'offset'):
            part = getattr(m, sub, None)
            if part is not None:
                for p in part.parameters():
                    quant[id(p)] = 'offset' if sub == 'offset' else 'quantizer'
    counts = dict(network=0, quantizer=0, offset=0)
    for p in net.parameters():  # deduplicated
        counts[quant.get(id(p), 'network')] += p.numel()
    return counts['network'], counts['quantizer'], counts['offset']


def _bits_of(bits, index):
    """The bit width (index 0: weights, 1: activations) shared by all quantized layers; a sorted list if mixed."""
    values = sorted({b[index] for b in bits.values()})
    if not values:
        return FP_BITS
    return values[0] if len(values) == 1 else values


def _window_multiple(net):
    """Least common multiple of the integer ``window_size`` attributes of ``net``'s modules (1 if none)."""
    multiple = 1
    for m in net.modules():
        window = getattr(m, 'window_size', None)
        if isinstance(window, int) and not isinstance(window, bool) and window > 1:
            multiple = math.lcm(multiple, window)
    return multiple


def cost_report(net, output_size=DEFAULT_OUTPUT_SIZE, scale=None, in_channels=None, method='auto'):
    """MACs, parameters, BitOPs, storage and offsets of ``net`` for an SR output of ``output_size``.

    Args:
        net (nn.Module): The network, FP or quantized (``Quantized``). It is not modified.
        output_size (tuple[int, int] | str): SR output (width, height), or ``'1280x720'``. Default: 1280x720.
        scale (int): Upscaling factor; LR = output / scale. Default: ``net.upscale`` or ``net.scale`` if present.
        in_channels (int | None): Input image channels. Default: ``net.num_in_ch`` / ``net.in_chans`` if present,
            else 3.
        method (str): ``'auto'``, ``'meta'`` or ``'scaled'`` (see :func:`trace_ops`). Default: 'auto'.

    Returns:
        dict: JSON-serialisable report; counts are per image (batch 1). Main keys: ``macs``, ``macs_quantized``,
        ``macs_fp``, ``macs_matmul``, ``params``, ``bitops``, ``bitops_fp``, ``bitops_ratio``, ``size_bytes``,
        ``size_bytes_fp``, ``quantized_layers``, ``w_bits``, ``a_bits``, ``offsets``, ``layers`` (one entry per
        module and operation kind), ``storage`` (breakdown), ``not_counted``, ``notes``.
    """
    if isinstance(output_size, str):
        output_size = parse_size(output_size)
    output_size = tuple(int(v) for v in output_size)
    if scale is None:
        scale = getattr(net, 'upscale', None) or getattr(net, 'scale', None)
        if scale is None:
            raise CostError(f'cannot tell the scale of {type(net).__name__}: pass scale')
    lr_w, lr_h = lr_size(output_size, scale)
    if in_channels is None:
        in_channels = getattr(net, 'num_in_ch', None) or getattr(net, 'in_chans', None) or 3
    multiple = _window_multiple(net)
    # the padding that odm-eval and ODMModel.test give a windowed arch, applied to a shape-only input
    run_h, run_w = pad_to_window(torch.empty(1, in_channels, lr_h, lr_w, device='meta'), multiple).shape[-2:]
    pad_note = []
    if (run_w, run_h) != (lr_w, lr_h):
        # BasicSR's SwinIR needs sides that are multiples of its window; SwinIR's test code pads the LR image
        pad_note.append(f'LR input padded from {lr_w}x{lr_h} to {run_w}x{run_h} (multiples of window_size '
                        f'{multiple}, as SwinIR\'s test code pads it); the counts are for the padded input')

    ops, used, notes = trace_ops(net, in_channels, (run_h, run_w), scale, method, multiple)
    notes = pad_note + notes
    modules = dict(net.named_modules())
    bits = _layer_bits(net)
    layers = []
    bitops_x1024 = 0
    macs_total = macs_quant = macs_matmul = 0
    for (name, kind), rec in ops.items():
        module = modules.get(name)
        own = module is not None and isinstance(module, (nn.Conv2d, nn.Linear)) and kind in ('conv', 'linear')
        w_bits, a_bits = bits.get(name, (FP_BITS, FP_BITS)) if own else (FP_BITS, FP_BITS)
        quantized = own and name in bits
        macs = rec['macs']
        macs_total += macs
        macs_quant += macs if quantized else 0
        macs_matmul += 0 if own or kind.startswith(('conv', 'linear')) else macs
        bitops_x1024 += macs * w_bits * a_bits
        params = sum(p.numel() for p in module.parameters(recurse=False)) if own else 0
        layers.append(dict(name=name, type=type(module).__name__ if module is not None else '', op=kind, macs=macs,
                           params=params, quantized=quantized, w_bits=w_bits, a_bits=a_bits,
                           bitops=macs * w_bits * a_bits / 1024, in_elements=rec['in_elements'],
                           calls=rec['calls']))
    if any(k == 'einsum_not_counted' for _, k in ops):
        notes.append('some einsum calls (ellipsis or not two operands) were not counted')

    in_elements = {name: rec['in_elements'] for (name, kind), rec in ops.items() if kind in ('conv', 'linear')}
    calls = {name: rec['calls'] for (name, kind), rec in ops.items() if kind in ('conv', 'linear')}
    offsets = []
    for r in offset_report(net):
        r = dict(r)
        r['fp_ops'] = r['fp_ops_per_input_element'] * in_elements.get(r['layer'], 0) \
            + r['fp_ops_per_call'] * calls.get(r['layer'], 0)
        offsets.append(r)
    config = getattr(net, 'quant_config', None) or {}
    if config.get('offsets') and not offsets:
        notes.append('offsets are configured but attached only at ODM calibration; this network has none '
                     '(pass a trained checkpoint to count them)')

    params, params_quantizer, params_offset = _count_params(net)
    size, size_fp, breakdown = storage(net)
    if breakdown['buffer_elements']:
        listed = ', '.join(f'{k} {v:,}' for k, v in breakdown['buffer_elements'].items())
        notes.append(f'both sizes include the FP32 buffers of the state dict ({fmt_bytes(breakdown["fp_buffers"])}: '
                     f'{listed} values), as stored in a checkpoint')
    quant_names = list(bits)
    bitops = bitops_x1024 / 1024
    report = OrderedDict(
        arch=type(net).__name__,
        output_size=list(output_size),
        input_size=[lr_w, lr_h],
        traced_input_size=[run_w, run_h],
        in_channels=in_channels,
        scale=scale,
        method=used,
        macs=macs_total,
        macs_quantized=macs_quant,
        macs_fp=macs_total - macs_quant,
        macs_matmul=macs_matmul,
        quantized_fraction=macs_quant / macs_total if macs_total else 0.0,
        bitops=bitops if bitops_x1024 % 1024 else bitops_x1024 // 1024,
        bitops_fp=macs_total,
        bitops_ratio=bitops / macs_total if macs_total else 1.0,
        params=params,
        params_quantizer=params_quantizer,
        params_offset=params_offset,
        size_bytes=size,
        size_bytes_fp=size_fp,
        size_ratio=size / size_fp if size_fp else 1.0,
        w_bits=config.get('w_bits', _bits_of(bits, 0)),
        a_bits=config.get('a_bits', _bits_of(bits, 1)),
        quantized_layers=quant_names,
        num_quantized_layers=len(quant_names),
        offsets=dict(layers=offsets, params=sum(r['params'] for r in offsets),
                     fp_ops=sum(r['fp_ops'] for r in offsets)),
        storage=breakdown,
        layers=layers,
        not_counted=list(NOT_COUNTED),
        notes=notes,
    )
    return report

