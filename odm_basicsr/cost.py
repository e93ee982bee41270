"""Cost report of an SR network: MACs, parameters, BitOPs and storage (METHOD.md section 7).

``odm-cost -opt X.yml [--output-size 1280x720] [--json]`` builds ``network_g`` of a BasicSR option file (or of a
YAML file holding only ``network_g``, or only the network mapping itself) and reports, for the LR input whose SR
output has the given size (width x height, default 1280x720, LR = output / scale):

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
import argparse
import copy
import inspect
import json
import math
import os
import re
import sys
from collections import OrderedDict

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.overrides import TorchFunctionMode

from odm_basicsr.quant import FP_BITS, offset_report, quantized_layers, quantizer_state_keys
from odm_basicsr.quant.quantizers import WeightQuantizer

DEFAULT_OUTPUT_SIZE = (1280, 720)  # width, height
NOT_COUNTED = ('activations', 'additions and other element-wise operations (fake quantization included)',
               'pixel shuffle', 'interpolation', 'pooling', 'normalisations', 'softmax')

_CONV = {torch.conv1d, torch.conv2d, torch.conv3d}
_CONV_T = {torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d}
_LINEAR = {F.linear}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm, torch.bmm,
           torch.Tensor.bmm}
_RMATMUL = {torch.Tensor.__rmatmul__}
_ADDMM = {torch.addmm, torch.Tensor.addmm, torch.baddbmm, torch.Tensor.baddbmm, torch.addbmm, torch.Tensor.addbmm}
_SDPA = {F.scaled_dot_product_attention}
_EINSUM = {torch.einsum}


class CostError(ValueError):
    """A bad option file, size or scale; the CLI prints it on one line and exits with status 2."""


# ---------------------------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------------------------

def parse_size(text):
    """``'1280x720'`` (width x height) -> ``(1280, 720)``."""
    m = re.fullmatch(r'\s*(\d+)\s*[xX\u00d7]\s*(\d+)\s*', str(text))
    if m is None or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise CostError(f'bad output size {text!r}: give it as WIDTHxHEIGHT with positive integers, e.g. 1280x720')
    return int(m.group(1)), int(m.group(2))


def lr_size(output_size, scale):
    """LR ``(width, height)`` whose SR output at ``scale`` is ``output_size``; CostError if not divisible."""
    w, h = output_size
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise CostError(f'scale must be a positive integer, got {scale!r}')
    if w % scale or h % scale:
        raise CostError(f'output size {w}x{h} is not divisible by the scale {scale} '
                        f'({w}/{scale} = {w / scale:g}, {h}/{scale} = {h / scale:g})')
    return w // scale, h // scale


# ---------------------------------------------------------------------------------------------------------------
# Tracing
# ---------------------------------------------------------------------------------------------------------------

def _arg(args, kwargs, index, name):
    if len(args) > index:
        return args[index]
    return kwargs.get(name)


def _einsum_macs(args):
    """MACs of a two-operand einsum without ellipsis (product of every index size), else None."""
    if not args or not isinstance(args[0], str):
        return None
    operands = args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    eq = args[0].replace(' ', '')
    if '...' in eq or len(operands) != 2:
        return None
    sizes = {}
    for spec, t in zip(eq.split('->')[0].split(','), operands):
        if len(spec) != t.dim():
            return None
        sizes.update(zip(spec, t.shape))
    return math.prod(int(s) for s in sizes.values())


def _op_cost(func, args, kwargs, out):
    """``(kind, macs, in_elements)`` of one traced call, or None for an operation that is not counted."""
    if func in _CONV:
        x, w = _arg(args, kwargs, 0, 'input'), _arg(args, kwargs, 1, 'weight')
        return 'conv', out.numel() * w.shape[1:].numel(), x.numel()
    if func in _CONV_T:
        x, w = _arg(args, kwargs, 0, 'input'), _arg(args, kwargs, 1, 'weight')
        return 'conv_transpose', x.numel() * w.shape[1:].numel(), x.numel()
    if func in _LINEAR:
        x, w = _arg(args, kwargs, 0, 'input'), _arg(args, kwargs, 1, 'weight')
        return 'linear', out.numel() * w.shape[1], x.numel()
    if func in _MATMUL:
        a = _arg(args, kwargs, 0, 'input')
        return 'matmul', out.numel() * a.shape[-1], a.numel()
    if func in _RMATMUL:  # b.__rmatmul__(a) = a @ b
        a = args[1]
        return 'matmul', out.numel() * a.shape[-1], a.numel()
    if func in _ADDMM:
        a = args[1] if len(args) > 1 else kwargs.get('mat1', kwargs.get('batch1'))
        k = a.shape[-1]
        if func.__name__ == 'addbmm':  # sum over the batch: out (n, p), a (b, n, m)
            return 'matmul', out.numel() * k * a.shape[0], a.numel()
        return 'matmul', out.numel() * k, a.numel()
    if func in _SDPA:
        q, k, v = (_arg(args, kwargs, i, n) for i, n in enumerate(('query', 'key', 'value')))
        rows = q.numel() // q.shape[-1]  # batch * heads * L
        return 'attention', rows * k.shape[-2] * (q.shape[-1] + v.shape[-1]), q.numel()
    if func in _EINSUM:
        macs = _einsum_macs(args)
        return ('einsum', macs, 0) if macs is not None else ('einsum_not_counted', 0, 0)
    return None


class _OpTracer(TorchFunctionMode):
    """Records the cost of every counted operation, attributed to the innermost running module."""

    def __init__(self, module_stack):
        super().__init__()
        self.stack = module_stack
        self.ops = OrderedDict()  # (module name, kind) -> dict(macs, in_elements, calls)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if torch.is_tensor(out):
            cost = _op_cost(func, args, kwargs, out)
            if cost is not None:
                kind, macs, in_elements = cost
                name = self.stack[-1] if self.stack else ''
                rec = self.ops.setdefault((name, kind), dict(macs=0, in_elements=0, calls=0))
                rec['macs'] += int(macs)
                rec['in_elements'] += int(in_elements)
                rec['calls'] += 1
        return out


def _stripped_copy(net):
    """A copy of ``net`` whose quantized layers have no quantizer and no offset (plain FP convolutions)."""
    clone = copy.deepcopy(net)
    for _, layer in quantized_layers(clone):
        layer.act_quant = None
        layer.weight_quant = None
        layer.offset = None
    return clone.eval()


def _first_tensor(out):
    if torch.is_tensor(out):
        return out
    if isinstance(out, (list, tuple)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(out, dict):
        return _first_tensor(list(out.values()))
    return None


def _trace(net, shape, device):
    """Run a stripped copy of ``net`` on an input of ``shape`` on ``device``; returns (ops, output shape)."""
    clone = _stripped_copy(net)
    dtype = next((p.dtype for p in clone.parameters() if p.is_floating_point()), torch.float32)
    clone = clone.to(device)
    stack = []

    def enter(name):
        def hook(module, args):
            stack.append(name)  # returns None: the input is left alone
        return hook

    def leave(module, args, output):
        stack.pop()  # returns None: the output is left alone

    handles = []
    for name, module in clone.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave, always_call=True))
    tracer = _OpTracer(stack)
    try:
        with torch.no_grad(), tracer:
            out = clone(torch.zeros(shape, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
    out = _first_tensor(out)
    return tracer.ops, (tuple(out.shape) if out is not None else None)


def _reduction(h, w, multiple=1, min_side=24):
    """Largest ``g`` with ``h / g``, ``w / g`` integers, multiples of ``multiple`` and at least ``min_side``."""
    g = math.gcd(h // multiple, w // multiple) if h % multiple == 0 and w % multiple == 0 else 1
    best = 1
    for d in range(1, g + 1):
        if g % d == 0 and h // d >= min_side and w // d >= min_side:
            best = d
    return best


def _one_line(e):
    return f'{type(e).__name__}: ' + ' '.join(str(e).split())


def trace_ops(net, in_channels, lr_hw, scale, method='auto', multiple=1):
    """Count the operations of ``net`` for an LR input of height/width ``lr_hw``.

    Args:
        net (nn.Module): The network (not modified: a stripped copy runs).
        in_channels (int): Channels of the input image.
        lr_hw (tuple[int, int]): LR (height, width).
        scale (int): Upscaling factor, to check the output size.
        method (str): ``'meta'`` (exact, shapes only), ``'scaled'`` (CPU forward at a reduced size, scaled by the
            area ratio) or ``'auto'`` (meta, else scaled). Default: 'auto'.
        multiple (int): The reduced size of ``'scaled'`` keeps both sides multiples of this (a window size).
            Default: 1.

    Returns:
        tuple: (ops, method used, notes) with ops ``{(module name, kind): {macs, in_elements, calls}}``.

    Raises:
        CostError: if the network cannot process the input or its output is not ``lr_hw * scale``.
    """
    if method not in ('auto', 'meta', 'scaled'):
        raise ValueError(f"method must be 'auto', 'meta' or 'scaled', got {method!r}")
    h, w = lr_hw
    notes = []
    meta_error = None
    if method in ('auto', 'meta'):
        try:
            ops, out_shape = _trace(net, (1, in_channels, h, w), 'meta')
        except Exception as e:
            meta_error = f'cannot run {type(net).__name__} on a {w}x{h} input (on the meta device): {_one_line(e)}'
            if method == 'meta':
                raise CostError(meta_error) from e
        else:
            _check_output(out_shape, (h * scale, w * scale), (h, w), scale)
            return ops, 'meta', notes
    g = _reduction(h, w, multiple)
    hs, ws = h // g, w // g
    try:
        ops, out_shape = _trace(net, (1, in_channels, hs, ws), 'cpu')
    except Exception as e:
        msg = f'cannot run {type(net).__name__} on a {ws}x{hs} input (CPU): {_one_line(e)}'
        raise CostError(f'{meta_error}; {msg}' if meta_error else msg) from e
    _check_output(out_shape, (hs * scale, ws * scale), (hs, ws), scale)
    if meta_error:
        notes.append(f'{meta_error}; counted with a CPU forward pass instead')
    factor = g * g
    if factor > 1:
        notes.append(f'scaled from a {ws}x{hs} LR forward pass by {factor} (exact only when the work of every '
                     f'operation is proportional to the image area)')
        for rec in ops.values():
            rec['macs'] *= factor
            rec['in_elements'] *= factor
    return ops, 'scaled', notes


def _check_output(out_shape, expected_hw, in_hw, scale):
    if out_shape is None or len(out_shape) < 2 or tuple(out_shape[-2:]) != tuple(expected_hw):
        got = 'no tensor' if out_shape is None else 'x'.join(str(s) for s in reversed(out_shape[-2:]))
        raise CostError(f'the network maps a {in_hw[1]}x{in_hw[0]} input to {got}, not to '
                        f'{expected_hw[1]}x{expected_hw[0]} (scale {scale}): is the scale right?')


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

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
    run_w, run_h = -(-lr_w // multiple) * multiple, -(-lr_h // multiple) * multiple
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
        notes.append(f'both sizes include the FP32 buffers of the state dict ({_fmt_bytes(breakdown["fp_buffers"])}: '
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


# ---------------------------------------------------------------------------------------------------------------
# Option files and the command line
# ---------------------------------------------------------------------------------------------------------------

def load_network_options(path):
    """``(option dict, network options)`` of a BasicSR option file, a ``network_g``-only file or a network mapping."""
    if not os.path.isfile(path):
        raise CostError(f'option file not found: {path}')
    try:
        with open(path, encoding='utf-8') as f:
            data = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CostError(f'cannot parse {path}: {e}') from None
    if not isinstance(data, dict):
        raise CostError(f'{path} is not a YAML mapping with a network_g entry')
    if 'network_g' in data:
        opt, net_opt = data, data['network_g']
    elif 'type' in data:  # the network mapping itself
        opt, net_opt = {}, data
    else:
        raise CostError(f'{path} has no network_g entry (keys: {", ".join(map(str, data)) or "none"})')
    if not isinstance(net_opt, dict) or 'type' not in net_opt:
        raise CostError(f'network_g of {path} must be a mapping with a "type" key, got {net_opt!r}')
    return opt, dict(net_opt)


def _inner_arch_options(net_opt):
    arch = net_opt.get('arch')
    return dict(arch) if net_opt.get('type') == 'Quantized' and isinstance(arch, dict) else net_opt


def _arch_option(net_opt, keys):
    """The first of ``keys`` given to the (inner) arch, else the first with a default in its signature; or None."""
    from basicsr.utils.registry import ARCH_REGISTRY

    arch = _inner_arch_options(net_opt)
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


def resolve_scale(opt, net_opt):
    """The option file's ``scale``, else the arch's ``upscale`` / ``scale`` option, else that argument's default."""
    scale = opt.get('scale')
    if scale is None:
        scale = _arch_option(net_opt, ('upscale', 'scale'))
    if scale is None:
        raise CostError('cannot tell the scale: the option file has no "scale" and network_g no upscale/scale '
                        'option; pass --scale')
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise CostError(f'scale must be a positive integer, got {scale!r}')
    return scale


