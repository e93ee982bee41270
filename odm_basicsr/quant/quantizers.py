"""Activation and weight quantizers (METHOD.md section 3)."""
import math

import torch
import torch.distributed as dist
from torch import nn

from .fake_quant import FP_BITS, aligned_grid, check_bits, fake_quantize, fake_quantize_aligned, round_ste

ACT_INIT_METHODS = ('auto', 'percentile', 'minmax', 'mse')
WEIGHT_RANGE_METHODS = ('auto', 'maxabs', 'percentile', 'mse')


def default_act_init(bits):
    """The activation range statistic chosen per bit width by measurement (README, "Calibration on a trained
    network": published RLFN, FP calibration, no training, Set5/Set14): min-max at 6-8 bits (MSE and percentiles
    clip outliers an SR network needs: +0.02 / +1.4 dB Set5 over them at 8, +1.0 over percentiles at 6),
    percentiles at 4-5 bits (+0.7 dB over MSE at 4; 5 bits not measured), MSE at 2-3 bits (+1.3 dB over
    percentiles at 3, +2.4 at 2)."""
    return 'minmax' if bits >= 6 else 'percentile' if bits >= 4 else 'mse'


def default_weight_range(bits, clip_correction=False):
    """The per-layer weight range chosen per bit width by measurement (same study): the 2024 percentile with clip
    correction; else MSE at 2 bits (+6.6 dB Set5 over percentiles, +20 over max |W|) and at 6-8 bits (+0.04 over
    max |W| at 8), percentiles at 3-5 bits (+0.6 dB over MSE at 4, +2.3 at 3; 5 bits not measured)."""
    if clip_correction:
        return 'percentile'
    return 'percentile' if 3 <= bits <= 5 else 'mse'
#: Candidate clipping fractions of the MSE range search (of max |x| for weights, of min / max for activations).
MSE_FRACTIONS = 48
#: Activation elements the MSE search looks at per batch (a strided subsample of larger inputs).
MSE_MAX_ELEMENTS = 1 << 15
WEIGHT_GRANULARITIES = ('layer', 'channel')
#: Activation grids: ``free`` (``2**b`` levels spanning exactly ``[lower, upper]``) or ``aligned`` (the same step, moved
#: by less than half a step so that 0 is on the grid: an integer zero point, as integer kernels need).
ACT_GRIDS = ('free', 'aligned')
#: Weight grids on ``[-u, u]``: ``midrise`` (``2**b`` levels, no zero level: +-u/3 and +-u at 2 bits) or ``midtread``
#: (``2**b - 1`` levels with a zero level: -u, 0, u at 2 bits).
WEIGHT_GRIDS = ('midrise', 'midtread')


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


def _quant_error(x, lower, upper, bits):
    """Sum of squared fake-quantization errors of ``x`` for each candidate range.

    Args:
        x (Tensor): Shape (..., N): the values, float32.
        lower, upper (Tensor): Candidate bounds, shape (K, ...) broadcastable against ``x`` with a new leading
            dim K (e.g. (K, 1) for x of shape (N,), (K, C, 1) for x of shape (C, N)).
        bits (int): Bit width.

    Returns:
        Tensor: Shape (K, ...): the error per candidate (and channel).
    """
    step = (upper - lower) / (2**bits - 1)
    q = torch.round((torch.minimum(torch.maximum(x, lower), upper) - lower) / step) * step + lower
    return (q - x).square().sum(-1)


def _fraction_grid(fractions, device, centre=None):
    """``fractions`` clipping fractions: evenly spaced in (0, 1], or (refinement) within one coarse step of
    ``centre`` (any shape; the grid gets a new leading dim)."""
    f = torch.linspace(1.0 / fractions, 1.0, fractions, device=device)
    if centre is None:
        return f
    fine = torch.linspace(-1.0 / fractions, 1.0 / fractions, fractions, device=device)
    return (centre.unsqueeze(0) + fine.view(-1, *([1] * centre.dim()))).clamp(1e-4, 1.0)


