"""The deploy form of a quantized layer: integer codes and scales, computed exactly as the integer kernels do.

:class:`IntegerConv2d` (and :class:`IntegerLinear`) replace a trained ``QConv2d`` (``QLinear``) in the deploy form of a
network, the one reference that every export is checked against. What it holds and computes::

    x' = x - shift              (a distribution offset's shift; or x / scale for a scale offset)
    c_x = clip(round(x' / step_in), low_in, low_in + 2**bits_in - 1)   # input codes: QuantizeLinear + Clip
    acc = conv(c_x, weight_codes) + bias_codes                          # exact integers (int8 weights, int32 bias)
    requantized output (an output quantizer, or the next layer's input grid that the integer kernel writes):
        c_y = clip(round(float32(acc) * M), low_out, high_out),  M = float32(step_in * weight_scale[o]) / step_out
        y   = step_out * c_y
    float output (neither):  y = acc * (step_in * weight_scale[o])

``round`` is round-half-to-even on both sides (``torch.round``, ONNX ``QuantizeLinear``, onnxruntime's requantization),
the codes are integers, the accumulator is exact (float64 holds every int32 sum), and every scale is a float32
number stored as such. So the QCDQ chain ``QuantizeLinear -> Clip -> DequantizeLinear`` reproduces the input codes bit
for bit, and onnxruntime's integer ``QLinearConv`` (int32 accumulator, requantized by a float32 multiplier)
reproduces a requantized output bit for bit; only a float output differs from onnxruntime's float convolution by
float rounding.

Plain PyTorch: no BasicSR import.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

#: Kinds of input pre-processing a distribution offset leaves in front of the quantizer.
PRE_KINDS = (None, 'shift', 'scale')


#: Where a requantized output comes from: the layer's own output quantizer (written into the ONNX graph after the
#: conv), or the input grid of the one integer layer it feeds (the consumer's quantizer does it in the graph).
OUT_KINDS = (None, 'own', 'next')


def quantize_dequantize(x, step, low, bits):
    """``step * clip(round(x / step), low, low + 2**bits - 1)``: the zero-aligned grid of
    :func:`odm_basicsr.quant.fake_quant.aligned_grid` (``low`` an int, ``step`` a float32 0-d tensor)."""
    return torch.clamp(torch.round(x / step), low, low + 2**bits - 1) * step


class _IntegerLayer(nn.Module):
    """Codes, scales and grids shared by :class:`IntegerConv2d` and :class:`IntegerLinear`.

    Args:
        weight_shape (tuple[int]): Shape of the weight (out_channels first).
        weight_bits (int): Bits of the weight grid (2..8); its codes are stored in int8.
        weight_grid (str): ``'midrise'`` (odd codes ``-(2**b - 1) .. 2**b - 1``) or ``'midtread'``
            (``-(2**(b-1) - 1) .. 2**(b-1) - 1``).
        in_bits (int): Bits of the input grid.
        in_low (int): Lowest input code (the grid is ``in_step * (in_low .. in_low + 2**in_bits - 1)``).
        bias (bool): Whether there is a bias (int32 codes on the scale ``in_step * weight_scale``).
        pre (str | None): ``'shift'``, ``'scale'`` or None: the offset applied before the input quantizer.
        out_bits (int | None): Bits of the requantized output, or None for a float output.
        out_low (int | None): Lowest output code (the highest is ``out_low + 2**out_bits - 1``).
        out_kind (str | None): ``'own'`` (an output quantizer) or ``'next'`` (the input grid of the integer layer it
            feeds); None with a float output.
    """

    channel_dim = 1

    def __init__(self, weight_shape, weight_bits, weight_grid, in_bits, in_low, bias=True, pre=None, out_bits=None,
                 out_low=None, out_kind=None):
        super().__init__()
        if pre not in PRE_KINDS:
            raise ValueError(f'pre must be one of {PRE_KINDS}, got {pre!r}')
        if out_kind not in OUT_KINDS or (out_kind is None) != (out_bits is None):
            raise ValueError(f'out_kind must be one of {OUT_KINDS}, set exactly when out_bits is, got {out_kind!r}')
        self.weight_bits, self.weight_grid = int(weight_bits), weight_grid
        self.in_bits, self.in_low = int(in_bits), int(in_low)
        self.out_bits = None if out_bits is None else int(out_bits)
        self.out_low = None if out_low is None else int(out_low)
        self.out_kind = out_kind
        self.pre = pre
        out_channels, in_channels = weight_shape[0], weight_shape[1]
        self.register_buffer('weight_codes', torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer('weight_scale', torch.ones(out_channels))
        self.register_buffer('bias_codes', torch.zeros(out_channels, dtype=torch.int32) if bias else None)
        self.register_buffer('in_step', torch.tensor(1.0))
        pre_channels = in_channels * getattr(self, 'groups', 1)
        self.register_buffer('pre_param', torch.zeros(pre_channels) if pre else None)
        self.register_buffer('out_step', torch.tensor(1.0) if out_bits is not None else None)

    @property
    def max_weight_code(self):
        """int: Largest |code| of the weight grid."""
        return 2**self.weight_bits - 1 if self.weight_grid == 'midrise' else 2**(self.weight_bits - 1) - 1

    def spec(self):
        """The integer attributes that, with the buffers, define the layer (the compact file's metadata)."""
        return dict(weight_shape=list(self.weight_codes.shape), weight_bits=self.weight_bits,
                    weight_grid=self.weight_grid, in_bits=self.in_bits, in_low=self.in_low,
                    bias=self.bias_codes is not None, pre=self.pre, out_bits=self.out_bits, out_low=self.out_low,
                    out_kind=self.out_kind)

    def _channel_view(self, t, x):
        shape = [1] * x.dim()
        shape[self.channel_dim % x.dim()] = -1
        return t.view(shape)

    def preprocess(self, x):
        """The offset's float shift (``x - delta``) or scale (``x / rho``) in front of the input quantizer."""
        if self.pre == 'shift':
            return x - self._channel_view(self.pre_param, x)
        if self.pre == 'scale':
            return x / self._channel_view(self.pre_param, x)
        return x

    def input_codes(self, x):
        """``clip(round(x' / step_in), low_in, high_in)``: integers held in ``x``'s float dtype."""
        high = self.in_low + 2**self.in_bits - 1
        return torch.clamp(torch.round(self.preprocess(x) / self.in_step), self.in_low, high)

    def quantized_input(self, x):
        """The dequantized input ``step_in * codes`` (what ``DequantizeLinear`` gives the float twin)."""
        return self.input_codes(x) * self.in_step

    def dequantized_weight(self):
        """``weight_scale[o] * codes``, float32 (what ``DequantizeLinear`` with per-channel scales computes)."""
        codes = self.weight_codes.float()
        return codes * self.weight_scale.view(-1, *([1] * (codes.dim() - 1)))

    def bias_scale(self):
        """Scale of the int32 bias codes: ``in_step * weight_scale``, float32, (out_channels,)."""
        return self.in_step * self.weight_scale

    def dequantized_bias(self):
        return None if self.bias_codes is None else self.bias_codes.float() * self.bias_scale()

    def output(self, acc):
        """From the exact accumulator (float64 integers, the bias codes included) to the layer's output."""
        scale = self.bias_scale()  # step_in * weight_scale, float32
        if self.out_bits is None:
            return (acc * self._channel_view(scale.double(), acc)).float()
        multiplier = self._channel_view(scale / self.out_step, acc)  # float32, as onnxruntime requantizes
        codes = torch.clamp(torch.round(acc.float() * multiplier), self.out_low, self.out_low + 2**self.out_bits - 1)
        return codes * self.out_step

    def _bias_codes64(self):
        return None if self.bias_codes is None else self.bias_codes.double()

    def extra_repr(self):
        out = '' if self.out_bits is None else f', out_bits={self.out_bits} ({self.out_kind})'
        pre = '' if self.pre is None else f', pre={self.pre}'
        return (f'weight={tuple(self.weight_codes.shape)}, w_bits={self.weight_bits} ({self.weight_grid}), '
                f'in_bits={self.in_bits}{pre}{out}')


class IntegerConv2d(_IntegerLayer):
    """Deploy form of a quantized ``Conv2d`` (see the module docstring).

    Args:
        stride, padding, dilation, groups, padding_mode: As ``nn.Conv2d`` (tuples of two ints; ``padding_mode`` is
            ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``).
        **kwargs: Those of :class:`_IntegerLayer`.
    """

    def __init__(self, weight_shape, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, padding_mode='zeros',
                 **kwargs):
        self.groups = int(groups)
        super().__init__(weight_shape, **kwargs)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.padding_mode = padding_mode

    def spec(self):
        return dict(super().spec(), stride=list(self.stride), padding=list(self.padding),
                    dilation=list(self.dilation), groups=self.groups, padding_mode=self.padding_mode)

    def conv(self, x, weight, bias):
        if self.padding_mode != 'zeros':
            ph, pw = self.padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x):
        acc = self.conv(self.input_codes(x).double(), self.weight_codes.double(), self._bias_codes64())
        return self.output(acc).to(x.dtype)


