#!/usr/bin/env python
"""Time one training step of FP, plain QAT and ODM (every cooperation mode) on the same network and batch.

Variants (all built in this one process, on one device, from the same FP weights, fed the same batch):

* ``fp``: the plain FP arch under BasicSR's ``SRModel``.
* ``qat``: ``Quantized`` arch under ``ODMModel`` with ``cooperation: off`` and no offsets (the plain QAT baseline).
* ``feature`` (the default ODM mode), ``param``, ``cosine``, ``naive``: ``ODMModel`` with ``FeatureVarianceLoss``
  (``loss_weight: 1.0e-4``, ``reduction: channel``) and distribution offsets on the top-k 0.25 layers
  (``offsets: {select: topk, fraction: 0.25, kind: auto}``).

Every variant uses Adam (lr 1e-4), L1 pixel loss, no EMA; the ODM variants calibrate on ``--calib-batches`` batches
of ``EmbeddedSRDataset`` (the RNGs are reseeded before each model is built, so all see the same calibration data).
The timed batch is one fixed batch of ``EmbeddedSRDataset`` patches. ``log_layer_freq`` is set beyond the run, so
no per-layer logging happens inside the timed steps (in training it runs once every 500 iterations).

Timing: after ``--warmup`` steps per variant, ``--rounds`` rounds visit the variants round-robin (the order
rotated each round) and time ``--steps`` consecutive steps each; a step is
``model.feed_data({'lq', 'gt'}); model.optimize_parameters(i)``, timed with ``time.perf_counter()`` (with
``torch.cuda.synchronize()`` before each clock read on CUDA). Reported: median and IQR over all timed steps.

Memory (one extra, untimed step per variant):

* ``peak_mem_mb``: the peak of bytes allocated during one step *above* what was live when it started (so the
  other variants' models, resident in the same process, do not count). CUDA: ``torch.cuda.max_memory_allocated``
  after ``reset_peak_memory_stats`` minus ``memory_allocated`` at the start. CPU: RSS is too coarse and
  ``tracemalloc`` does not see torch's allocator, so the step runs under ``torch.profiler`` with
  ``profile_memory=True`` and the peak of the running sum of its allocation/free events is taken (this includes
  backward-pass temporaries such as the closed-form ``g_V`` and the second gradient set of ``param``/``cosine``).
* ``saved_mb``: bytes of the tensors autograd saves for backward in one step (``saved_tensors_hooks``, unique
  storages, model parameters excluded): the activation memory a step holds between forward and backward.
* ``resident_mb``: the variant's parameters, buffers and optimizer state.

The last line of stdout is one JSON object; see ``--help``.
"""
import argparse
import copy
import inspect
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

import odm_basicsr.plugin  # noqa: F401  (BasicSR fixes + registration first)

# isort: split
from basicsr.data import build_dataset
from basicsr.models.sr_model import SRModel
from basicsr.utils.registry import ARCH_REGISTRY

from odm_basicsr.models.odm_model import ODMModel

VARIANTS = ('fp', 'qat', 'feature', 'param', 'cosine', 'naive')
ODM_MODES = ('feature', 'param', 'cosine', 'naive')
DEFAULT_MODE = 'feature'
TARGET_RATIO = 1.3
SEED = 0
REG_OPT = {'type': 'FeatureVarianceLoss', 'loss_weight': 1.0e-4, 'reduction': 'channel'}
OFFSETS = {'select': 'topk', 'fraction': 0.25, 'kind': 'auto'}
NEVER = 10**9  # log_layer_freq beyond any run: no per-layer logging inside timed steps