def _check_arch_types(net_opt):
    """CostError for an unregistered ``network_g.type`` (or ``network_g.arch.type`` of ``Quantized``)."""
    from basicsr.utils.registry import ARCH_REGISTRY

    types = [('network_g.type', net_opt.get('type'))]
    if net_opt.get('type') == 'Quantized' and isinstance(net_opt.get('arch'), dict):
        types.append(('network_g.arch.type', net_opt['arch'].get('type')))
    for where, arch_type in types:
        if arch_type not in ARCH_REGISTRY:
            registered = ', '.join(sorted(ARCH_REGISTRY._obj_map))
            raise CostError(f'unknown {where} {arch_type!r}; registered: {registered}')


def build_network_from_options(net_opt):
    """Build ``network_g`` through BasicSR's arch registry (without BasicSR's logging)."""
    from basicsr.utils.registry import ARCH_REGISTRY

    _check_arch_types(net_opt)
    kwargs = dict(net_opt)
    arch_type = kwargs.pop('type')
    try:
        return ARCH_REGISTRY.get(arch_type)(**kwargs)
    except Exception as e:
        raise CostError(f'cannot build network_g ({arch_type}): {type(e).__name__}: {e}') from None


def load_weights(net, path, param_key='params'):
    """Load a checkpoint into ``net`` (creating the offsets it carries); CostError if it does not fit."""
    from odm_basicsr.compat import load_checkpoint, select_state_dict
    from odm_basicsr.quant import ensure_offsets_from_state

    try:
        _, state = select_state_dict(load_checkpoint(path), param_key, fallback=None, source=path)
    except (FileNotFoundError, RuntimeError, TypeError) as e:
        raise CostError(str(e)) from None
    except KeyError as e:
        raise CostError(f'{e.args[0]}; use --param-key') from None
    try:
        ensure_offsets_from_state(net, state)
        own = net.state_dict()
        missing = sorted(set(own) - set(state) - set(quantizer_state_keys(net)))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise CostError(f'checkpoint {path} [{param_key}] does not fit the network: {len(missing)} missing '
                            f'{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}')
        net.load_state_dict(state, strict=False)
    except CostError:
        raise
    except Exception as e:
        raise CostError(f'checkpoint {path} [{param_key}] does not fit the network: {e}') from None
    return net


