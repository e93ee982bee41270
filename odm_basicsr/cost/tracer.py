"""Counting the operations of a network: one forward pass on PyTorch's ``meta`` device (shapes only), with a
``TorchFunctionMode`` that records the multiply-accumulates of every convolution, linear layer and matrix product,
attributed to the innermost running module. A network that cannot run on ``meta`` runs on the CPU at a reduced size,
scaled by the area ratio.
"""
import copy
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from odm_basicsr.quant import quantized_layers
from odm_basicsr.tool_cli import one_line

from .sizes import CostError

_CONV = {torch.conv1d, torch.conv2d, torch.conv3d}
_CONV_T = {torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d}
_LINEAR = {F.linear}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm, torch.bmm,
           torch.Tensor.bmm}
_RMATMUL = {torch.Tensor.__rmatmul__}
_ADDMM = {torch.addmm, torch.Tensor.addmm, torch.baddbmm, torch.Tensor.baddbmm, torch.addbmm, torch.Tensor.addbmm}
_SDPA = {F.scaled_dot_product_attention}
_EINSUM = {torch.einsum}


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


def _error_text(e):
    return f'{type(e).__name__}: {one_line(e)}'


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
            meta_error = f'cannot run {type(net).__name__} on a {w}x{h} input (on the meta device): {_error_text(e)}'
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
        msg = f'cannot run {type(net).__name__} on a {ws}x{hs} input (CPU): {_error_text(e)}'
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