DEFAULTS = dict(arch='EDSR', num_feat=64, num_block=16, scale=4, bits=4, batch=2, patch=24, steps=2, warmup=2,
                rounds=6, calib_batches=2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            'Defaults: EDSR-baseline width and depth (64 features, 16 blocks, x4, W4A4) but a small batch '
            '(2 LR patches of 24x24) and few steps, so that the whole run (6 variants, 12 timed steps each) takes '
            'about 1.5 minutes of CPU time on one core, 2-3 minutes of wall time on a busy 2-core machine '
            '(patch 48 / batch 4 is about 8x the work per step: use it on a GPU). Conv cost grows with num_feat^2 '
            'and the ODM overhead (element-wise work on each quantized layer input) with num_feat, so keep '
            '--num-feat at 64 for a representative ratio and shrink --patch / --batch instead.\n'
            'CPU threads default to 1: with more OpenMP threads than free cores a step slows down 10-100x (measured '
            'on a loaded 2-core machine: 2 s instead of 30 ms for a tiny step), which swamps the comparison. '
            'Pass --threads N on a quiet machine. On CPU the process CPU time of each step is reported as well '
            '(cpu_ms): it is much less sensitive than wall time to other jobs on the machine.\n'
            'Variants: fp (FP arch, SRModel), qat (Quantized arch, ODMModel cooperation: off, no offsets), '
            'feature / param / cosine / naive (ODMModel, FeatureVarianceLoss 1e-4 channel, offsets top-k 0.25).\n'
            'Output: a table, then as the last stdout line one JSON object with step_ms, iqr_ms, min_ms, cpu_ms '
            '(CPU only), peak_mem_mb, '
            'saved_mb, resident_mb, ratio_to_qat (per variant), default ("feature"), feature_over_qat, target, '
            'device, torch, config. The project target: feature <= 1.3 x qat.'))
    parser.add_argument('--arch', default=DEFAULTS['arch'],
                        help='registered arch with num_feat, num_block and upscale/scale arguments (default: EDSR)')
    parser.add_argument('--num-feat', type=int, default=DEFAULTS['num_feat'], help='default: %(default)s')
    parser.add_argument('--num-block', type=int, default=DEFAULTS['num_block'], help='default: %(default)s')
    parser.add_argument('--scale', type=int, default=DEFAULTS['scale'], help='default: %(default)s')
    parser.add_argument('--bits', type=int, default=DEFAULTS['bits'],
                        help='w_bits = a_bits of the quantized variants (default: %(default)s)')
    parser.add_argument('--batch', type=int, default=DEFAULTS['batch'], help='default: %(default)s')
    parser.add_argument('--patch', type=int, default=DEFAULTS['patch'],
                        help='LR patch size; the GT patch is patch * scale (default: %(default)s)')
    parser.add_argument('--steps', type=int, default=DEFAULTS['steps'],
                        help='timed steps per variant per round (default: %(default)s)')
    parser.add_argument('--warmup', type=int, default=DEFAULTS['warmup'],
                        help='untimed steps per variant before the first round (default: %(default)s)')
    parser.add_argument('--rounds', type=int, default=DEFAULTS['rounds'],
                        help='round-robin rounds over the variants (default: %(default)s)')
    parser.add_argument('--calib-batches', type=int, default=DEFAULTS['calib_batches'],
                        help='ODMModel calibration.batches (untimed; default: %(default)s)')
    parser.add_argument('--device', choices=('cpu', 'cuda', 'auto'), default='auto',
                        help='auto = cuda when available (default: %(default)s)')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch.set_num_threads (default: 1 on CPU, torch\'s setting on CUDA)')
    parser.add_argument('--modes', nargs='+', choices=VARIANTS, default=list(VARIANTS),
                        help='variants to run (qat is always added: it is the reference; default: all)')
    parser.add_argument('--no-memory', action='store_true', help='skip the memory measurement steps')
    parser.add_argument('--json-only', action='store_true', help='print only the JSON line')
    args = parser.parse_args(argv)
    for name in ('num_feat', 'num_block', 'scale', 'batch', 'patch', 'steps', 'rounds', 'calib_batches'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1')
    if args.warmup < 0:
        parser.error('--warmup must be >= 0')
    if args.threads is not None and args.threads < 1:
        parser.error('--threads must be >= 1')
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: CUDA is not available')
    args.modes = [v for v in VARIANTS if v in set(args.modes) | {'qat'}]
    return args


# ---------------------------------------------------------------------------------------------------- options
def arch_options(args):
    """``network_g.arch`` for ``--arch`` with the size flags mapped onto its constructor arguments."""
    if args.arch not in ARCH_REGISTRY:
        raise SystemExit(f'benchmark_step: unknown arch {args.arch!r}')
    params = inspect.signature(ARCH_REGISTRY.get(args.arch)).parameters
    upscale_key = 'upscale' if 'upscale' in params else 'scale' if 'scale' in params else None
    if upscale_key is None or 'num_feat' not in params or 'num_block' not in params:
        raise SystemExit(f'benchmark_step: arch {args.arch} has no num_feat / num_block / upscale arguments')
    arch = {'type': args.arch, 'num_feat': args.num_feat, 'num_block': args.num_block, upscale_key: args.scale}
    for key in ('num_in_ch', 'num_out_ch'):
        if key in params:
            arch[key] = 3
    return arch


def base_options(args, device, fp_ckpt):
    gt_size = args.patch * args.scale
    return {
        'name': 'benchmark_step', 'model_type': 'SRModel', 'scale': args.scale, 'is_train': True, 'dist': False,
        'rank': 0, 'world_size': 1, 'num_gpu': 1 if device.type == 'cuda' else 0, 'manual_seed': SEED,
        'datasets': {'train': {
            'name': 'emb', 'type': 'EmbeddedSRDataset', 'phase': 'train', 'scale': args.scale, 'split': 'train',
            'gt_size': gt_size, 'use_hflip': True, 'use_rot': True, 'num_worker_per_gpu': 0,
            'batch_size_per_gpu': args.batch, 'dataset_enlarge_ratio': 1000}},
        'network_g': {'type': 'Quantized', 'w_bits': args.bits, 'a_bits': args.bits, 'arch': arch_options(args)},
        'path': {'pretrain_network_g': fp_ckpt, 'strict_load_g': True, 'param_key_g': 'params',
                 'resume_state': None},
        'train': {'ema_decay': 0, 'optim_g': {'type': 'Adam', 'lr': 1e-4, 'weight_decay': 0, 'betas': [0.9, 0.99]},
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [NEVER], 'gamma': 0.5},
                  'total_iter': NEVER, 'warmup_iter': -1, 'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0},
                  'calibration': {'batches': args.calib_batches}, 'log_layer_freq': NEVER},
    }