def _fmt_ops(n):
    for unit, div in (('T', 1e12), ('G', 1e9), ('M', 1e6), ('K', 1e3)):
        if abs(n) >= div:
            return f'{n / div:.3f} {unit}'
    return f'{n:g}'


def _fmt_bytes(n):
    if n >= 1e6:
        return f'{n / 1e6:.3f} MB'
    if n >= 1e3:
        return f'{n / 1e3:.3f} kB'
    return f'{n} B'


def _fmt_bits(w, a):
    return f'W{w}A{a}' if not isinstance(w, list) and not isinstance(a, list) else f'W{w} A{a} (mixed)'


def _short_list(names, limit=6):
    if len(names) <= limit:
        return ', '.join(names)
    return ', '.join(names[:limit - 2]) + f', ... ({len(names) - limit + 1} more), ' + names[-1]


def format_report(r, per_layer=False):
    """Human-readable text of a :func:`cost_report` dict."""
    w, h = r['output_size']
    lw, lh = r['input_size']
    how = ('counted on the meta device: exact shapes, no arithmetic' if r['method'] == 'meta'
           else 'counted with a reduced CPU forward pass, scaled')
    pct = 100.0 * r['quantized_fraction']
    b = r['storage']
    if r['num_quantized_layers']:
        split = (f"{_fmt_ops(r['macs_quantized'])} ({pct:.1f} %) in {r['num_quantized_layers']} quantized layers, "
                 f"{_fmt_ops(r['macs_fp'])} FP")
        bits = _fmt_bits(r['w_bits'], r['a_bits'])
    else:
        split, bits = 'all FP (no quantized layer)', 'no quantized layer'
    lines = [
        f"{r['arch']} x{r['scale']}: LR {lw}x{lh} -> SR {w}x{h} ({how})",
        f"MACs          {_fmt_ops(r['macs'])}  ({r['macs']:,}): {split}",
    ]
    if r['macs_matmul']:
        lines.append(f"              of which {_fmt_ops(r['macs_matmul'])} in matrix products outside conv/linear "
                     f"layers (e.g. attention q@k^T, attn@v), counted as FP")
    lines += [
        f"BitOPs        {_fmt_ops(r['bitops'])}  = FP MACs + (b_w/32)(b_a/32) x quantized MACs "
        f"({bits}); all-FP {_fmt_ops(r['bitops_fp'])}; "
        f"ratio {100.0 * r['bitops_ratio']:.1f} %",
        f"Parameters    {r['params']:,} ({r['params'] / 1e6:.3f} M); quantizer parameters {r['params_quantizer']:,}, "
        f"offset parameters {r['params_offset']:,}",
        f"Size          {_fmt_bytes(r['size_bytes'])} ({r['size_bytes']:,} B): packed quantized weights "
        f"{_fmt_bytes(b['quantized_weights'])}, FP32 parameters {_fmt_bytes(b['fp_params'])}, FP32 buffers "
        f"{_fmt_bytes(b['fp_buffers'])}, quantizer state {_fmt_bytes(b['quantizer'])} "
        f"({b['quantizer_elements']} values), offsets {_fmt_bytes(b['offsets'])}, weight step sizes "
        f"{_fmt_bytes(b['weight_scales'])}",
        f"Size FP32     {_fmt_bytes(r['size_bytes_fp'])} ({r['size_bytes_fp']:,} B); ratio "
        f"{100.0 * r['size_ratio']:.1f} %  (MB = 1e6 bytes)",
        f"Quantized layers ({r['num_quantized_layers']}): {_short_list(r['quantized_layers']) or 'none'}",
    ]
    off = r['offsets']
    if off['layers']:
        folded = sum(1 for o in off['layers'] if o['folded'])
        lines.append(f"Offsets       {len(off['layers'])} layers ({folded} folded): {off['params']:,} parameters, "
                     f"{_fmt_ops(off['fp_ops'])} extra FP operations (not in the BitOPs above)")
    else:
        lines.append('Offsets       none')
    lines.append('Not counted:  ' + ', '.join(r['not_counted']))
    lines += [f'Note:         {n}' for n in r['notes']]
    if per_layer:
        lines.append(f"{'layer':<48} {'op':<10} {'MACs':>14} {'share':>7} {'bits':>7} {'BitOPs':>14}")
        for ly in r['layers']:
            share = 100.0 * ly['macs'] / r['macs'] if r['macs'] else 0.0
            bits = f"W{ly['w_bits']}A{ly['a_bits']}" if ly['quantized'] else 'FP'
            lines.append(f"{ly['name'] or '(root)':<48} {ly['op']:<10} {_fmt_ops(ly['macs']):>14} {share:6.2f}% "
                         f"{bits:>7} {_fmt_ops(ly['bitops']):>14}")
    return '\n'.join(lines)