def _symmetric_error(a, u, bits, grid):
    """:func:`_quant_error` of the symmetric range ``[-u, u]`` on the ``midrise`` or ``midtread`` grid."""
    if grid == 'midtread':
        m = 2**(bits - 1) - 1
        step = u / m
        return (torch.clamp(torch.round(a / step), -m, m) * step - a).square().sum(-1)
    return _quant_error(a, -u, u, bits)


@torch.no_grad()
def mse_symmetric_range(a, bits, fractions=MSE_FRACTIONS, grid='midrise'):
    """The ``u`` of the symmetric range ``[-u, u]`` minimising the quantization MSE of ``a``, per row.

    Searches ``u = f * max|a|`` over ``fractions`` values of ``f`` evenly spaced in (0, 1], then over
    ``fractions`` values within one step of the best (so the resolution is about ``1 / fractions**2``).

    Args:
        a (Tensor): Shape (C, N): C independent rows (one per layer or per output channel).
        bits (int): Bit width.
        grid (str): ``'midrise'`` or ``'midtread'`` (see :class:`WeightQuantizer`). Default: 'midrise'.

    Returns:
        Tensor: Shape (C,), float32.
    """
    a = a.float()
    top = a.abs().amax(dim=1).clamp_min(1e-12)  # (C,)
    best = None
    for _ in range(2):  # coarse, then fine around the best
        f = _fraction_grid(fractions, a.device, best)
        if best is None:
            f = f.view(-1, 1).expand(-1, a.shape[0])  # (K, C)
        u = (f * top).unsqueeze(-1)  # (K, C, 1)
        err = _symmetric_error(a.unsqueeze(0), u, bits, grid)  # (K, C)
        best = f.gather(0, err.argmin(0, keepdim=True)).squeeze(0)  # (C,)
    return best * top


