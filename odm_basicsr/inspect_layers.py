"""``odm-inspect``: look inside a quantized network, layer by layer, on a folder of LR images.

``odm-inspect -opt NET.yml --checkpoint C.pth --data DIR [--out FOLDER] [--images N] [--bits B] [--layers ...]``

Two ways in:

- ``network_g`` is ``Quantized``: ``C.pth`` is a quantized checkpoint with calibrated activation ranges (as
  ``odm-train`` writes it: ``params_ema``, falling back to ``params``); distribution offsets are recreated from it.
- ``network_g`` is a plain FP arch: ``C.pth`` is its FP checkpoint; the network is wrapped in ``Quantized`` with
  ``--bits`` (weights and activations, default 4) and ``--layers`` (default ``default``, the arch's preset), then
  calibrated on the inspected images themselves (FP calibration, ``calibrate(net, batches, mode='fp')``).

``DIR`` is a folder of LR images, or a benchmark set root holding ``LRbicx<scale>``. Images are read as odm-eval
reads them (RGB, [0, 1]) and run one at a time, in full precision: weight quantizers and activation quantizers pass
through, so every statistic below describes the input each quantized layer gets from the FP network. The
quantizer state of the network is never changed.

Per quantized layer, in forward order (first call):

- FP input: min and max (exact) and the 0.1 / 1 / 50 / 99 / 99.9 percentiles. Percentiles are exact while a
  layer's inputs over all images hold at most ``--max-samples`` values (default 200 000); beyond that they come from
  a seeded uniform subsample of that size (deterministic; every value of every image equally likely), and
  ``layers.json`` says which (``percentile_sample``).
- The activation quantizer's range ``[lower, upper]`` and the fraction of the input it clips (exact counts). With a
  distribution offset the quantizer sees ``x - delta`` or ``x / rho`` and the range is in those units; clipping
  is counted there.
- Input SQNR ``10 log10(sum x^2 / sum (x - e(x))^2)`` with ``e`` the layer's ``effective_input`` (what the
  convolution sees, in the units of ``x``), and weight SQNR ``10 log10(sum W^2 / sum (W - Q_w(W))^2)`` (``W`` times
  ``rho`` for an unfolded scale offset, as the weight quantizer sees it). Exact sums in float64.
- Channel mismatch scores (``mismatch_scores``: shift ``std_c(mu_c) / mean_c(sigma_c)`` and scale
  ``std_c(sigma_c) / mean_c(sigma_c)``) and the input variance of FeatureVarianceLoss' ``channel`` reduction
  (mean over channels of the variance over all images' pixels, i.e. all images taken as one batch; exact).
  ``layers.json`` also has the mean over images of ``feature_variance(x, 'channel')`` per image.

Writes ``layers.md`` (also printed), ``layers.json`` (the numbers and the settings) and ``layers.png`` into
``--out`` (default ``inspect/<checkpoint stem>``). Errors exit with status 2 (3 for a checkpoint holding NaN / Inf)
and one line on stderr.
"""
import argparse
import json
import math
import os
import time
from contextlib import contextmanager

import odm_basicsr.archs  # noqa: F401  (BasicSR fixes + registration first)
from odm_basicsr.archs.arch_util import pad_to_window
from odm_basicsr.network_options import build_network, read_network_options, window_size
from odm_basicsr.scoring import IMAGE_EXTS, image_files, load_weights, read_image, to_tensor
from odm_basicsr.tool_cli import ToolError, pick_device, run_cli

PROG = 'odm-inspect'
PERCENTILES = (0.1, 1.0, 50.0, 99.0, 99.9)
MAX_SAMPLES = 200_000
DEFAULT_BITS = 4