def report_from_options(path, output_size='1280x720', scale=None, checkpoint=None, param_key='params',
                        method='auto'):
    """Build ``network_g`` of the option file ``path`` and return its :func:`cost_report`."""
    size = parse_size(output_size) if isinstance(output_size, str) else tuple(output_size)
    opt, net_opt = load_network_options(path)
    _check_arch_types(net_opt)
    scale = resolve_scale(opt, net_opt) if scale is None else scale
    lr_size(size, scale)  # a size error before the (possibly slow) build
    net = build_network_from_options(net_opt)
    if checkpoint:
        load_weights(net, checkpoint, param_key)
    in_channels = _arch_option(net_opt, ('num_in_ch', 'in_chans'))
    return cost_report(net, size, scale, in_channels=in_channels, method=method)


def main(argv=None):
    """Entry point of ``odm-cost`` (importing this module has already set up odm_basicsr and its archs)."""
    parser = argparse.ArgumentParser(
        prog='odm-cost', description='MACs, parameters, BitOPs and storage of network_g of a BasicSR option file '
        '(METHOD.md section 7).')
    parser.add_argument('-opt', required=True, help='BasicSR option file, or a YAML file with only network_g')
    parser.add_argument('--output-size', default='1280x720', help='SR output WIDTHxHEIGHT (default: 1280x720)')
    parser.add_argument('--scale', default=None, help='upscaling factor (default: the option file\'s scale, else '
                        'the arch\'s upscale/scale)')
    parser.add_argument('--checkpoint', default=None, help='load these weights first (counts the offsets a trained '
                        'ODM checkpoint carries)')
    parser.add_argument('--param-key', default='params', help='entry of the checkpoint to load (default: params)')
    parser.add_argument('--json', action='store_true', help='print one JSON object')
    parser.add_argument('--per-layer', action='store_true', help='also print one line per layer (text output)')
    args = parser.parse_args(argv)
    try:
        scale = None
        if args.scale is not None:
            if not re.fullmatch(r'\s*\d+\s*', args.scale) or int(args.scale) < 1:
                raise CostError(f'bad --scale {args.scale!r}: give a positive integer')
            scale = int(args.scale)
        report = report_from_options(args.opt, args.output_size, scale, args.checkpoint, args.param_key)
    except CostError as e:
        print('odm-cost: error: ' + ' '.join(str(e).split()), file=sys.stderr)
        sys.exit(2)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report, per_layer=args.per_layer))
    return 0


if __name__ == '__main__':
    main()