@torch.no_grad()
def mse_range(x, bits, fractions=MSE_FRACTIONS, rounds=2, max_elements=MSE_MAX_ELEMENTS):
    """(lower, upper) minimising the quantization MSE of ``x`` on ``2**bits`` levels.

    Coordinate descent from ``[min, max]``: ``rounds`` times, ``upper = f * max`` then ``lower = f * min``, each
    chosen with the other bound fixed by a coarse search over ``fractions`` values of ``f`` in (0, 1] and a fine
    one within a coarse step of the best. A non-negative input keeps ``lower = min`` (0 exactly after a ReLU).
    Inputs larger than ``max_elements`` are subsampled with a fixed stride (deterministic); the search bounds are
    the full input's min and max.

    Returns:
        Tensor: Shape (2,), float32.
    """
    flat = x.detach().reshape(-1).float()
    lo, hi = flat.min(), flat.max()
    if flat.numel() > max_elements:
        flat = flat[::-(-flat.numel() // max_elements)]
    gap = 1e-6 * (hi - lo).abs().clamp_min(1e-12)
    lower, upper = lo.clone(), hi.clone()

    def search(bound, other, is_upper):
        best = None
        for _ in range(2):  # coarse, then fine around the best
            f = _fraction_grid(fractions, flat.device, best).view(-1, 1)
            cand = (f * bound).clamp_min(other + gap) if is_upper else (f * bound).clamp_max(other - gap)
            err = _quant_error(flat, lower if is_upper else cand, cand if is_upper else upper, bits)
            best = f[err.argmin()].view(())
        return (best * bound).clamp_min(other + gap) if is_upper else (best * bound).clamp_max(other - gap)

    for _ in range(rounds):
        if hi > 0:
            upper = search(hi, lower, True)
        if lo < 0:
            lower = search(lo, upper, False)
    return torch.stack([lower, upper])


def _all_reduce_mean(t):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


#: A calibrated activation range within ``[-ZERO_INPUT_LIMIT, ZERO_INPUT_LIMIT]`` means the input was zero.
ZERO_INPUT_LIMIT = 1e-6


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
        init (str): ``'percentile'`` (lower/upper = the ``100 - p`` and ``p`` percentiles), ``'minmax'`` or
            ``'mse'`` (the range minimising the quantization MSE at ``bits``, :func:`mse_range`), or ``'auto'``:
            :func:`default_act_init` of ``bits``. Default: 'auto'.
        init_percentile (float): ``p`` for ``init='percentile'``. Default: 99.
        learnable (bool): Whether the bounds receive gradients. Default: True.
        grid (str): ``'free'`` (``2**bits`` levels from ``lower`` to ``upper``) or ``'aligned'`` (the grid of
            :func:`~odm_basicsr.quant.fake_quant.aligned_grid`: same step, 0 on the grid, integer zero point; what
            the deployed network computes). Default: 'free'.
        include_zero (bool): With ``grid='aligned'``, widen the range to contain 0 (output quantizers stored as
            uint8). Default: False.
    """

    def __init__(self, bits=4, init='auto', init_percentile=99.0, learnable=True, grid='free', include_zero=False):
        super().__init__()
        self.bits = check_bits(bits, 'a_bits')
        if self.bits == FP_BITS:
            raise ValueError('ActQuantizer needs 2..8 bits; leave the layer unquantized for 32')
        self.grid = _check_choice(grid, ACT_GRIDS, 'act_grid')
        self.include_zero = bool(include_zero)
        self.init = _check_choice(init, ACT_INIT_METHODS, 'act_init')
        if self.init == 'auto':
            self.init = default_act_init(self.bits)
        self.init_percentile = _check_percentile(init_percentile, 'act_percentile')
        self.lower_raw = nn.Parameter(torch.tensor(0.0), requires_grad=learnable)
        self.upper_raw = nn.Parameter(torch.tensor(1.0), requires_grad=learnable)
        self.register_buffer('range_scale', torch.tensor(1.0))
        self.register_buffer('initialized', torch.tensor(False))  # the state-dict truth
        self._initialized = False  # its Python mirror: forward reads this, no device sync per layer per step
        self.calibrating = False
        self._calib_stats = []

    @property
    def is_initialized(self):
        """bool: Whether the range has been set (by calibration, :meth:`set_range`, a loaded state dict or the
        first batch). Read without a device sync; the ``initialized`` buffer holds the same value for the state
        dict. Change it with :meth:`set_initialized` (or :meth:`set_range`), never by writing the buffer."""
        return self._initialized

    def set_initialized(self, value=True):
        """Mark the range set (True) or to be set again from data (False: by the next calibration, or else the
        first batch the quantizer sees). Keeps the buffer and its mirror equal."""
        self._initialized = bool(value)
        self.initialized.fill_(self._initialized)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)  # one sync per quantizer per load, not per step

    def __setstate__(self, state):
        super().__setstate__(state)
        if '_initialized' not in self.__dict__:  # a whole module pickled before the mirror existed
            self._initialized = bool(self.initialized)

    @property
    def lower(self):
        return self.lower_raw * self.range_scale

    @property
    def upper(self):
        return self.upper_raw * self.range_scale

    def extra_repr(self):
        return (f'bits={self.bits}, init={self.init}, grid={self.grid}, lower={self.lower.item():.4g}, '
                f'upper={self.upper.item():.4g}')

    def bounds(self):
        """``(lower, upper)`` as the forward pass uses them (``upper`` kept above ``lower``), 0-d tensors."""
        lower = self.lower
        return lower, torch.maximum(self.upper, lower + 1e-6 * self.range_scale)

    @torch.no_grad()
    def integer_grid(self):
        """The zero-aligned grid of this range: ``(step, low)`` with ``step`` a float32 0-d tensor and ``low`` an
        int; the codes are ``low .. low + 2**bits - 1``. On a ``free`` grid this is the nearest aligned grid (the
        range moved by less than half a step: what deploying a network trained on the free grid costs)."""
        lower, upper = self.bounds()
        step, low = aligned_grid(lower.float(), upper.float(), self.bits, self.include_zero)
        return step.detach().clone(), int(low)

    @torch.no_grad()
    def batch_range(self, x):
        """(lower, upper) statistics of one batch, as a float32 tensor of shape (2,)."""
        x = x.detach()
        if self.init == 'minmax':
            return torch.stack([x.min().float(), x.max().float()])
        if self.init == 'mse':
            return mse_range(x, self.bits)
        p = self.init_percentile
        return torch.stack([percentile(x, 100.0 - p), percentile(x, p)])

    @torch.no_grad()
    def set_range(self, lower, upper):
        """Set the bounds (floats or 0-d tensors) and mark the quantizer initialised. A range within
        ``+-ZERO_INPUT_LIMIT`` (an input that was zero) becomes ``[0, 1]``; a constant input gets a width of 1e-3 of
        its value."""
        lower, upper = float(lower), float(upper)
        if max(abs(lower), abs(upper)) < ZERO_INPUT_LIMIT:
            # zero on every calibration batch (a dead ReLU, a channel attention that never fires): no scale to go
            # by, so the unit range (onnxruntime's quantizer falls back to a unit step too). A range ~1e-9 wide
            # would clip any later input to nothing and need int32 bias codes of ~1e11 in the integer conv.
            lower, upper = 0.0, 1.0
        scale = max(abs(lower), abs(upper))
        if upper - lower < 1e-3 * scale:  # a constant input: give the range a width
            upper = lower + 1e-3 * scale
        self.range_scale.fill_(scale)
        self.lower_raw.fill_(lower / scale)
        self.upper_raw.fill_(upper / scale)
        self.set_initialized(True)

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
        if self.calibrating:  # record and pass through: what the next layers see is set by calibration()
            self._calib_stats.append(self.batch_range(x))
            return x
        if not self._initialized:  # the mirror: `not self.initialized` would sync with the device every step
            stats = _all_reduce_mean(self.batch_range(x).to(self.range_scale.device))
            self.set_range(stats[0], stats[1])
        lower, upper = self.bounds()
        if self.grid == 'aligned':
            return fake_quantize_aligned(x, lower, upper, self.bits, self.include_zero)
        return fake_quantize(x, lower, upper, self.bits)


class WeightQuantizer(nn.Module):
    """Symmetric weight quantizer ``[-u, u]``, ``u`` recomputed from the current weights at every call.

    ``u`` is max |W|, a percentile of |W|, or the ``u`` minimising the quantization MSE of ``W`` at ``bits``
    (:func:`mse_symmetric_range`), per layer or per output channel (dim 0). With ``clip_correction`` (the 2024
    version's weight clipping correction) ``u = u(W) * gamma`` with one learnable ``gamma`` per layer,
    initialised to 1; ``range_method=None`` then means the 2024 version's percentile. The range itself is not
    differentiated w.r.t. the weights. ``enabled = False`` (set by FP calibration) passes the weight through.

    Args:
        bits (int): 2 to 8.
        granularity (str): ``'layer'`` or ``'channel'``. Default: 'layer'.
        range_method (str | None): ``'maxabs'``, ``'percentile'`` or ``'mse'``; ``'auto'`` or None:
            :func:`default_weight_range` of ``bits`` (the 2024 percentile with clip correction). Default: None.
        percentile (float): Percentile of |W| for ``'percentile'``. Default: 99.
        clip_correction (bool): Learnable per-layer factor on the range. Default: False.
        grid (str): ``'midrise'`` (``2**bits`` levels on ``[-u, u]``, no zero level; integer codes are the odd
            numbers ``-(2**bits - 1) .. 2**bits - 1`` times ``u / (2**bits - 1)``) or ``'midtread'`` (``2**bits - 1``
            levels with zero: codes ``-m .. m`` times ``u / m``, ``m = 2**(bits - 1) - 1``). Default: 'midrise'.
    """

    def __init__(self, bits=4, granularity='layer', range_method=None, percentile=99.0, clip_correction=False,
                 grid='midrise'):
        super().__init__()
        self.bits = check_bits(bits, 'w_bits')
        if self.bits == FP_BITS:
            raise ValueError('WeightQuantizer needs 2..8 bits; leave the layer unquantized for 32')
        self.grid = _check_choice(grid, WEIGHT_GRIDS, 'weight_grid')
        self.granularity = _check_choice(granularity, WEIGHT_GRANULARITIES, 'weight_granularity')
        self.clip_correction = bool(clip_correction)
        self.range_method = _check_choice('auto' if range_method is None else range_method, WEIGHT_RANGE_METHODS,
                                          'weight_range')
        if self.range_method == 'auto':
            self.range_method = default_weight_range(self.bits, self.clip_correction)
        self.percentile = _check_percentile(percentile, 'weight_percentile')
        self.enabled = True
        if self.clip_correction:
            self.gamma = nn.Parameter(torch.tensor(1.0))

    def extra_repr(self):
        s = f'bits={self.bits}, granularity={self.granularity}, range={self.range_method}, grid={self.grid}'
        return s + (', clip_correction=True' if self.clip_correction else '')

    @property
    def max_code(self):
        """int: The largest integer code: ``2**bits - 1`` (midrise, odd codes) or ``2**(bits - 1) - 1`` (midtread)."""
        return 2**self.bits - 1 if self.grid == 'midrise' else 2**(self.bits - 1) - 1

    def _range(self, w):
        u = self.weight_range(w)
        return u * self.gamma.abs().to(w.dtype) if self.clip_correction else u

    @torch.no_grad()
    def weight_range(self, w):
        """Range ``u`` (without ``gamma``): shape () per layer, (out_channels, 1, ...) per channel."""
        a = w.detach().abs()
        rows = a.reshape(1, -1) if self.granularity == 'layer' else a.reshape(a.shape[0], -1)
        if self.range_method == 'percentile':
            u = percentile(rows, self.percentile, dim=1)
        elif self.range_method == 'mse':
            u = mse_symmetric_range(rows, self.bits, grid=self.grid)
        else:
            u = rows.amax(dim=1).float()
        u = u.reshape(()) if self.granularity == 'layer' else u.reshape(-1, *([1] * (w.dim() - 1)))
        return u.clamp_min(1e-8).to(w.dtype)

    def forward(self, w):
        return self._quantize(w) if self.enabled else w

    def _quantize(self, w):
        u = self._range(w)
        # the unit of the integer codes, per output channel or per layer: the bias's int32 grid needs it
        self.last_unit = (u / self.max_code).detach()
        if self.grid == 'midtread':
            m = self.max_code
            return torch.clamp(round_ste(w / (u / m)), -m, m) * (u / m)
        return fake_quantize(w, -u, u, self.bits)

    @torch.no_grad()
    def integer_codes(self, w):
        """The quantized weight as integer codes times a per-output-channel unit: ``Q(w) = codes * unit``.

        Args:
            w (Tensor): The weight, (out_channels, ...).

        Returns:
            tuple[Tensor, Tensor]: ``codes`` (same shape as ``w``, int32, ``|codes| <= max_code``; odd on the
            midrise grid) and ``unit`` ((out_channels,), float32).
        """
        u = self._range(w).float()
        unit = (u / self.max_code).reshape(-1).expand(w.shape[0]).contiguous()
        q = self._quantize(w).float()
        codes = torch.round(q / unit.view(-1, *([1] * (w.dim() - 1))))
        return codes.clamp(-self.max_code, self.max_code).to(torch.int32), unit