class InspectError(ToolError):
    """A user error: reported as one line, exit status 2."""


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-opt', '--opt', required=True,
                   help='option file (or network_g YAML): a Quantized network_g, or a plain FP arch')
    p.add_argument('--checkpoint', required=True, help='quantized checkpoint (Quantized network_g) or FP checkpoint')
    p.add_argument('--data', required=True, help='folder of LR images, or a benchmark set root holding LRbicx<scale>')
    p.add_argument('--out', default=None, help='output folder (default: inspect/<checkpoint stem>)')
    p.add_argument('--images', type=int, default=None, help='use the first N images (sorted by name; default: all)')
    p.add_argument('--bits', type=int, default=None,
                   help=f'FP arch only: weight and activation bits of the Quantized wrapper (default {DEFAULT_BITS})')
    p.add_argument('--layers', nargs='+', default=None,
                   help='FP arch only: layers to quantize: default | all | glob / re: patterns (default: default)')
    p.add_argument('--scale', type=int, default=None, help="upscaling factor (default: the option file's)")
    p.add_argument('--param-key', default='params_ema', help='checkpoint entry (falls back to params)')
    p.add_argument('--max-samples', type=int, default=MAX_SAMPLES,
                   help=f'values per layer kept for the percentiles (default {MAX_SAMPLES})')
    p.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'), help='default: auto')
    p.add_argument('--threads', type=int, default=None,
                   help="CPU threads of torch (default: torch's choice; 1 is much faster on a busy machine)")
    return p


# ------------------------------------------------------------------------------------------------------------ data
def list_images(data, scale):
    """Sorted image paths of ``data`` or, when it has one, of its ``LRbicx<scale>`` subfolder."""
    if not os.path.isdir(data):
        raise InspectError(f'data folder not found: {data}')
    sub = os.path.join(data, f'LRbicx{scale}')
    folder = sub if os.path.isdir(sub) else data
    names = image_files(folder)
    if not names:
        extra = f' (nor a subfolder LRbicx{scale})' if folder == data else ''
        raise InspectError(f'no images ({", ".join(IMAGE_EXTS)}) found in {folder}{extra}')
    return folder, [os.path.join(folder, f) for f in names]


def load_inputs(paths, device, window=None):
    """Each image as a (1, 3, H, W) RGB [0, 1] tensor on ``device`` (padded to the window as odm-eval does)."""
    return [pad_to_window(to_tensor(read_image(path)).to(device), window) for path in paths]


# --------------------------------------------------------------------------------------------------------- network
def _is_quantized_opt(net_opt):
    return net_opt.get('type') == 'Quantized'


def prepare_network(net_opt, args, inputs):
    """The quantized network to inspect, and a dict describing how it was obtained."""
    from odm_basicsr.checkpoint import CheckpointMismatchError, load_state
    from odm_basicsr.quant import CalibrationError, calibrate, quantized_layers

    if _is_quantized_opt(net_opt):
        given = [flag for flag, v in (('--bits', args.bits), ('--layers', args.layers)) if v is not None]
        if given:
            raise InspectError(f'{" and ".join(given)} only apply to a plain FP arch; network_g of {args.opt} is '
                               f'Quantized (w_bits={net_opt.get("w_bits", 4)}, a_bits={net_opt.get("a_bits", 4)}) '
                               'and its checkpoint carries the quantizer state')
        net = build_network(net_opt)
        try:
            key = load_weights(net, args.checkpoint, args.param_key)
        except ToolError as e:
            if 'no quantizer state' not in str(e):
                raise
            raise InspectError(f'{e} To inspect an FP checkpoint, give an option file with the plain FP arch '
                               '(and --bits).') from e
        return net, {'source': 'quantized checkpoint', 'param_key': key, 'calibrated_here': False}

    bits = DEFAULT_BITS if args.bits is None else args.bits
    layers = 'default' if args.layers is None else args.layers
    if isinstance(layers, list) and len(layers) == 1 and layers[0] in ('default', 'all'):
        layers = layers[0]
    fp = build_network(net_opt)
    try:
        key = load_weights(fp, args.checkpoint, args.param_key)
    except ToolError as e:
        hint = (' (a quantized checkpoint? inspect it with its Quantized option file)'
                if any(k in str(e) for k in ('act_quant', 'weight_quant', 'offset.')) else '')
        raise InspectError(f'{e}{hint}') from e
    q_opt = {'type': 'Quantized', 'arch': dict(net_opt), 'w_bits': bits, 'a_bits': bits, 'layers': layers}
    net = build_network(q_opt)
    try:
        load_state(net, fp.state_dict(), source=f'the FP weights of {net_opt["type"]}')
    except CheckpointMismatchError as e:
        raise InspectError(f'{e} (its Quantized wrapper)') from e
    del fp
    net.to(inputs[0].device).eval()
    try:
        calibrate(net, inputs, mode='fp')
    except (CalibrationError, ValueError) as e:
        raise InspectError(f'FP calibration failed: {e}') from e
    if not quantized_layers(net):
        raise InspectError(f'no quantized layer in {net_opt["type"]} with layers={layers!r}')
    return net, {'source': 'FP checkpoint, wrapped in Quantized and FP-calibrated on the inspected images',
                 'param_key': key, 'calibrated_here': True, 'bits': bits, 'layers': layers,
                 'quantized_opt': q_opt}