class IntegerLinear(_IntegerLayer):
    """Deploy form of a quantized ``Linear`` (channels on the last dim). The ONNX writer keeps it a float layer."""

    channel_dim = -1

    def forward(self, x):
        acc = F.linear(self.input_codes(x).double(), self.weight_codes.double(), self._bias_codes64())
        return self.output(acc).to(x.dtype)


def build_integer_layer(spec):
    """An :class:`IntegerConv2d` / :class:`IntegerLinear` (zero buffers) from :meth:`_IntegerLayer.spec` plus
    ``kind``."""
    spec = dict(spec)
    kind = spec.pop('kind')
    if kind == 'conv2d':
        return IntegerConv2d(**spec)
    if kind == 'linear':
        return IntegerLinear(**spec)
    raise ValueError(f'unknown integer layer kind {kind!r}')


def layer_kind(layer):
    return 'conv2d' if isinstance(layer, IntegerConv2d) else 'linear'


def integer_layers(model):
    """``(name, layer)`` pairs of the integer layers of a deploy-form network."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _IntegerLayer)]


def float64_twin(net):
    """A copy of a deploy-form network whose full-precision layers compute in float64, the integer layers
    unchanged (float32 scales, float32 requantization): the same network in another float arithmetic.

    Its output, against the float32 network's, is the **float noise floor** of the network: how far two float
    implementations of its full-precision layers (PyTorch and onnxruntime, or PyTorch on one and on two threads)
    can drift apart once their last-bit differences move a code across a grid boundary in front of an integer layer
    and low-bit layers behind it amplify that. Call it with a float64 input; it returns float64.
    """
    twin = copy.deepcopy(net).double()
    for _, layer in integer_layers(twin):
        for key, t in layer.named_buffers(recurse=False):
            if t is not None and t.dtype == torch.float64:
                setattr(layer, key, t.float())
    return twin