def variant_options(base, variant):
    opt = copy.deepcopy(base)
    train = opt['train']
    if variant == 'fp':
        opt['network_g'] = dict(opt['network_g']['arch'])
        for key in ('calibration', 'log_layer_freq'):
            train.pop(key)
        return opt
    opt['model_type'] = 'ODMModel'
    if variant == 'qat':
        train['cooperation'] = 'off'
    else:
        train['cooperation'] = variant
        train['reg_opt'] = dict(REG_OPT)
        opt['network_g']['offsets'] = dict(OFFSETS)
    return opt


def seed_everything(seed=SEED):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def build_model(opt, variant):
    seed_everything()  # same calibration crops for every ODM variant
    model = SRModel(opt) if variant == 'fp' else ODMModel(opt)
    model.variant = variant
    return model


def fixed_batch(base):
    """One batch of training patches (the same tensors for every variant)."""
    seed_everything(SEED + 1)
    dataset = build_dataset(copy.deepcopy(base['datasets']['train']))
    items = [dataset[i % len(dataset)] for i in range(base['datasets']['train']['batch_size_per_gpu'])]
    return {'lq': torch.stack([d['lq'] for d in items]), 'gt': torch.stack([d['gt'] for d in items])}


def check_same_fp_weights(models, fp_state):
    """Every variant starts from the FP checkpoint (offsets and quantizer entries aside)."""
    for model in models.values():
        state = model.get_bare_model(model.net_g).state_dict()
        for key, value in fp_state.items():
            if not torch.equal(state[key].cpu(), value):
                raise RuntimeError(f'{model.variant}: {key} differs from the FP checkpoint')


# ---------------------------------------------------------------------------------------------------- timing
def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def step(model, batch, it):
    model.feed_data(batch)
    model.optimize_parameters(it)


