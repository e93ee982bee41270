"""Which quantized layers hand their output to a float operation.

An integer kernel (onnxruntime's ``QLinearConv``) is used for a convolution only when its output is requantized
right away: the convolution must feed the activation quantizer of the next quantized layer (through a ReLU at most,
which the quantizer's clip absorbs). A convolution whose output reaches anything else (a residual addition, a
LeakyReLU, a distribution offset's float shift or scale, the network output) stays a float convolution unless it
gets an 8-bit output quantizer (``QuantizedLayerMixin.attach_output_quantizer``); so does one whose output feeds
several quantized layers (an integer kernel requantizes once). :func:`requantizing_consumers` finds, for every
quantized layer, the one quantized layer whose input quantizer requantizes its output, if any, by running the network
once and recording, outside the quantized layers, which operation consumes which tensor (a ``TorchFunctionMode``,
so any architecture works, traceable or not); :func:`float_output_layers` lists the others.

Plain PyTorch: no BasicSR import.
"""
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .calibration import passthrough
from .layer_selection import quantized_layers

#: Operations that a following activation quantizer absorbs (ReLU then ``clip(round(x / s), low, high)`` equals the
#: same clip with ``low`` raised to 0, because 0 is on the zero-aligned grid).
ABSORBED = frozenset({torch.relu, torch.relu_, F.relu, torch.Tensor.relu, torch.Tensor.relu_})


def _tensors(tree):
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class _UseRecorder(TorchFunctionMode):
    """Records, for every tensor produced outside a quantized layer, the operations that consume it."""

    def __init__(self):
        super().__init__()
        self.depth = 0  # > 0 while a quantized layer runs: its internal operations are not uses
        self.uses = {}  # id(tensor) -> [(kind, [id(output), ...], consumer)], kind 'quant' | 'absorbed' | 'float'
        self.alive = []  # every recorded tensor, so that no id is reused during the pass

    def use(self, tensor, kind, outputs=(), consumer=None):
        self.uses.setdefault(id(tensor), []).append((kind, [id(o) for o in outputs], consumer))
        self.alive.append(tensor)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            outputs = _tensors(out)
            if outputs:  # metadata queries (size, shape, dim) produce no tensor and are no uses
                kind = 'absorbed' if func in ABSORBED else 'float'
                for t in _tensors((args, kwargs)):
                    self.use(t, kind, outputs)
                self.alive.extend(outputs)
        return out

    def follow(self, tensor_id, seen):
        """``(quantized consumers, absorbed op on the way, float use)`` of a tensor, through absorbed ops."""
        if tensor_id in seen:
            return [], False, False
        seen.add(tensor_id)
        uses = self.uses.get(tensor_id)
        if not uses:  # the network output, or unused
            return [], False, True
        consumers, absorbed, floating = [], False, False
        for kind, outputs, consumer in uses:
            if kind == 'float':
                floating = True
            elif kind == 'quant':
                consumers.append(consumer)
            else:
                absorbed = True
                for o in outputs:
                    c, a, f = self.follow(o, seen)
                    consumers, absorbed, floating = consumers + c, absorbed or a, floating or f
        return consumers, absorbed, floating


@torch.no_grad()
def requantizing_consumers(model, example):
    """For every quantized layer, the one quantized layer whose input quantizer alone consumes its output.

    The model runs once on ``example`` in full precision (quantizers pass through and stay as they are).

    Args:
        model (nn.Module): Network with quantized layers.
        example (Tensor): A valid input, e.g. ``(1, C, 32, 32)``.

    Returns:
        dict[str, tuple[str, bool] | None]: Layer -> ``(consumer, through_relu)`` when its output reaches exactly one
        quantized layer's input quantizer and nothing else (``through_relu``: a ReLU on the way, which the
        consumer's clip absorbs), else None (the output stays float without an output quantizer). In the order of
        :func:`~odm_basicsr.quant.layer_selection.quantized_layers`.
    """
    layers = quantized_layers(model)
    recorder, produced, handles = _UseRecorder(), {}, []

    def enter(name):
        def hook(module, args):
            # an input quantizer behind a float offset is not what the previous layer's integer kernel can feed
            direct = module.act_quant is not None and module.offset is None
            recorder.use(args[0], 'quant' if direct else 'float', consumer=name)
            recorder.depth += 1
        return hook

    def leave(name):
        def hook(module, args, output):
            recorder.depth -= 1
            produced.setdefault(name, []).append(output)
            recorder.alive.append(output)
        return hook

    for name, m in layers:
        handles.append(m.register_forward_pre_hook(enter(name)))
        handles.append(m.register_forward_hook(leave(name)))
    was_training = model.training
    model.eval()
    try:
        with passthrough(model), recorder:
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    result = {}
    for name, _ in layers:
        consumers, absorbed, floating = [], False, name not in produced
        for t in produced.get(name, []):
            c, a, f = recorder.follow(id(t), set())
            consumers, absorbed, floating = consumers + c, absorbed or a, floating or f
        one = not floating and len(set(consumers)) == 1 and len(consumers) == len(produced.get(name, []))
        result[name] = (consumers[0], absorbed) if one else None
    return result


def float_output_layers(model, example):
    """Names of the quantized layers whose output reaches a float operation, or more than one quantized layer
    (see the module docstring), in the order of :func:`~odm_basicsr.quant.layer_selection.quantized_layers`."""
    return [name for name, consumer in requantizing_consumers(model, example).items() if consumer is None]


def example_input(net, arch=None, size=32):
    """A small random input for one forward pass of ``net``: ``(1, C, size, size)``, ``C`` from the arch options
    (``num_in_ch`` / ``in_chans``) or the first convolution, ``size`` rounded up to the arch's ``window_size``."""
    arch = arch or {}
    channels = arch.get('num_in_ch', arch.get('in_chans'))
    if channels is None:
        first = next((m for m in net.modules() if isinstance(m, torch.nn.Conv2d)), None)
        channels = first.in_channels if first is not None else 3
    window = arch.get('window_size') or 1
    size = -(-size // window) * window
    device = next(net.parameters()).device
    return torch.rand(1, channels, size, size, generator=torch.Generator().manual_seed(0)).to(device)
