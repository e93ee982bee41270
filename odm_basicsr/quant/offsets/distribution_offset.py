"""The learnable per-channel shift or scale in front of a quantized layer's activation quantizer (METHOD.md 4.3).

Forms (``x``: the layer input, channels along the layer's ``channel_dim``; ``q``: the layer's activation quantizer,
one static range per layer; ``Q_w``: the weight quantizer; ``op``: the convolution / linear map)::

    shift:  op(q(x - delta) + delta, Q_w(W))      delta (C,) learnable, init mu_c
    scale:  op(q(x / rho),            Q_w(W * rho))  rho (C,) learnable, init sigma_c / mean_c(sigma_c)

``W * rho`` multiplies input channel ``c`` of the weight by ``rho_c`` *before* weight quantization, so the scale is
part of the quantized weight and folding it is exact. (METHOD.md writes the scale as ``rho * q(x / rho)`` on the
activation side; ``op`` is linear in each input channel, so the two forms are the same function with FP weights; with
quantized weights only the form used here folds into a quantized weight exactly.) ``rho`` is initialised *relative*
to the mean channel scale, so the normalised input keeps the units of ``x``; it is clamped to at least ``min_rho``
(1e-2) at initialisation and to 1e-6 in the forward pass, so a dead channel never divides by zero.
"""
import math

import torch
from torch import nn

OFFSET_KINDS = ('shift', 'scale')
#: Smallest ``rho`` used in the forward pass (guards division by zero if training drives ``rho`` to 0 or below).
RHO_EPS = 1e-6
#: Default lower clamp of the initial relative scale ``sigma_c / mean_c(sigma_c)``.
MIN_RHO = 1e-2


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
