"""Which quantized layers hand their output to a float operation.

An integer kernel (onnxruntime's ``QLinearConv``) is used for a convolution only when its output is requantized
right away: the convolution must feed the activation quantizer of the next quantized layer (through a ReLU at most,
which the quantizer's clip absorbs). A convolution whose output reaches anything else (a residual addition, a
LeakyReLU, a distribution offset's float shift or scale, the network output) stays a float convolution unless it
gets an 8-bit output quantizer (``QuantizedLayerMixin.attach_output_quantizer``). :func:`float_output_layers`
finds these layers by running the network once and recording, outside the quantized layers, which operation
consumes which tensor (a ``TorchFunctionMode``, so any architecture works, traceable or not).

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
        self.uses = {}  # id(tensor) -> [(kind, [id(output), ...])], kind 'quant' | 'absorbed' | 'float'
        self.alive = []  # every recorded tensor, so that no id is reused during the pass

    def use(self, tensor, kind, outputs=()):
        self.uses.setdefault(id(tensor), []).append((kind, [id(o) for o in outputs]))
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

    def only_quantized_uses(self, tensor_id, seen=None):
        """True when every use of the tensor (through absorbed operations) is a quantized layer's input."""
        seen = set() if seen is None else seen
        if tensor_id in seen:
            return True
        seen.add(tensor_id)
        uses = self.uses.get(tensor_id)
        if not uses:  # the network output, or unused
            return False
        for kind, outputs in uses:
            if kind == 'float':
                return False
            if kind == 'absorbed' and not all(self.only_quantized_uses(o, seen) for o in outputs if o != tensor_id):
                return False
        return True


@torch.no_grad()
def float_output_layers(model, example):
    """Names of the quantized layers whose output reaches a float operation (see the module docstring).

    The model runs once on ``example`` in full precision (quantizers pass through and stay as they are).

    Args:
        model (nn.Module): Network with quantized layers.
        example (Tensor): A valid input, e.g. ``(1, C, 32, 32)``.

    Returns:
        list[str]: In the order of :func:`~odm_basicsr.quant.layer_selection.quantized_layers`.
    """
    layers = quantized_layers(model)
    recorder, produced, handles = _UseRecorder(), {}, []

    def enter(module, args):
        # an input quantizer behind a float offset is not what the previous layer's integer kernel can feed
        direct = module.act_quant is not None and module.offset is None
        recorder.use(args[0], 'quant' if direct else 'float')
        recorder.depth += 1

    def leave(name):
        def hook(module, args, output):
            recorder.depth -= 1
            produced.setdefault(name, []).append(output)
            recorder.alive.append(output)
        return hook

    for name, m in layers:
        handles.append(m.register_forward_pre_hook(enter))
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
    return [name for name, _ in layers
            if name in produced and not all(recorder.only_quantized_uses(id(t)) for t in produced[name])]
