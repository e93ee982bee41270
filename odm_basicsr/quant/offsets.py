"""Distribution offsets (METHOD.md section 4.3): per-channel shift or scale before the activation quantizer.

Pipeline:

1. Measure, per quantized layer, the per-channel mean ``mu_c`` and standard deviation ``sigma_c`` of its input
   (:func:`channel_statistics` / :func:`collect_channel_stats`, accumulated in float64 by :class:`ChannelStats`).
   Run it inside :func:`~odm_basicsr.quant.calibration.calibration` to measure with pass-through activation
   quantizers (the hooks here only read; they never quantize or change an output).
2. Score the mismatch of each layer (:func:`mismatch_scores`): shift ``std_c(mu_c) / mean_c(sigma_c)`` and scale
   ``std_c(sigma_c) / mean_c(sigma_c)``.
3. Select layers by top-k fraction or threshold, each with the kind of its larger score
   (:func:`select_offset_layers`), and attach initialised :class:`DistributionOffset` modules
   (:func:`attach_offsets`). Then calibrate the activation ranges again: the quantizer now sees the normalised
   input.

Forms (``x``: the layer input, channels along the layer's ``channel_dim``; ``q``: the layer's activation quantizer,
one static range per layer; ``Q_w``: the weight quantizer; ``op``: the convolution / linear map)::

    shift:  op(q(x - delta) + delta, Q_w(W))      delta (C,) learnable, init mu_c
    scale:  op(q(x / rho),            Q_w(W * rho))  rho (C,) learnable, init sigma_c / mean_c(sigma_c)

``W * rho`` multiplies input channel ``c`` of the weight by ``rho_c`` *before* weight quantization, so the
scale is part of the quantized weight and folding it is exact. (METHOD.md writes the scale as
``rho * q(x / rho)`` on the activation side. ``op`` is linear in each input channel, so the two forms are the same
function when the weights are FP; with quantized weights they differ in what is quantized, ``Q_w(W * rho)`` here
versus ``Q_w(W)`` there, and only the form used here folds into a quantized weight exactly.) ``rho`` is initialised
*relative* to the mean channel scale, so the normalised input keeps the units of ``x`` and the calibrated range
stays comparable; it is clamped to at least ``min_rho`` (default 1e-2) at initialisation and to at least 1e-6 in
the forward pass, so a dead channel (``sigma_c = 0``) never divides by zero.

Cost before folding (training form), per offset layer with ``C`` input channels:

- ``C`` parameters (``delta`` or ``rho``);
- shift: 2 FP operations per input element (subtract before ``q``, add after it);
- scale: 1 FP operation per input element (divide) plus one multiply per weight element per forward pass
  (``W * rho``); in METHOD.md's activation-side form this is the second operation per input element.

Folding (:func:`fold_offsets`, for deployment) bakes the *output* side into the layer parameters:

- scale: ``weight[:, c] *= rho_c`` -- exact (the same product the unfolded layer computes, so the folded layer
  gives bit-identical outputs);
- shift: ``bias[o] += sum_{c, kh, kw} Q_w(W)[o, c, kh, kw] * delta_c`` (a zero bias is created when the layer
  has none). Exact for linear layers and for convolutions with ``padding_mode`` reflect / replicate / circular or no
  padding. With zero padding it is exact away from the border only: the unfolded layer pads
  ``q(x - delta) + delta`` with zeros, the folded one pads ``q(x - delta)`` with zeros and adds the full
  ``Q_w(W) . delta`` through the bias, so outputs whose window touches the padding differ by the taps that fall
  on it.

What remains after folding is the *input* side: a per-channel affine map before the quantizer (``x - delta``
or ``x / rho``), i.e. ``C`` parameters and 1 FP operation per input element -- equivalently a per-channel static
zero-point (shift) or step (scale) of the activation quantizer. The folded state is stored in the buffer
``<layer>.offset.folded``, so a reloaded folded checkpoint (weights, bias and offset) behaves the same. Folding is
a deployment step: the folded output side is not updated if the layer is trained further.

State-dict keys: ``<layer>.offset.delta`` or ``<layer>.offset.rho``, and ``<layer>.offset.folded``. Use
:func:`ensure_offsets_from_state` before loading a checkpoint into a freshly built network, and
:func:`ensure_offsets_like` for a copy such as BasicSR's EMA network.

Plain PyTorch: no BasicSR import.
"""
import math
import re
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from .layer_selection import quantized_layers
from .layers import QUANTIZED_TYPES

