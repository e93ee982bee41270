"""Activation and weight quantizers (METHOD.md section 3)."""
import math

import torch
import torch.distributed as dist
from torch import nn

from .fake_quant import FP_BITS, check_bits, fake_quantize

ACT_INIT_METHODS = ('percentile', 'minmax')
WEIGHT_RANGE_METHODS = ('maxabs', 'percentile')
WEIGHT_GRANULARITIES = ('layer', 'channel')


def _check_choice(value, choices, name):
    if value not in choices:
        raise ValueError(f'{name} must be one of {list(choices)}, got {value!r}')
    return value


def _check_percentile(value, name):
    if not isinstance(value, (int, float)) or not 50.0 < float(value) <= 100.0:
        raise ValueError(f'{name} must be a number in (50, 100], got {value!r}')
    return float(value)


def percentile(x, q, dim=None):
    """The ``q``-th percentile (0-100) of ``x``, over all elements or along ``dim``.

    Uses ``kthvalue``, which unlike ``torch.quantile`` has no input size limit (feature maps of SR networks exceed
    it easily). Nearest-rank definition.
    """
    if dim is None:
        x = x.reshape(-1)
        dim = 0
    n = x.shape[dim]
    k = min(max(int(math.ceil(q / 100.0 * n)), 1), n)
    return x.float().kthvalue(k, dim=dim).values


def _all_reduce_mean(t):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


class ActQuantizer(nn.Module):
    """Activation quantizer with one static, learnable range ``[lower, upper]`` per layer.

    The bounds are stored as ``raw * range_scale``, where ``range_scale`` is fixed at initialisation to the
    magnitude of the calibrated range. Optimisers such as Adam move a parameter by about ``lr`` per step whatever
    its gradient scale; storing raw bounds of order 1 lets a range of about 70 (EDSR's 0-255 features) move by
    ``lr * 70`` per step instead of ``lr``, i.e. as fast relative to its size as a range of order 1 would.

    The range is initialised from data, either by :func:`calibration` over several batches (the mean of each
    batch's statistics) or, when a network is used before calibration, from the first batch it sees.

    Args:
        bits (int): 2 to 8. (Use no quantizer at all for 32.)
        init (str): ``'percentile'`` (lower/upper = the ``100 - p`` and ``p`` percentiles) or ``'minmax'``.
            Default: 'percentile'.
        init_percentile (float): ``p`` for ``init='percentile'``. Default: 99.
        learnable (bool): Whether the bounds receive gradients. Default: True.
    """

    def __init__(self, bits=4, init='percentile', init_percentile=99.0, learnable=True):
        super().__init__()
        self.bits = check_bits(bits, 'a_bits')
        if self.bits == FP_BITS:
            raise ValueError('ActQuantizer needs 2..8 bits; leave the layer unquantized for 32')
        self.init = _check_choice(init, ACT_INIT_METHODS, 'act_init')
        self.init_percentile = _check_percentile(init_percentile, 'act_percentile')
        self.lower_raw = nn.Parameter(torch.tensor(0.0), requires_grad=learnable)
        self.upper_raw = nn.Parameter(torch.tensor(1.0), requires_grad=learnable)
        self.register_buffer('range_scale', torch.tensor(1.0))
        self.register_buffer('initialized', torch.tensor(False))
        self.calibrating = False
        self._calib_stats = []

    @property
    def lower(self):
        return self.lower_raw * self.range_scale

    @property
    def upper(self):
        return self.upper_raw * self.range_scale

    def extra_repr(self):
        return f'bits={self.bits}, init={self.init}, lower={self.lower.item():.4g}, upper={self.upper.item():.4g}'

    @torch.no_grad()
    def batch_range(self, x):
        """(lower, upper) statistics of one batch, as a float32 tensor of shape (2,)."""
        x = x.detach()
        if self.init == 'minmax':
            return torch.stack([x.min().float(), x.max().float()])
        p = self.init_percentile
        return torch.stack([percentile(x, 100.0 - p), percentile(x, p)])

    @torch.no_grad()
    def set_range(self, lower, upper):
        """Set the bounds (floats or 0-d tensors) and mark the quantizer initialised."""
        lower, upper = float(lower), float(upper)
        scale = max(abs(lower), abs(upper), 1e-6)
        if upper - lower < 1e-3 * scale:  # a constant input: give the range a width
            upper = lower + 1e-3 * scale
        self.range_scale.fill_(scale)
        self.lower_raw.fill_(lower / scale)
        self.upper_raw.fill_(upper / scale)
        self.initialized.fill_(True)

    def start_calibration(self):
        self.calibrating = True
        self._calib_stats = []

    @torch.no_grad()
    def finish_calibration(self):
        """Average the recorded batch statistics (over batches and ranks) into the range."""
        self.calibrating = False
        if not self._calib_stats:
            return
        stats = _all_reduce_mean(torch.stack(self._calib_stats).mean(0).to(self.range_scale.device))
        self._calib_stats = []
        self.set_range(stats[0], stats[1])

    def forward(self, x):
        if self.calibrating:  # calibration sees the FP network
            self._calib_stats.append(self.batch_range(x))
            return x
        if not self.initialized:
            stats = _all_reduce_mean(self.batch_range(x).to(self.range_scale.device))
            self.set_range(stats[0], stats[1])
        lower = self.lower
        upper = torch.maximum(self.upper, lower + 1e-6 * self.range_scale)
        return fake_quantize(x, lower, upper, self.bits)