def timed_step(model, batch, it, device):
    """Wall time and process CPU time of one step, in ms."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    step(model, batch, it)
    sync(device)
    return (time.perf_counter() - t0) * 1000.0, (time.process_time() - c0) * 1000.0


def run_timing(models, batch, args, device):
    iters = dict.fromkeys(models, 0)
    for name, model in models.items():
        for _ in range(args.warmup):
            iters[name] += 1
            step(model, batch, iters[name])
    sync(device)
    times = {name: [] for name in models}
    cpu_times = {name: [] for name in models}
    names = list(models)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: no variant always runs first
        for name in order:
            for _ in range(args.steps):
                iters[name] += 1
                wall, cpu = timed_step(models[name], batch, iters[name], device)
                times[name].append(wall)
                cpu_times[name].append(cpu)
    return times, cpu_times, iters


def median_iqr(values):
    values = sorted(values)
    med = statistics.median(values)
    if len(values) < 2:
        return med, 0.0
    q = statistics.quantiles(values, n=4, method='inclusive')
    return med, q[2] - q[0]


# ---------------------------------------------------------------------------------------------------- memory
def _storage_key(t):
    try:
        s = t.untyped_storage()
        return (t.device.type, t.device.index, s.data_ptr()), s.nbytes()
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some views of sparse tensors)
        return None, 0


def saved_tensor_bytes(model, batch, it):
    """Bytes of unique storages autograd saves during one step, the model's own parameters and buffers excluded."""
    bare = model.get_bare_model(model.net_g)
    own = {_storage_key(t)[0] for t in list(bare.parameters()) + list(bare.buffers())}
    seen = {}

    def pack(t):
        key, nbytes = _storage_key(t)
        if key is not None and key not in own:
            seen[key] = max(seen.get(key, 0), nbytes)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(model, batch, it)
    return sum(seen.values())


def _profiler_memory_events(prof):
    """``(time_ns, nbytes)`` of the CPU allocation (+) and free (-) events a ``torch.profiler`` run recorded."""
    results = getattr(prof.profiler, 'kineto_results', None)
    if results is None:
        return None
    events = []
    for e in results.events():
        if e.name() == '[memory]' and str(e.device_type()).endswith('CPU'):
            events.append((e.start_ns(), e.nbytes()))
    return sorted(events)


def cpu_step_peak_bytes(model, batch, it):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(model, batch, it)
    events = _profiler_memory_events(prof)
    if events is None:
        return float('nan')
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def cuda_step_peak_bytes(model, batch, it, device):
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    step(model, batch, it)
    sync(device)
    return torch.cuda.max_memory_allocated(device) - start


def resident_bytes(model):
    bare = model.get_bare_model(model.net_g)
    total = sum(t.numel() * t.element_size() for t in list(bare.parameters()) + list(bare.buffers()))
    for opt in model.optimizers:
        for state in opt.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


def run_memory(models, batch, iters, device):
    peak, saved, resident = {}, {}, {}
    for name, model in models.items():
        iters[name] += 1
        saved[name] = saved_tensor_bytes(model, batch, iters[name])
        iters[name] += 1
        if device.type == 'cuda':
            peak[name] = cuda_step_peak_bytes(model, batch, iters[name], device)
        else:
            peak[name] = cpu_step_peak_bytes(model, batch, iters[name])
        resident[name] = resident_bytes(model)
    mb = 1024.0 * 1024.0
    return ({k: v / mb for k, v in peak.items()}, {k: v / mb for k, v in saved.items()},
            {k: v / mb for k, v in resident.items()})


# ---------------------------------------------------------------------------------------------------- report
def _r(x, nd=3):
    return round(float(x), nd) if math.isfinite(x) else None