OFFSET_KINDS = ('shift', 'scale')
SELECT_MODES = ('topk', 'threshold')
KIND_CHOICES = ('auto',) + OFFSET_KINDS
#: Smallest ``rho`` used in the forward pass (guards division by zero if training drives ``rho`` to 0 or below).
RHO_EPS = 1e-6
#: Default lower clamp of the initial relative scale ``sigma_c / mean_c(sigma_c)``.
MIN_RHO = 1e-2
_SCORE_EPS = 1e-12
_STATE_KEY = re.compile(r'^(?:(.*)\.)?offset\.(delta|rho)$')


# ---------------------------------------------------------------------------------------------------------------
# Channel statistics
# ---------------------------------------------------------------------------------------------------------------

class ChannelStats:
    """Running per-channel sum, sum of squares and count of a feature, in float64.

    Args:
        num_channels (int | None): Number of channels; ``None`` takes it from the first :meth:`update`.
            Give it (and ``device``) when the statistics are all-reduced, so every rank holds tensors even if it
            saw no data. Default: None.
        device (torch.device | str | None): Device of the accumulators. Default: the first input's device.

    Attributes:
        sum (Tensor | None): (C,) float64, sum of the values of each channel.
        sum_sq (Tensor | None): (C,) float64, sum of their squares.
        count (Tensor | None): () float64, number of values per channel (the same for every channel).
    """

    def __init__(self, num_channels=None, device=None):
        self.sum = self.sum_sq = self.count = None
        if num_channels is not None:
            self._allocate(int(num_channels), device)

    def _allocate(self, num_channels, device):
        self.sum = torch.zeros(num_channels, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(num_channels, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    @property
    def num_channels(self):
        """int | None: Number of channels, once known."""
        return None if self.sum is None else self.sum.numel()

    @torch.no_grad()
    def update(self, x, channel_dim=1):
        """Add the values of ``x``, channel by channel, reducing over every other dimension.

        Args:
            x (Tensor): Any shape with at least one dimension, e.g. (B, C, H, W) or (B, N, C).
            channel_dim (int): Dimension of ``x`` that holds the channels. Default: 1.

        Returns:
            ChannelStats: ``self``.
        """
        if x.dim() == 0:
            raise ValueError('ChannelStats.update needs a tensor with a channel dimension, got a scalar')
        dim = channel_dim % x.dim()
        num_channels = x.shape[dim]
        if self.sum is None:
            self._allocate(num_channels, x.device)
        elif num_channels != self.num_channels:
            raise ValueError(f'ChannelStats: got {num_channels} channels along dim {channel_dim}, '
                             f'expected {self.num_channels}')
        xd = x.detach().to(device=self.sum.device, dtype=torch.float64)
        dims = [d for d in range(x.dim()) if d != dim]
        if dims:
            self.sum += xd.sum(dim=dims)
            self.sum_sq += (xd * xd).sum(dim=dims)
        else:
            self.sum += xd
            self.sum_sq += xd * xd
        self.count += x.numel() // num_channels if num_channels else 0
        return self

    def _check(self):
        if self.sum is None or float(self.count) == 0.0:
            raise ValueError('ChannelStats: no data recorded (did the layer run inside channel_statistics?)')

    def mean(self):
        """Per-channel mean, (C,) float64."""
        self._check()
        return self.sum / self.count

    def var(self):
        """Per-channel population variance, (C,) float64 (clamped at 0 against rounding)."""
        mean = self.mean()
        return (self.sum_sq / self.count - mean * mean).clamp_min(0.0)

    def std(self):
        """Per-channel population standard deviation, (C,) float64."""
        return self.var().sqrt()

    @torch.no_grad()
    def all_reduce_(self):
        """Sum the accumulators over all ranks (in place) when ``torch.distributed`` runs with world size > 1.

        Every rank must call it, with the same number of channels. Returns ``self``.
        """
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if self.sum is None:
                raise ValueError('ChannelStats.all_reduce_: the number of channels is unknown on this rank; '
                                 'create the statistics with num_channels=')
            buf = torch.cat([self.sum, self.sum_sq, self.count.reshape(1)])
            dist.all_reduce(buf)
            c = self.num_channels
            self.sum.copy_(buf[:c])
            self.sum_sq.copy_(buf[c:2 * c])
            self.count.copy_(buf[2 * c])
        return self

    def __repr__(self):
        count = None if self.count is None else int(self.count)
        return f'ChannelStats(num_channels={self.num_channels}, count={count})'


def _in_channels(layer):
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features


@contextmanager
def channel_statistics(model, layers=None):
    """Record the per-channel statistics of the input of every quantized layer of ``model``.

    Forward pre-hooks read the input (before any offset, activation quantizer or weight quantizer); nothing is
    quantized or changed by them, and forward passes inside the block run without gradients. On exit the
    statistics are summed over ranks under ``torch.distributed``. To measure the FP activations (METHOD.md 4.3)
    combine it with :func:`~odm_basicsr.quant.calibration.calibration`, whose activation quantizers pass their
    input through (weights stay fake-quantized unless ``w_bits`` is 32). The model's train/eval mode is left as
    it is (layers such as batch norm update their running statistics in train mode).

    Args:
        model (nn.Module): Network with quantized layers.
        layers (list[str] | None): Names of the layers to record; default: every quantized layer.

    Yields:
        dict[str, ChannelStats]: Layer name -> statistics, filled as the block runs forward passes.

    Example:
        >>> with calibration(net), channel_statistics(net) as stats:
        ...     for lq in batches:
        ...         net(lq)
    """
    modules = dict(quantized_layers(model))
    names = list(modules) if layers is None else list(layers)
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f'channel_statistics: {missing} are not quantized layers of {type(model).__name__}; '
                         f'quantized layers: {list(modules)}')
    stats, handles = {}, []
    for name in names:
        layer = modules[name]
        stats[name] = ChannelStats(_in_channels(layer), device=layer.weight.device)

        def hook(module, args, _stats=stats[name]):
            _stats.update(args[0], module.channel_dim)

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            yield stats
    finally:
        for h in handles:
            h.remove()
    for s in stats.values():
        s.all_reduce_()


def collect_channel_stats(model, batches, layers=None):
    """Run ``batches`` through ``model`` inside :func:`channel_statistics` and return the statistics.

    Args:
        model (nn.Module): Network with quantized layers.
        batches (Iterable[Tensor] | Callable[[nn.Module], Any]): Inputs, each run as ``model(batch)``, or a
            function that runs the forward passes itself (e.g. over BasicSR data dicts).
        layers (list[str] | None): As in :func:`channel_statistics`.

    Returns:
        dict[str, ChannelStats]: Layer name -> statistics.
    """
    with channel_statistics(model, layers) as stats:
        if callable(batches):
            batches(model)
        else:
            for batch in batches:
                model(batch)
    return stats


# ---------------------------------------------------------------------------------------------------------------
# Mismatch scores and layer selection
# ---------------------------------------------------------------------------------------------------------------

def channel_mismatch(mean, std):
    """Shift and scale mismatch of one layer from its per-channel means and standard deviations.

    ``shift = std_c(mean_c) / mean_c(std_c)``, ``scale = std_c(std_c) / mean_c(std_c)``, with population standard
    deviations over the channels. The denominator is clamped to 1e-12, so a layer whose channels are all constant
    gets a very large (finite) score if their means differ and 0 if they do not.

    Args:
        mean (Tensor): (C,) per-channel means.
        std (Tensor): (C,) per-channel standard deviations.

    Returns:
        dict[str, float]: ``{'shift': ..., 'scale': ...}``, both >= 0.
    """
    mean, std = mean.double(), std.double()
    denom = std.mean().clamp_min(_SCORE_EPS)
    return {'shift': float(mean.std(unbiased=False) / denom), 'scale': float(std.std(unbiased=False) / denom)}


def mismatch_scores(stats):
    """Mismatch scores of every layer.

    Args:
        stats (dict[str, ChannelStats]): From :func:`channel_statistics`.

    Returns:
        dict[str, dict[str, float]]: ``{layer: {'shift': float, 'scale': float}}``, in the order of ``stats``.
    """
    scores = {}
    for name, s in stats.items():
        try:
            scores[name] = channel_mismatch(s.mean(), s.std())
        except ValueError as e:
            raise ValueError(f'mismatch_scores: layer {name!r}: {e}') from None
    return scores


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def select_offset_layers(scores, select='topk', fraction=0.25, threshold=None, kind='auto'):
    """Choose the layers that get an offset, and its kind.

    Layers are ranked by ``max(shift, scale)`` whatever ``kind`` is, so forcing a kind changes only the kind,
    never the layer set (an ablation of the kinds compares the same layers).

    Args:
        scores (dict[str, dict[str, float]]): From :func:`mismatch_scores`.
        select (str): ``'topk'``: the ``ceil(fraction * n)`` layers with the largest score (ties keep the order of
            ``scores``); ``'threshold'``: the layers whose score is >= ``threshold``. Default: 'topk'.
        fraction (float): In [0, 1], used by ``'topk'``. Default: 0.25.
        threshold (float | None): >= 0, required by ``'threshold'`` (ignored by ``'topk'``). Default: None.
        kind (str): ``'auto'`` (per layer the kind with the larger score; ``'shift'`` on a tie), ``'shift'`` or
            ``'scale'``. Default: 'auto'.

    Returns:
        dict[str, str]: Layer name -> ``'shift'`` | ``'scale'``, in the order of ``scores``.

    Raises:
        ValueError: for an invalid option; the message names it.
    """
    if select not in SELECT_MODES:
        raise ValueError(f'select must be one of {list(SELECT_MODES)}, got {select!r}')
    if kind not in KIND_CHOICES:
        raise ValueError(f'kind must be one of {list(KIND_CHOICES)}, got {kind!r}')
    if select == 'topk' and not (_is_number(fraction) and 0.0 <= fraction <= 1.0):
        raise ValueError(f'fraction must be a number in [0, 1], got {fraction!r}')
    if select == 'threshold' and not (_is_number(threshold) and threshold >= 0.0):
        raise ValueError(f'threshold must be a number >= 0 when select is "threshold", got {threshold!r}')
    for name, s in scores.items():
        if not isinstance(s, dict) or not all(k in s for k in OFFSET_KINDS):
            raise ValueError(f'scores[{name!r}] must be a dict with "shift" and "scale", got {s!r}')
    names = list(scores)
    top = {n: max(scores[n]['shift'], scores[n]['scale']) for n in names}
    if select == 'topk':
        k = min(len(names), math.ceil(fraction * len(names) - 1e-9))  # 0.1 * 30 is 3.0000000000000004
        ranked = sorted(names, key=lambda n: -top[n])  # stable: ties keep their order
        chosen = set(ranked[:k])
    else:
        chosen = {n for n in names if top[n] >= threshold}
    selection = {}
    for n in names:
        if n in chosen:
            if kind == 'auto':
                selection[n] = 'shift' if scores[n]['shift'] >= scores[n]['scale'] else 'scale'
            else:
                selection[n] = kind
    return selection


# ---------------------------------------------------------------------------------------------------------------
# The offset module
# ---------------------------------------------------------------------------------------------------------------

def shift_init(mean):
    """Initial ``delta``: the per-channel mean ``mu_c``. (C,) -> (C,)."""
    return mean.clone()


def scale_init(std, min_rho=MIN_RHO):
    """Initial ``rho``: the relative channel scale ``sigma_c / mean_c(sigma_c)``, clamped to >= ``min_rho``.

    Relative, so that ``x / rho`` keeps the units of ``x`` (channels of average spread are left as they are).
    All-constant channels (``mean_c(sigma_c) = 0``) give ``rho = 1``.

    Args:
        std (Tensor): (C,) per-channel standard deviations.
        min_rho (float): Lower clamp, > 0. Default: 1e-2.

    Returns:
        Tensor: (C,), same dtype as ``std``.
    """
    if not (_is_number(min_rho) and min_rho > 0):
        raise ValueError(f'min_rho must be a number > 0, got {min_rho!r}')
    m = std.mean()
    if float(m) <= 0.0:
        return torch.ones_like(std)
    return (std / m).clamp_min(min_rho)


def _channel_view(v, ndim, dim):
    shape = [1] * ndim
    shape[dim % ndim] = -1
    return v.reshape(shape)


class DistributionOffset(nn.Module):
    """Learnable per-channel shift (``delta``) or scale (``rho``) of a quantized layer's input.

    The layer calls :meth:`normalize` before its activation quantizer, :meth:`denormalize` after it and
    :meth:`scale_weight` before its weight quantizer (see the module docstring for the forms and for folding).

    Args:
        num_channels (int): Input channels ``C`` of the layer.
        kind (str): ``'shift'`` or ``'scale'``.
        device (torch.device | None): Device of the parameter. Default: None (CPU).
        dtype (torch.dtype | None): Dtype of the parameter. Default: None (the default dtype).

    The parameter starts at the identity (``delta = 0`` / ``rho = 1``); see :meth:`init_from_stats`.
    """

    def __init__(self, num_channels, kind, device=None, dtype=None):
        super().__init__()
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f'num_channels must be a positive int, got {num_channels!r}')
        if kind not in OFFSET_KINDS:
            raise ValueError(f'offset kind must be one of {list(OFFSET_KINDS)}, got {kind!r}')
        self.kind = kind
        self.num_channels = num_channels
        if kind == 'shift':
            self.delta = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        else:
            self.rho = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
        self.register_buffer('folded', torch.tensor(False, device=device))
        self._folded = False  # Python mirror of the buffer: no device sync in forward

    @property
    def param(self):
        """The learnable tensor: ``delta`` or ``rho``."""
        return self.delta if self.kind == 'shift' else self.rho

    @property
    def is_folded(self):
        """bool: Whether the output side has been folded into the layer parameters."""
        return self._folded

    def set_folded(self, value=True):
        self._folded = bool(value)
        self.folded.fill_(self._folded)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._folded = bool(self.folded)

    def extra_repr(self):
        return f'{self.num_channels}, kind={self.kind}, folded={self._folded}'

    def effective_rho(self):
        """``rho`` clamped to >= 1e-6, as used in the forward pass. (C,)."""
        return self.rho.clamp_min(RHO_EPS)

    @torch.no_grad()
    def init_from_stats(self, mean, std, min_rho=MIN_RHO):
        """Initialise from the layer input's statistics: ``delta = mean`` or ``rho = scale_init(std, min_rho)``.

        Args:
            mean (Tensor): (C,) per-channel means.
            std (Tensor): (C,) per-channel standard deviations.
            min_rho (float): Lower clamp of ``rho``. Default: 1e-2.

        Returns:
            DistributionOffset: ``self``.
        """
        for t, what in ((mean, 'mean'), (std, 'std')):
            if t.numel() != self.num_channels:
                raise ValueError(f'{what} has {t.numel()} channels, the offset {self.num_channels}')
        p = self.param
        p.copy_((shift_init(mean) if self.kind == 'shift' else scale_init(std, min_rho)).to(p))
        return self

    def _check(self, x, channel_dim):
        if x.shape[channel_dim] != self.num_channels:
            raise ValueError(f'DistributionOffset: input has {x.shape[channel_dim]} channels along dim '
                             f'{channel_dim}, the offset {self.num_channels}')

    def normalize(self, x, channel_dim):
        """What the activation quantizer sees: ``x - delta`` or ``x / rho``, per channel along ``channel_dim``."""
        self._check(x, channel_dim)
        if self.kind == 'shift':
            return x - _channel_view(self.delta, x.dim(), channel_dim)
        return x / _channel_view(self.effective_rho(), x.dim(), channel_dim)

    def denormalize(self, x, channel_dim):
        """After the quantizer: ``+ delta`` for an unfolded shift, else the identity (scale lives on the weight)."""
        if self.kind == 'shift' and not self._folded:
            return x + _channel_view(self.delta, x.dim(), channel_dim)
        return x

    def restore(self, x, channel_dim):
        """Back to the units of the layer input: ``+ delta`` or ``* rho``, folded or not.

        ``restore(q(normalize(x)))`` is what the layer's operation effectively sees, expressed in ``x``'s units
        (the scale is carried by the weight, a folded shift by the bias).
        """
        if self.kind == 'shift':
            return x + _channel_view(self.delta, x.dim(), channel_dim)
        return x * _channel_view(self.effective_rho(), x.dim(), channel_dim)

    def scale_weight(self, w):
        """Before the weight quantizer: ``W * rho`` along the input channels (dim 1) for an unfolded scale."""
        if self.kind == 'scale' and not self._folded:
            return w * _channel_view(self.effective_rho(), w.dim(), 1).to(w.dtype)
        return w


