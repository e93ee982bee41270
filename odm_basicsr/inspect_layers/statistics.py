"""Per-layer statistics of a quantized network's FP inputs: ranges, percentiles, clipping, SQNR, mismatch scores."""
import math
from contextlib import contextmanager

PERCENTILES = (0.1, 1.0, 50.0, 99.0, 99.9)
MAX_SAMPLES = 200_000


def _pass_through(x):
    return x


@contextmanager
def full_precision(net):
    """Inside the block the network runs in full precision without gradients and nothing about its quantizers
    changes: weight quantizers pass through (``weights_unquantized``) and so do activation quantizers, which
    neither quantize nor record anything (unlike ``calibration()``, which records a range statistic per call, a
    costly MSE search, and sets the ranges on exit)."""
    import torch

    from odm_basicsr.quant import act_quantizers, weights_unquantized

    quantizers = act_quantizers(net)
    for q in quantizers:
        q.forward = _pass_through  # instance attribute: shadows ActQuantizer.forward
    try:
        with torch.no_grad(), weights_unquantized(net):
            yield net
    finally:
        for q in quantizers:
            q.__dict__.pop('forward', None)


@contextmanager
def quantizing(act_quant):
    """Let one activation quantizer quantize again inside :func:`full_precision`."""
    shadow = None if act_quant is None else act_quant.__dict__.pop('forward', None)
    try:
        yield
    finally:
        if shadow is not None:
            act_quant.forward = shadow