# ----------------------------------------------------------------------------------------------------- statistics
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
        raise InspectError(f'{type(net).__name__} has no quantized layer')
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


# --------------------------------------------------------------------------------------------------------- output
def _num(v, digits=4):
    if v is None:
        return '-'
    if isinstance(v, float) and math.isinf(v):
        return 'inf'
    if v == 0:
        return '0'
    a = abs(v)
    if 1e-3 <= a < 1e5:
        return f'{v:.{digits}g}'
    return f'{v:.3e}'


def _pct(v):
    return '-' if v is None else f'{100 * v:.3f}'


def _clip_cell(r):
    if r.get('clipped') is None:
        return '-'
    return f'{_pct(r["clipped"])} ({100 * r["clipped_low"]:.2f} / {100 * r["clipped_high"]:.2f})'


def format_markdown(rows):
    head = ['#', 'layer', 'bits', 'offset', 'min', 'p0.1', 'p1', 'p50', 'p99', 'p99.9', 'max', 'lower', 'upper',
            'clipped % (low / high)', 'in SQNR dB', 'W SQNR dB', 'shift', 'scale', 'variance']
    align = ['---:', '---', '---', '---'] + ['---:'] * (len(head) - 4)
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join(align) + '|']
    for i, r in enumerate(rows):
        bits = f'W{r["w_bits"]}A{r["a_bits"]}'.replace('32', 'FP')
        if r['calls'] == 0:
            lines.append(f'| {i} | {r["layer"]} | {bits} | {r["offset"] or ""} | ' + ' | '.join(['-'] * 15)
                         + ' |')
            continue
        p = r['percentiles']
        cells = [str(i), r['layer'], bits, r['offset'] or '', _num(r['min']), _num(p['p0.1']), _num(p['p1']),
                 _num(p['p50']), _num(p['p99']), _num(p['p99.9']), _num(r['max']), _num(r['lower']),
                 _num(r['upper']), _clip_cell(r), _num(r['input_sqnr_db'], 3), _num(r['weight_sqnr_db'], 3),
                 _num(r['mismatch_shift'], 3), _num(r['mismatch_scale'], 3), _num(r['variance'])]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return 'inf' if v > 0 else ('-inf' if v < 0 else None)
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def _normalised(v, lower, upper):
    return (v - lower) / (upper - lower)