# ---------------------------------------------------------------------------------------------------------------
# Attaching, folding, mirroring, reporting
# ---------------------------------------------------------------------------------------------------------------

def _check_offset_layer(layer, name):
    if not isinstance(layer, QUANTIZED_TYPES):
        raise ValueError(f'{name!r} is not a quantized layer (QConv2d / QLinear), got {type(layer).__name__}')
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        raise ValueError(f'distribution offsets need groups=1, but conv {name!r} has groups={layer.groups}: '
                         f'a per-input-channel offset of a grouped conv is not supported')


def _new_offset(layer, name, kind, num_channels=None):
    _check_offset_layer(layer, name)
    c = _in_channels(layer)
    if num_channels is not None and num_channels != c:
        raise ValueError(f'offset of {name!r} has {num_channels} channels, the layer {c} input channels')
    offset = DistributionOffset(c, kind, device=layer.weight.device, dtype=layer.weight.dtype)
    layer.offset = offset
    return offset


def _layer_map(model):
    return dict(quantized_layers(model))


def _get_layer(layers, name, model, what):
    if name not in layers:
        raise ValueError(f'{what}: {name!r} is not a quantized layer of {type(model).__name__}; '
                         f'quantized layers: {list(layers)}')
    return layers[name]


def attach_offsets(model, selection, stats, min_rho=MIN_RHO, reset_act_range=True):
    """Create and initialise offsets on the selected layers.

    Args:
        model (nn.Module): Network with quantized layers.
        selection (dict[str, str]): Layer name -> ``'shift'`` | ``'scale'`` (:func:`select_offset_layers`).
        stats (dict[str, ChannelStats]): Statistics of the layer inputs (:func:`channel_statistics`).
        min_rho (float): Lower clamp of the initial ``rho``. Default: 1e-2.
        reset_act_range (bool): Mark the activation quantizer of each offset layer uninitialised, so that its
            range is set again from the normalised input (by the next :func:`calibration`, or else the first
            batch). Default: True.

    Returns:
        dict[str, DistributionOffset]: The new offsets.

    Raises:
        ValueError: for an unknown layer, a layer that already has an offset, missing statistics, a grouped conv,
            or an invalid kind.
    """
    layers = _layer_map(model)
    created = {}
    for name, kind in selection.items():
        layer = _get_layer(layers, name, model, 'attach_offsets')
        if layer.offset is not None:
            raise ValueError(f'attach_offsets: layer {name!r} already has an offset ({layer.offset.kind})')
        if name not in stats:
            raise ValueError(f'attach_offsets: no statistics for layer {name!r}')
        s = stats[name]
        offset = _new_offset(layer, name, kind)
        offset.init_from_stats(s.mean(), s.std(), min_rho)
        if reset_act_range and layer.act_quant is not None:
            layer.act_quant.set_initialized(False)
        created[name] = offset
    return created