class Subsample:
    """At most ``cap`` values of a stream of tensors, each value of the stream equally likely to be kept.

    Everything is kept while it fits (``rate == 1``: exact percentiles). Beyond that the keeping rate halves as
    often as needed; values already kept are thinned by a seeded random half, new tensors sampled at the current
    rate with seeded random indices (deterministic; no stride aliasing with power-of-two feature sizes).
    """

    def __init__(self, cap, seed=0):
        import torch

        self.cap = max(int(cap), 1)
        self.rate = 1
        self.chunks = []
        self.size = 0
        self.seen = 0
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, x):
        import torch

        flat = x.detach().reshape(-1)
        n = flat.numel()
        self.seen += n
        while self.size + math.ceil(n / self.rate) > self.cap:
            self.rate *= 2
            self.chunks = [c[torch.randperm(c.numel(), generator=self.gen)[:(c.numel() + 1) // 2]]
                           for c in self.chunks]
            self.size = sum(c.numel() for c in self.chunks)
        if self.rate == 1:
            chunk = flat.float().cpu()
        else:
            idx = torch.randint(n, (math.ceil(n / self.rate),), generator=self.gen)
            chunk = flat[idx.to(flat.device)].float().cpu()
        self.chunks.append(chunk)
        self.size += chunk.numel()

    def values(self):
        import torch
        return torch.cat(self.chunks).numpy() if self.chunks else None

    def describe(self):
        return {'values': self.size, 'of': self.seen, 'exact': self.rate == 1,
                'method': 'all values' if self.rate == 1 else f'seeded uniform subsample, ~1 in {self.rate}'}


class LayerAccumulator:
    """Exact sums / counts / extremes of one layer's FP input, plus percentile subsamples."""

    def __init__(self, name, layer, cap, seed):
        self.name, self.layer = name, layer
        self.calls = 0
        self.numel = 0
        self.min = math.inf
        self.max = -math.inf
        self.qin_min = math.inf
        self.qin_max = -math.inf
        self.clip_low = 0
        self.clip_high = 0
        self.signal = 0.0
        self.noise = 0.0
        self.variances = []
        self.sample = Subsample(cap, seed)
        self.qin_sample = Subsample(cap, seed + 1) if layer.offset is not None else None

    def update(self, x):
        import torch

        from odm_basicsr.losses.variance_loss import feature_variance

        layer, q = self.layer, self.layer.act_quant
        x = x.detach()
        xf = x.float()
        self.calls += 1
        self.numel += x.numel()
        self.min = min(self.min, float(xf.min()))
        self.max = max(self.max, float(xf.max()))
        self.variances.append(float(feature_variance(xf, 'channel')))
        self.sample.add(xf)
        self.signal += float(xf.square().sum(dtype=torch.float64))
        if q is None:
            return
        qin = xf if layer.offset is None else layer.offset.normalize(xf, layer.channel_dim)
        if self.qin_sample is not None:
            self.qin_sample.add(qin)
            self.qin_min = min(self.qin_min, float(qin.min()))
            self.qin_max = max(self.qin_max, float(qin.max()))
        lower, upper = _quantizer_bounds(q)
        self.clip_low += int((qin < lower.to(qin.dtype)).sum())
        self.clip_high += int((qin > upper.to(qin.dtype)).sum())
        with quantizing(q):
            eff = layer.effective_input(x)
        self.noise += float((xf - eff.float()).square().sum(dtype=torch.float64))


def _quantizer_bounds(q):
    """The bounds the activation quantizer's forward pass uses (``upper`` kept above ``lower``)."""
    import torch

    lower = q.lower.detach()
    upper = torch.maximum(q.upper.detach(), lower + 1e-6 * q.range_scale)
    return lower, upper


def sqnr_db(signal, noise):
    """``10 log10(signal / noise)``; ``inf`` for a zero noise and a non-zero signal, None when undefined."""
    if noise > 0 and signal > 0:
        return 10.0 * math.log10(signal / noise)
    if noise == 0 and signal > 0:
        return math.inf
    return None


def weight_stats(layer):
    """SQNR of the weight quantizer on the layer's weight (as it sees it), and its energies (float64)."""
    import torch

    wq = layer.weight_quant
    if wq is None:
        return {'weight_sqnr_db': None, 'weight_signal_energy': None, 'weight_noise_energy': None}
    with torch.no_grad():
        w = layer.weight if layer.offset is None else layer.offset.scale_weight(layer.weight)
        previous = wq.enabled
        wq.enabled = True
        try:
            qw = wq(w)
        finally:
            wq.enabled = previous
        w64 = w.detach().double()
        signal = float(w64.square().sum())
        noise = float((w64 - qw.detach().double()).square().sum())
    return {'weight_sqnr_db': sqnr_db(signal, noise), 'weight_signal_energy': signal, 'weight_noise_energy': noise}


def inspect_network(net, inputs, max_samples=MAX_SAMPLES):
    """Per-layer statistics (list of dicts, forward order) of ``net`` on ``inputs`` (tensors, run one at a time)."""
    import numpy as np

    from odm_basicsr.quant import channel_statistics, mismatch_scores, quantized_layers

    layers = quantized_layers(net)
    if not layers:
        raise ValueError(f'{type(net).__name__} has no quantized layer')
    weights = {name: weight_stats(m) for name, m in layers}  # before full_precision(): weight quantizers enabled
    accs = {name: LayerAccumulator(name, m, max_samples, seed=2 * i) for i, (name, m) in enumerate(layers)}
    order, handles = [], []

    def make_hook(name):
        def hook(module, args):
            if accs[name].calls == 0:
                order.append(name)
            accs[name].update(args[0])
        return hook

    with full_precision(net), channel_statistics(net) as stats:
        for name, m in layers:
            handles.append(m.register_forward_pre_hook(make_hook(name)))
        try:
            for x in inputs:
                net(x)
        finally:
            for h in handles:
                h.remove()
    called = {n: s for n, s in stats.items() if s.count is not None and float(s.count) > 0}
    scores = mismatch_scores(called)
    rows = []
    for name in order + [n for n, _ in layers if n not in order]:
        acc, layer = accs[name], accs[name].layer
        q = layer.act_quant
        row = {'layer': name, 'type': type(layer).__name__, 'w_bits': layer.w_bits, 'a_bits': layer.a_bits,
               'offset': None if layer.offset is None else layer.offset.kind, 'calls': acc.calls,
               'input_values': acc.numel}
        if acc.calls == 0:
            row['note'] = 'not called in the forward pass'
            rows.append(row)
            continue
        sample = acc.sample.values()
        pct = np.percentile(sample.astype(np.float64), PERCENTILES)
        row.update({
            'min': acc.min, 'max': acc.max,
            'percentiles': {f'p{p:g}': float(v) for p, v in zip(PERCENTILES, pct)},
            'percentile_sample': acc.sample.describe(),
        })
        if acc.qin_sample is not None:
            qpct = np.percentile(acc.qin_sample.values().astype(np.float64), PERCENTILES)
            row['quantizer_input'] = {'min': acc.qin_min, 'max': acc.qin_max,
                                      'percentiles': {f'p{p:g}': float(v) for p, v in zip(PERCENTILES, qpct)},
                                      'note': 'x - delta (shift) or x / rho (scale): what the range applies to'}
        if q is not None:
            lower, upper = _quantizer_bounds(q)
            row.update({
                'lower': float(lower), 'upper': float(upper), 'act_init': q.init,
                'clipped': (acc.clip_low + acc.clip_high) / acc.numel,
                'clipped_low': acc.clip_low / acc.numel, 'clipped_high': acc.clip_high / acc.numel,
                'input_sqnr_db': sqnr_db(acc.signal, acc.noise),
                'input_signal_energy': acc.signal, 'input_noise_energy': acc.noise,
            })
        else:
            row.update({'lower': None, 'upper': None, 'clipped': None, 'input_sqnr_db': None})
        row.update(weights[name])
        s = called[name]
        row['mismatch_shift'] = scores[name]['shift']
        row['mismatch_scale'] = scores[name]['scale']
        row['variance'] = float(s.var().mean())
        row['variance_per_image_mean'] = float(np.mean(acc.variances))
        rows.append(row)
    return rows
