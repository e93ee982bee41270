"""Quantized convolution and linear layers.

They subclass ``nn.Conv2d`` / ``nn.Linear`` and keep their ``weight`` and ``bias`` state-dict keys, so an FP
checkpoint of the original network loads into the quantized one unchanged. The quantizer state lives in the
sub-modules ``act_quant`` and ``weight_quant`` (and ``offset`` when distribution offsets are used, ``out_quant``
when the layer's output is quantized too).
"""
import torch
import torch.nn.functional as F
from torch import nn

from .fake_quant import FP_BITS, aligned_grid, check_bits, round_ste
from .quantizers import ActQuantizer, WeightQuantizer


def float32_under_autocast(x):
    """``x`` as float32 when autocast is on for its device and ``x`` is half precision, else ``x`` itself.

    Under mixed precision a layer's input arrives in float16/bfloat16; quantization grids and feature statistics
    are computed in float32. A network that is half precision throughout (no autocast) stays as it is.
    """
    if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
        return x.float()
    return x


class QuantizedLayerMixin:
    """Shared machinery: quantize the input activation and the weight before the FP operation."""

    #: Dimension that holds the channels of the layer's input (conv: 1 of NCHW; linear: last).
    channel_dim = 1

    def _setup_quantizers(self, w_bits, a_bits, act_options=None, weight_options=None):
        self.w_bits = check_bits(w_bits, 'w_bits')
        self.a_bits = check_bits(a_bits, 'a_bits')
        self.act_quant = None if self.a_bits == FP_BITS else ActQuantizer(self.a_bits, **(act_options or {}))
        self.weight_quant = None if self.w_bits == FP_BITS else WeightQuantizer(self.w_bits, **(weight_options or {}))
        self.offset = None
        self.out_quant = None

    def attach_output_quantizer(self, bits=8, learnable=True):
        """Quantize this layer's output too, on a zero-aligned grid that contains 0 (``bits`` levels, range
        statistic per :func:`~odm_basicsr.quant.quantizers.default_act_init`, min-max at 8 bits).

        An integer kernel (onnxruntime's ``QLinearConv``) needs its output requantized; a layer whose output feeds
        a float operation (a residual addition, a LeakyReLU) runs as an integer conv only with this quantizer,
        and training with it trains the network the way it will run. Returns the quantizer.
        """
        ref = self.weight
        self.out_quant = ActQuantizer(bits, learnable=learnable, grid='aligned', include_zero=True).to(ref.device)
        return self.out_quant

    def quantize_output(self, y):
        """``y`` through the output quantizer (in float32 under autocast), or ``y`` itself without one."""
        return y if self.out_quant is None else self.out_quant(float32_under_autocast(y))

    def quantize_input(self, x):
        """The activation the FP operation sees.

        Without offset ``q(x)``; with a shift offset ``q(x - delta) + delta`` (``q(x - delta)`` once folded); with
        a scale offset ``q(x / rho)``, the scale being applied to the weight (see ``quant/offsets.py``).
        """
        return self._through_quantizer(x, effective=False)

    def effective_input(self, x):
        """What the FP operation effectively sees, in the units of ``x``: ``q(x)``, ``q(x - delta) + delta`` with a
        shift offset, ``rho * q(x / rho)`` with a scale offset (folded or not). The target of ``MismatchLoss``."""
        return self._through_quantizer(x, effective=True)

    def _through_quantizer(self, x, effective):
        x = float32_under_autocast(x)  # the grid arithmetic in float32; the operation itself autocasts
        offset = self.offset
        if offset is not None:
            x = offset.normalize(x, self.channel_dim)
        if self.act_quant is not None:
            x = self.act_quant(x)
        if offset is not None:
            x = offset.restore(x, self.channel_dim) if effective else offset.denormalize(x, self.channel_dim)
        return x

    def quantized_weight(self):
        """``Q_w(W)``, or ``Q_w(W * rho)`` (input channel ``c`` times ``rho_c``) with an unfolded scale offset."""
        w = self.weight if self.offset is None else self.offset.scale_weight(self.weight)
        return w if self.weight_quant is None else self.weight_quant(w)

    def quantized_bias(self):
        """The bias as the integer kernel adds it: int32 codes on the scale ``step_in * unit_w`` (rounded, gradient
        straight through), when the input grid is zero-aligned and weights and inputs are quantized; else the bias.

        Call it after :meth:`quantized_weight` (it reads the weight unit that call leaves). A shift offset that is
        not folded keeps the float bias: its output side joins the bias only when deployed.
        """
        aq, wq, bias = self.act_quant, self.weight_quant, self.bias
        if (bias is None or aq is None or wq is None or aq.grid != 'aligned' or aq.calibrating
                or not aq.is_initialized or not wq.enabled
                or (self.offset is not None and self.offset.kind == 'shift' and not self.offset.is_folded)):
            return bias
        lower, upper = aq.bounds()
        step, _ = aligned_grid(lower.float(), upper.float(), aq.bits, aq.include_zero)
        scale = (step.detach() * wq.last_unit.float()).reshape(-1)
        return (round_ste(bias.float() / scale) * scale).to(bias.dtype)

    def extra_repr(self):
        out = '' if self.out_quant is None else f', out_bits={self.out_quant.bits}'
        return super().extra_repr() + f', w_bits={self.w_bits}, a_bits={self.a_bits}{out}'

    @classmethod
    def from_float(cls, module, w_bits, a_bits, act_options=None, weight_options=None):
        """Build the quantized twin of ``module``, sharing its weight and bias tensors."""
        raise NotImplementedError

    def _finish_from_float(self, module, w_bits, a_bits, act_options, weight_options):
        self.weight = module.weight
        self.bias = module.bias
        self._setup_quantizers(w_bits, a_bits, act_options, weight_options)
        self.train(module.training)
        return self