def add_offsets(model, stats, select='topk', fraction=0.25, threshold=None, kind='auto', min_rho=MIN_RHO,
                reset_act_range=True):
    """Score, select and attach in one call. Returns ``(selection, scores)``.

    Args are those of :func:`select_offset_layers` and :func:`attach_offsets`.
    """
    scores = mismatch_scores(stats)
    selection = select_offset_layers(scores, select, fraction, threshold, kind)
    attach_offsets(model, selection, stats, min_rho, reset_act_range)
    return selection, scores


@torch.no_grad()
def fold_offset(layer, name='layer'):
    """Fold the output side of ``layer``'s offset into its weight / bias (in place; see the module docstring).

    The weight and bias tensors are modified in place, including when they are shared with another module (a
    quantized layer built by ``from_float`` shares them with the FP layer it replaced). A shift on a layer
    without bias creates one. Folding an already folded offset does nothing.

    Returns:
        bool: True when something was folded.
    """
    offset = layer.offset
    if offset is None or offset.is_folded:
        return False
    _check_offset_layer(layer, name)
    if offset.kind == 'scale':
        layer.weight.mul_(_channel_view(offset.effective_rho(), layer.weight.dim(), 1).to(layer.weight.dtype))
    else:
        qw = layer.quantized_weight().double()
        if qw.dim() > 2:
            qw = qw.sum(dim=tuple(range(2, qw.dim())))
        add = qw @ offset.delta.double()  # (out,)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(add, dtype=layer.weight.dtype))
        layer.bias.add_(add.to(layer.bias.dtype))
    offset.set_folded(True)
    return True


