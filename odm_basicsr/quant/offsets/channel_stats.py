"""Per-channel mean and standard deviation of the inputs of quantized layers (METHOD.md 4.3, step 1).

Run :func:`channel_statistics` inside :func:`~odm_basicsr.quant.calibration.calibration` to measure the FP
activations: its hooks only read, they never quantize or change an output.
"""
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from ..layer_selection import quantized_layers


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