def draw_figure(path, rows, title):
    """Two panels: each layer's quantizer-input distribution in units of its range (0 = lower, 1 = upper), and
    input / weight SQNR with the clipped fraction."""
    import matplotlib

    matplotlib.use('Agg', force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(rows)
    width = min(max(8.0, 2.5 + 0.42 * n), 40.0)
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(width, 9.0), sharex=True, gridspec_kw={'height_ratios': [3, 2]},
                                 layout='constrained')
    xs = np.arange(n)
    ax.axhspan(0.0, 1.0, color='tab:red', alpha=0.08, zorder=0)
    ax.axhline(0.0, color='tab:red', lw=1.2, zorder=1)
    ax.axhline(1.0, color='tab:red', lw=1.2, zorder=1, label='quantizer range [lower, upper]')
    lo_view, hi_view = -0.25, 1.25
    boxes = []
    for i, r in enumerate(rows):
        if r.get('lower') is None or r['calls'] == 0:
            continue
        src = r.get('quantizer_input', r)
        p = src['percentiles']
        vals = [_normalised(v, r['lower'], r['upper'])
                for v in (src['min'], p['p0.1'], p['p1'], p['p50'], p['p99'], p['p99.9'], src['max'])]
        boxes.append((i, vals))
        lo_view, hi_view = min(lo_view, vals[1]), max(hi_view, vals[5])
    span = hi_view - lo_view
    lo_view, hi_view = max(lo_view - 0.05 * span, -3.0), min(hi_view + 0.05 * span, 4.0)
    for i, (mn, p01, p1, p50, p99, p999, mx) in boxes:
        ax.plot([i, i], [p01, p999], color='tab:blue', lw=1.2, zorder=2)
        ax.add_patch(plt.Rectangle((i - 0.28, p1), 0.56, max(p99 - p1, 1e-9), facecolor='tab:blue', alpha=0.45,
                                   edgecolor='tab:blue', zorder=3))
        ax.plot([i - 0.28, i + 0.28], [p50, p50], color='black', lw=1.5, zorder=4)
        for v, marker in ((mn, 'v'), (mx, '^')):
            inside = lo_view <= v <= hi_view
            ax.plot(i, min(max(v, lo_view), hi_view), marker=marker, ms=5 if inside else 7, clip_on=False,
                    color='tab:blue' if inside else 'tab:purple', zorder=5, linestyle='none')
    ax.set_ylim(lo_view, hi_view)
    ax.set_ylabel('(x - lower) / (upper - lower)')
    fig.suptitle(title, fontsize=10)
    ax.plot([], [], color='tab:blue', lw=6, alpha=0.45, label='FP input: p1-p99 (box), p0.1-p99.9 (whisker), p50')
    ax.plot([], [], 'v', color='tab:blue', label='min / max')
    ax.plot([], [], '^', color='tab:purple', label='min / max out of view (at the edge)')
    ax.legend(loc='lower left', bbox_to_anchor=(0.0, 1.0), ncol=2, fontsize=8, frameon=False)
    ax.grid(axis='y', alpha=0.3)

    def series(key):
        return np.array([np.nan if not isinstance(r.get(key), (int, float)) or not math.isfinite(r[key])
                         else r[key] for r in rows], dtype=float)

    bx.plot(xs, series('input_sqnr_db'), 'o-', color='tab:blue', label='input SQNR (dB)')
    bx.plot(xs, series('weight_sqnr_db'), 's-', color='tab:orange', label='weight SQNR (dB)')
    bx.set_ylabel('SQNR (dB)')
    bx.grid(axis='y', alpha=0.3)
    cx = bx.twinx()
    clipped = series('clipped') * 100.0
    low = np.nan_to_num(series('clipped_low') * 100.0)
    cx.bar(xs, low, width=0.5, color='tab:gray', alpha=0.55, label='clipped below lower (%)')
    cx.bar(xs, np.nan_to_num(series('clipped_high') * 100.0), width=0.5, bottom=low, color='tab:gray', alpha=0.25,
           hatch='//', label='clipped above upper (%)')
    cx.set_ylabel('clipped (% of input values)')
    cx.set_ylim(0, max(1.0, float(np.nanmax(clipped)) * 1.15) if np.isfinite(clipped).any() else 1.0)
    handles = bx.get_legend_handles_labels()[0] + cx.get_legend_handles_labels()[0]
    labels = bx.get_legend_handles_labels()[1] + cx.get_legend_handles_labels()[1]
    bx.legend(handles, labels, loc='lower left', bbox_to_anchor=(0.0, 1.0), ncol=4, fontsize=8, frameon=False)
    bx.set_zorder(cx.get_zorder() + 1)
    bx.patch.set_visible(False)
    ticks = [f'{r["layer"]}{" *" if r.get("offset") else ""}' for r in rows]
    bx.set_xticks(xs)
    bx.set_xticklabels(ticks, rotation=90, fontsize=8 if n <= 40 else 6)
    bx.set_xlim(-0.6, n - 0.4)
    bx.set_xlabel('quantized layer, forward order' + ('  (* offset: distribution of x - delta or x / rho)'
                                                      if any(r.get('offset') for r in rows) else ''))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------ main