def fold_offsets(model):
    """Fold every offset of ``model`` (:func:`fold_offset`). Returns the names of the layers folded now."""
    return [name for name, layer in quantized_layers(model) if fold_offset(layer, name)]


def ensure_offsets_from_state(model, state_dict):
    """Create identity offsets for the ``<layer>.offset.delta|rho`` keys of ``state_dict`` whose layer has none.

    Call it before ``model.load_state_dict(state_dict)`` so that the keys match. For a folded shift
    (``<layer>.offset.folded`` true) whose state carries a ``<layer>.bias`` the layer lacks, a zero bias is created
    too (folding created it).

    Args:
        model (nn.Module): Network with quantized layers.
        state_dict (Mapping[str, Tensor]): Keys relative to ``model``.

    Returns:
        list[str]: Names of the layers that got a new offset.

    Raises:
        ValueError: if a key names a module that is not a quantized layer, or an offset of the other kind exists.
    """
    layers = _layer_map(model)
    created = []
    for key, value in state_dict.items():
        m = _STATE_KEY.match(key)
        if m is None:
            continue
        name, param = m.group(1) or '', m.group(2)
        kind = 'shift' if param == 'delta' else 'scale'
        layer = _get_layer(layers, name, model, f'ensure_offsets_from_state (key {key!r})')
        if layer.offset is None:
            _new_offset(layer, name, kind, num_channels=value.numel())
            created.append(name)
        elif layer.offset.kind != kind:
            raise ValueError(f'ensure_offsets_from_state: layer {name!r} has a {layer.offset.kind} offset, the '
                             f'state dict a {kind} one (key {key!r})')
        prefix = f'{name}.' if name else ''
        folded = state_dict.get(prefix + 'offset.folded')
        if (layer.bias is None and prefix + 'bias' in state_dict and folded is not None and bool(folded)):
            bias = state_dict[prefix + 'bias']
            layer.bias = nn.Parameter(torch.zeros(bias.shape, device=layer.weight.device, dtype=layer.weight.dtype))
    return created


