"""The deploy form of a quantized layer: integer codes and scales, computed exactly as the exported graph does.

:class:`IntegerConv2d` (and :class:`IntegerLinear`) replace a trained ``QConv2d`` (``QLinear``) in the deploy form of a
network, the one reference that every export is checked against. What it holds and computes::

    x' = x - shift              (a distribution offset's shift; or x / scale for a scale offset)
    x_q = step_in * clip(round(x' / step_in), low_in, low_in + 2**bits_in - 1)     # QuantizeLinear, Clip, Dequantize
    w_q = weight_scale[o] * weight_codes                                           # int8 codes, zero point 0
    b_q = (step_in * weight_scale[o]) * bias_codes                                 # int32 codes
    y   = conv(x_q, w_q, b_q)
    y_q = step_out * clip(round(y / step_out), low_out, low_out + 2**bits_out - 1)  # optional output quantizer

``round`` is round-half-to-even on both sides (``torch.round`` and ONNX ``QuantizeLinear``), the codes are integers,
and every scale is a float32 number stored as such, so an ONNX ``QuantizeLinear -> Clip -> DequantizeLinear`` chain
(the "QCDQ" form) reproduces ``x_q`` bit for bit; an integer convolution computes ``y`` exactly in int32 and differs
from this float32 convolution only by float rounding.

Plain PyTorch: no BasicSR import.
"""
import torch
import torch.nn.functional as F
from torch import nn

#: Kinds of input pre-processing a distribution offset leaves in front of the quantizer.
PRE_KINDS = (None, 'shift', 'scale')


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
        out_bits (int | None): Bits of the output quantizer, or None for a float output.
        out_low (int | None): Lowest output code.
    """

    channel_dim = 1

    def __init__(self, weight_shape, weight_bits, weight_grid, in_bits, in_low, bias=True, pre=None, out_bits=None,
                 out_low=None):
        super().__init__()
        if pre not in PRE_KINDS:
            raise ValueError(f'pre must be one of {PRE_KINDS}, got {pre!r}')
        self.weight_bits, self.weight_grid = int(weight_bits), weight_grid
        self.in_bits, self.in_low = int(in_bits), int(in_low)
        self.out_bits = None if out_bits is None else int(out_bits)
        self.out_low = None if out_low is None else int(out_low)
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
                    bias=self.bias_codes is not None, pre=self.pre, out_bits=self.out_bits, out_low=self.out_low)

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

    def quantized_input(self, x):
        return quantize_dequantize(self.preprocess(x), self.in_step, self.in_low, self.in_bits)

    def dequantized_weight(self):
        """``weight_scale[o] * codes``, float32 (what ``DequantizeLinear`` with per-channel scales computes)."""
        codes = self.weight_codes.float()
        return codes * self.weight_scale.view(-1, *([1] * (codes.dim() - 1)))

    def bias_scale(self):
        """Scale of the int32 bias codes: ``in_step * weight_scale``, float32, (out_channels,)."""
        return self.in_step * self.weight_scale

    def dequantized_bias(self):
        return None if self.bias_codes is None else self.bias_codes.float() * self.bias_scale()

    def quantized_output(self, y):
        if self.out_bits is None:
            return y
        return quantize_dequantize(y, self.out_step, self.out_low, self.out_bits)

    def extra_repr(self):
        out = '' if self.out_bits is None else f', out_bits={self.out_bits}'
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
        y = self.conv(self.quantized_input(x), self.dequantized_weight(), self.dequantized_bias())
        return self.quantized_output(y)


class IntegerLinear(_IntegerLayer):
    """Deploy form of a quantized ``Linear`` (channels on the last dim). The ONNX writer keeps it a float layer."""

    channel_dim = -1

    def forward(self, x):
        return self.quantized_output(F.linear(self.quantized_input(x), self.dequantized_weight(),
                                              self.dequantized_bias()))


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