class QConv2d(QuantizedLayerMixin, nn.Conv2d):
    """``nn.Conv2d`` that quantizes its input activation (``a_bits``) and weight (``w_bits``)."""

    channel_dim = 1

    def __init__(self, *args, w_bits=4, a_bits=4, act_options=None, weight_options=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_quantizers(w_bits, a_bits, act_options, weight_options)

    @classmethod
    def from_float(cls, module, w_bits, a_bits, act_options=None, weight_options=None):
        q = cls.__new__(cls)
        nn.Conv2d.__init__(
            q, module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
            padding=module.padding, dilation=module.dilation, groups=module.groups, bias=module.bias is not None,
            padding_mode=module.padding_mode, device=module.weight.device, dtype=module.weight.dtype)
        return q._finish_from_float(module, w_bits, a_bits, act_options, weight_options)

    def forward(self, x):
        weight = self.quantized_weight()
        return self.quantize_output(self._conv_forward(self.quantize_input(x), weight, self.quantized_bias()))


class QLinear(QuantizedLayerMixin, nn.Linear):
    """``nn.Linear`` that quantizes its input activation (``a_bits``) and weight (``w_bits``)."""

    channel_dim = -1

    def __init__(self, *args, w_bits=4, a_bits=4, act_options=None, weight_options=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_quantizers(w_bits, a_bits, act_options, weight_options)

    @classmethod
    def from_float(cls, module, w_bits, a_bits, act_options=None, weight_options=None):
        q = cls.__new__(cls)
        nn.Linear.__init__(
            q, module.in_features, module.out_features, bias=module.bias is not None, device=module.weight.device,
            dtype=module.weight.dtype)
        return q._finish_from_float(module, w_bits, a_bits, act_options, weight_options)

    def forward(self, x):
        weight = self.quantized_weight()
        return self.quantize_output(F.linear(self.quantize_input(x), weight, self.quantized_bias()))


QUANTIZABLE_TYPES = {nn.Conv2d: QConv2d, nn.Linear: QLinear}
QUANTIZED_TYPES = (QConv2d, QLinear)