def ensure_offsets_like(dst_model, src_model, copy_values=True):
    """Give ``dst_model`` the offsets of ``src_model`` (same layer names, kinds and channels).

    Used for copies built separately from the same options, such as BasicSR's EMA network, whose parameter
    averaging only sees parameters that exist in both.

    Args:
        dst_model (nn.Module): Network to complete.
        src_model (nn.Module): Network whose offsets are mirrored.
        copy_values (bool): Also copy ``delta`` / ``rho`` into offsets created now. Default: True.

    Returns:
        list[str]: Names of the layers that got a new offset.

    Raises:
        ValueError: if a layer is missing in ``dst_model``, has an offset of the other kind, or the source offset
            is folded (folding changed the source weights; load its state dict with
            :func:`ensure_offsets_from_state` instead).
    """
    dst_layers = _layer_map(dst_model)
    created = []
    for name, src_layer in quantized_layers(src_model):
        src = src_layer.offset
        if src is None:
            continue
        layer = _get_layer(dst_layers, name, dst_model, 'ensure_offsets_like')
        if src.is_folded:
            raise ValueError(f'ensure_offsets_like: the offset of {name!r} is folded; copy the folded network '
                             f'with ensure_offsets_from_state + load_state_dict instead')
        if layer.offset is None:
            offset = _new_offset(layer, name, src.kind, num_channels=src.num_channels)
            if copy_values:
                with torch.no_grad():
                    offset.param.copy_(src.param)
            created.append(name)
        elif layer.offset.kind != src.kind:
            raise ValueError(f'ensure_offsets_like: layer {name!r} has a {layer.offset.kind} offset, the source '
                             f'a {src.kind} one')
    return created


def offset_layers(model):
    """``(name, layer)`` pairs of the quantized layers that carry an offset."""
    return [(name, m) for name, m in quantized_layers(model) if m.offset is not None]


def offset_report(model):
    """Cost of the offsets of ``model``, one dict per offset layer.

    Keys: ``layer`` (name), ``kind``, ``channels`` (C), ``params`` (offset parameters, C; a bias created by
    folding a shift is an ordinary layer parameter and not counted here), ``fp_ops_per_input_element`` (extra FP
    operations per element of the layer input: unfolded shift 2, unfolded scale 1, folded 1),
    ``fp_ops_per_call`` (extra FP operations per forward pass independent of the input size: the ``W * rho``
    product of an unfolded scale, else 0) and ``folded`` (bool).
    """
    report = []
    for name, layer in offset_layers(model):
        off = layer.offset
        folded = off.is_folded
        per_elem = 1 if folded or off.kind == 'scale' else 2
        per_call = layer.weight.numel() if off.kind == 'scale' and not folded else 0
        report.append(dict(layer=name, kind=off.kind, channels=off.num_channels, params=off.param.numel(),
                           fp_ops_per_input_element=per_elem, fp_ops_per_call=per_call, folded=folded))
    return report