def run(args):
    import torch

    start = time.perf_counter()
    if args.threads is not None:
        if args.threads < 1:
            raise InspectError(f'--threads must be >= 1, got {args.threads}')
        torch.set_num_threads(args.threads)
    if not os.path.isfile(args.opt):
        raise InspectError(f'option file not found: {args.opt}')
    if not os.path.isfile(args.checkpoint):
        raise InspectError(f'checkpoint file not found: {args.checkpoint}')
    if args.images is not None and args.images < 1:
        raise InspectError(f'--images must be >= 1, got {args.images}')
    if args.max_samples < 1000:
        raise InspectError(f'--max-samples must be >= 1000, got {args.max_samples}')
    if args.bits is not None and args.bits not in (2, 3, 4, 5, 6, 7, 8):
        raise InspectError(f'--bits must be 2..8, got {args.bits}')
    net_opt, scale = read_network_options(args.opt, args.scale)
    folder, paths = list_images(args.data, scale)
    if args.images is not None:
        paths = paths[:args.images]
    device = pick_device(args.device)
    inputs = load_inputs(paths, device, window_size(net_opt))
    net, how = prepare_network(net_opt, args, inputs)
    net.to(device).eval()
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    t0 = time.perf_counter()
    rows = inspect_network(net, inputs, args.max_samples)
    t_inspect = time.perf_counter() - t0
    after = net.state_dict()
    if any(not torch.equal(before[k], after[k]) for k in before):  # a guard on this tool itself
        raise RuntimeError('odm-inspect changed the network state while inspecting it')

    out = args.out or os.path.join('inspect', os.path.splitext(os.path.basename(args.checkpoint))[0])
    os.makedirs(out, exist_ok=True)
    exact = all(r.get('percentile_sample', {}).get('exact', True) for r in rows)
    sampling = ('exact (every value)' if exact else
                f'from a seeded uniform subsample of at most {args.max_samples} values per layer where a layer has '
                'more (see layers.json, percentile_sample)')
    q_layers = [r for r in rows if r['calls']]
    bits = sorted({f'W{r["w_bits"]}A{r["a_bits"]}' for r in rows})
    header = (f'Network `{net_opt["type"]}`'
              + (f' ({net_opt.get("arch", {}).get("type")})' if _is_quantized_opt(net_opt) else '')
              + f' from `{args.opt}`, checkpoint `{args.checkpoint}` ({how["source"]}), {", ".join(bits)}, '
              f'{len(q_layers)} quantized layers in forward order. Data: {len(paths)} image(s) of `{folder}`, '
              'one at a time, network in full precision. min / max, clipped fraction, SQNR, mismatch scores '
              f'(shift / scale) and variance (channel reduction, all images pooled) are exact; percentiles are '
              f'{sampling}.')
    md = format_markdown(rows)
    with open(os.path.join(out, 'layers.md'), 'w', encoding='utf-8') as f:
        f.write(f'# odm-inspect\n\n{header}\n\n{md}')
    settings = {
        'opt': args.opt, 'network_g': net_opt, 'scale': scale, 'checkpoint': args.checkpoint,
        'param_key': how['param_key'], 'source': how['source'], 'calibrated_here': how['calibrated_here'],
        'bits': how.get('bits'), 'layers': how.get('layers'), 'quantized_network_g': how.get('quantized_opt'),
        'data': folder, 'images': [{'path': p, 'shape': list(x.shape[-2:])} for p, x in zip(paths, inputs)],
        'device': str(device), 'percentiles': list(PERCENTILES), 'percentile_method': 'numpy linear interpolation',
        'max_samples': args.max_samples, 'percentiles_exact': exact,
        'definitions': {
            'input': 'the layer input when the whole network runs in full precision',
            'clipped': 'fraction of input values below lower or above upper (after the offset normalisation)',
            'input_sqnr_db': "10 log10(sum x^2 / sum (x - effective_input(x))^2); 'inf' = no error",
            'weight_sqnr_db': '10 log10(sum W^2 / sum (W - Q_w(W))^2); W times rho for an unfolded scale offset',
            'mismatch_shift': 'std_c(mu_c) / mean_c(sigma_c)', 'mismatch_scale': 'std_c(sigma_c) / mean_c(sigma_c)',
            'variance': 'mean over channels of the variance over all images pixels (channel reduction, pooled)',
            'variance_per_image_mean': "mean over images of feature_variance(x, 'channel')",
        },
        'seconds': {'inspect': round(t_inspect, 3), 'total': None},
    }
    png = os.path.join(out, 'layers.png')
    title = (f'{net_opt["type"] if not _is_quantized_opt(net_opt) else net_opt["arch"]["type"]} '
             f'{", ".join(bits)} - {os.path.basename(args.checkpoint)} - {len(paths)} image(s) of {folder}')
    draw_figure(png, rows, title)
    settings['seconds']['total'] = round(time.perf_counter() - start, 3)
    with open(os.path.join(out, 'layers.json'), 'w', encoding='utf-8') as f:
        json.dump(_json_safe({'settings': settings, 'layers': rows}), f, indent=1, allow_nan=False)
    print(md, end='')
    print(f'{len(q_layers)} layers, {len(paths)} image(s), {settings["seconds"]["total"]:.1f} s; written: '
          f'{os.path.join(out, "layers.md")}, {os.path.join(out, "layers.json")}, {png}')
    return rows


def main(argv=None):
    return run_cli(PROG, build_parser(), run, argv)


if __name__ == '__main__':
    main()