class WeightQuantizer(nn.Module):
    """Symmetric weight quantizer ``[-u, u]``, ``u`` recomputed from the current weights at every call.

    ``u`` is max |W| or a percentile of |W|, per layer or per output channel (dim 0). With ``clip_correction``
    (the 2024 version's weight clipping correction) ``u = percentile(|W|) * gamma`` with one learnable
    ``gamma`` per layer, initialised to 1. The range itself is not differentiated w.r.t. the weights.

    Args:
        bits (int): 2 to 8.
        granularity (str): ``'layer'`` or ``'channel'``. Default: 'layer'.
        range_method (str): ``'maxabs'`` or ``'percentile'``. Default: 'maxabs'.
        percentile (float): Percentile of |W| for ``'percentile'`` and for clip correction. Default: 99.
        clip_correction (bool): Learnable per-layer factor on the range. Default: False.
    """

    def __init__(self, bits=4, granularity='layer', range_method='maxabs', percentile=99.0, clip_correction=False):
        super().__init__()
        self.bits = check_bits(bits, 'w_bits')
        if self.bits == FP_BITS:
            raise ValueError('WeightQuantizer needs 2..8 bits; leave the layer unquantized for 32')
        self.granularity = _check_choice(granularity, WEIGHT_GRANULARITIES, 'weight_granularity')
        self.range_method = _check_choice(range_method, WEIGHT_RANGE_METHODS, 'weight_range')
        self.percentile = _check_percentile(percentile, 'weight_percentile')
        self.clip_correction = bool(clip_correction)
        if self.clip_correction:
            self.gamma = nn.Parameter(torch.tensor(1.0))

    def extra_repr(self):
        s = f'bits={self.bits}, granularity={self.granularity}, range={self.range_method}'
        return s + (', clip_correction=True' if self.clip_correction else '')

    @torch.no_grad()
    def weight_range(self, w):
        """Range ``u`` (without ``gamma``): shape () per layer, (out_channels, 1, ...) per channel."""
        a = w.detach().abs()
        use_percentile = self.range_method == 'percentile' or self.clip_correction
        if self.granularity == 'layer':
            u = percentile(a, self.percentile) if use_percentile else a.max().float()
        else:
            flat = a.reshape(a.shape[0], -1)
            u = percentile(flat, self.percentile, dim=1) if use_percentile else flat.max(dim=1).values.float()
            u = u.reshape(-1, *([1] * (w.dim() - 1)))
        return u.clamp_min(1e-8).to(w.dtype)

    def forward(self, w):
        u = self.weight_range(w)
        if self.clip_correction:
            u = u * self.gamma.abs().to(w.dtype)
        return fake_quantize(w, -u, u, self.bits)