def table(result):
    def fmt(key, name, spec='.1f'):
        value = result.get(key, {}).get(name)
        return '-' if value is None else format(value, spec)

    rows = [('variant', 'median ms', 'IQR ms', 'min ms', 'x qat', 'cpu ms', 'cpu x qat', 'peak MB', 'saved MB')]
    for name in result['step_ms']:
        rows.append((name + (' (default)' if name == DEFAULT_MODE else ''), fmt('step_ms', name),
                     fmt('iqr_ms', name), fmt('min_ms', name), fmt('ratio_to_qat', name, '.3f'),
                     fmt('cpu_ms', name), fmt('cpu_ratio_to_qat', name, '.3f'), fmt('peak_mem_mb', name),
                     fmt('saved_mb', name)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [' | '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, '-+-'.join('-' * w for w in widths))
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device('cuda' if args.device == 'cuda' or (args.device == 'auto' and torch.cuda.is_available())
                          else 'cpu')
    if args.threads is not None or device.type == 'cpu':
        torch.set_num_threads(args.threads or 1)
    wall0 = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix='odm_bench_') as tmp:
        fp_ckpt = os.path.join(tmp, 'fp.pth')
        base = base_options(args, device, fp_ckpt)
        seed_everything()
        fp_net = ARCH_REGISTRY.get(args.arch)(**{k: v for k, v in base['network_g']['arch'].items() if k != 'type'})
        fp_state = {k: v.detach().clone() for k, v in fp_net.state_dict().items()}
        torch.save({'params': fp_state}, fp_ckpt)
        del fp_net
        models = {v: build_model(variant_options(base, v), v) for v in args.modes}
    check_same_fp_weights(models, fp_state)
    batch = {k: v.to(device) for k, v in fixed_batch(base).items()}
    setup_s = time.perf_counter() - wall0

    times, cpu_times, iters = run_timing(models, batch, args, device)
    stats = {k: median_iqr(v) for k, v in times.items()}
    step_ms = {k: s[0] for k, s in stats.items()}
    ratio = {k: v / step_ms['qat'] for k, v in step_ms.items()}
    result = {'step_ms': step_ms, 'iqr_ms': {k: s[1] for k, s in stats.items()},
              'min_ms': {k: min(v) for k, v in times.items()}}
    if device.type == 'cpu':
        result['cpu_ms'] = {k: statistics.median(v) for k, v in cpu_times.items()}
        result['cpu_ratio_to_qat'] = {k: v / result['cpu_ms']['qat'] for k, v in result['cpu_ms'].items()}
    if not args.no_memory:
        result['peak_mem_mb'], result['saved_mb'], result['resident_mb'] = run_memory(models, batch, iters, device)
    result['ratio_to_qat'] = ratio
    result['default'] = DEFAULT_MODE
    result['feature_over_qat'] = ratio.get(DEFAULT_MODE)
    if 'cpu_ratio_to_qat' in result:
        result['feature_over_qat_cpu_time'] = result['cpu_ratio_to_qat'].get(DEFAULT_MODE)
    result['target'] = TARGET_RATIO
    result['device'] = (torch.cuda.get_device_name(device) if device.type == 'cuda'
                        else f'cpu ({torch.get_num_threads()} threads)')
    result['torch'] = torch.__version__
    result['wall_s'] = time.perf_counter() - wall0
    result['config'] = {
        'arch': base['network_g']['arch'], 'bits': args.bits, 'batch': args.batch, 'patch': args.patch,
        'gt_patch': args.patch * args.scale, 'steps': args.steps, 'warmup': args.warmup, 'rounds': args.rounds,
        'samples_per_variant': args.steps * args.rounds, 'threads': torch.get_num_threads(),
        'calib_batches': args.calib_batches, 'reg_opt': REG_OPT, 'offsets': OFFSETS, 'optimizer': 'Adam',
        'ema_decay': 0, 'memory': None if args.no_memory else (
            'cuda max_memory_allocated - memory_allocated at step start' if device.type == 'cuda'
            else 'torch.profiler profile_memory: peak of running alloc/free sum over one step'),
        'setup_s': setup_s,
    }

    def clean(obj):
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()}
        if isinstance(obj, float):
            return _r(obj, 4)
        return obj

    result = clean(result)
    if not args.json_only:
        print(f'device: {result["device"]}, torch {result["torch"]}; {args.arch} num_feat={args.num_feat} '
              f'num_block={args.num_block} x{args.scale} W{args.bits}A{args.bits}; batch {args.batch} x '
              f'{args.patch}x{args.patch} LR; {args.steps} steps x {args.rounds} rounds (+{args.warmup} warm-up)')
        print(table(result))
        f = result['feature_over_qat']
        if f is not None:
            verdict = 'OK' if f <= TARGET_RATIO else 'OVER TARGET'
            cpu = result.get('feature_over_qat_cpu_time')
            cpu = f'; by process CPU time {cpu:.3f}x' if cpu is not None else ''
            print(f'default ODM mode ({DEFAULT_MODE}) / qat step time = {f:.3f}x (median wall time{cpu}; '
                  f'target <= {TARGET_RATIO}x): {verdict}')
        print(f'wall time {result["wall_s"]:.1f} s after imports (model setup and calibration {setup_s:.1f} s)')
        sys.stdout.flush()
    print(json.dumps(result, sort_keys=False))
    return result


if __name__ == '__main__':
    main()
