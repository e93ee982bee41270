#!/usr/bin/env python
"""Deployment study: weight grid (midrise / midtread), zero-aligned activation grid ("nudging") and 8-bit output
quantizers, measured on calibration alone, after short plain QAT, and after odm-export (deploy form, onnxruntime).

Per network (the published RLFN, an EDSR trained here from scratch or given), bit width (W = A) and arm:

1. ``calib``: FP calibration of the ``Quantized`` network on LR training patches (no training); Y-PSNR on the
   benchmark sets of its fake-quantization network;
2. ``qat``: plain QAT from the FP weights (``ODMModel``, ``cooperation: off``, a real ``python -m odm_basicsr.train``
   run written and run by ``odm_basicsr.study``, as the mini-study's are); Y-PSNR of the trained fake-quantization
   network (``odm_basicsr.scoring``);
3. ``export``: ``odm-export --output-quant auto`` of that checkpoint (run in this process through
   ``odm_basicsr.export.run``; the equivalent command line is recorded), calibrating the output quantizers it adds on
   LR crops of training images (``<out>/calib_lr/x<scale>``, not test data); its ``export.json`` numbers, plus the
   deploy form with only the trained output quantizers (``to_deploy(output_quant='trained')``: the nudge alone).

Each run's result is ``<out>/runs/<run>.json``; a run whose result exists is skipped, so rerunning the same command
resumes the study (an interrupted QAT run resumes from its last training state). ``<out>/study.json`` and
``<out>/study.md`` are rewritten after every run. See ``--help`` for the arms and defaults; docs/DEPLOY_STUDY.md for
the measured study.
"""
# ruff: noqa: I001
import argparse
import datetime
import fnmatch
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import time
from argparse import Namespace

import odm_basicsr.plugin  # noqa: F401  (BasicSR fixes + registration first)
from odm_basicsr import scoring
from odm_basicsr.demo.recipe import edsr_arch
from odm_basicsr.study.argtypes import (bit_width, check_benchmarks, given_together, positive_int,
                                        pretrained_network, train_images)
from odm_basicsr.study.data import (BENCHMARKS, DEFAULT_DATA, DEFAULT_TRAIN_SETS, benchmark_pairs, bicubic_lr,
                                    hr_images, paired_dataset_opt, prepare_paired_data)
from odm_basicsr.study.options import BATCH, CALIB_BATCHES, FP_LR, FP_SEED, LR_PATCH, QAT_LR, fp_options, qat_options
from odm_basicsr.study.results import fmt_time, load_average, machine_info, mean_std, write_json, write_results
from odm_basicsr.study.runner import Stage, load_json, run_stage
from odm_basicsr.tool_cli import ToolError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from calibration_study import calibration_batches  # noqa: E402

#: arm -> network_g options (on top of type, arch, w_bits, a_bits). Order: the tiers of DEFAULT_ARMS first.
ARMS = {
    'midrise_free': {'act_grid': 'free', 'weight_grid': 'midrise'},
    'midrise_aligned': {'act_grid': 'aligned', 'weight_grid': 'midrise'},
    'midtread_aligned': {'act_grid': 'aligned', 'weight_grid': 'midtread'},
    'midtread_aligned_out': {'act_grid': 'aligned', 'weight_grid': 'midtread', 'output_quant': 'auto'},
    'midrise_aligned_out': {'act_grid': 'aligned', 'weight_grid': 'midrise', 'output_quant': 'auto'},
}
#: Arms run after every other arm of every network (dropped first when time runs short).
LATE_ARMS = ('midrise_aligned_out',)
NETWORKS = ('rlfn', 'edsr')
TIE_DB = 0.05  # with one seed, |delta| below this is a tie

DEFAULT_RLFN_OPT = os.path.join('odm_basicsr', 'options', 'test', 'RLFN', 'test_RLFN_x4.yml')
DEFAULT_RLFN_CKPT = os.path.join(DEFAULT_DATA, 'pretrained', 'RLFN_cut_x4_ntire22.pth')
DEFAULT_RLFN_QAT_ITERS = 200
DEFAULT_EDSR_FEAT = 64
DEFAULT_EDSR_BLOCK = 16
DEFAULT_EDSR_SCALE = 4
DEFAULT_EDSR_FP_ITERS = 1500
DEFAULT_EDSR_QAT_ITERS = 100
DEFAULT_BITS = (4, 2)
DEFAULT_CALIB_SET = 'BSD200'

# The training recipe (FP_LR halved at 2/3, FP_SEED, QAT_LR constant, BATCH, LR_PATCH) is odm_basicsr.study.options's,
# shared with scripts/mini_study.py; CALIB_BATCHES batches of --batch LR patches make the calib row and ODMModel's
# calibration.
PROG = 'deploy_study.py'
EXPORT_CALIB_IMAGES = 8
EXPORT_CALIB_LR = 80  # LR side of the export calibration crops (BSD200 is 481 x 321: 320 px HR at x4)

EPILOG = f"""\
arms (network_g options; every arm W<b>A<b>, the network's default layer set):
  midrise_free          act_grid free, weight_grid midrise (today's defaults), no output quantizers
  midrise_aligned       act_grid aligned (zero-aligned activation grid, what the integer network computes)
  midtread_aligned      act_grid aligned, weight_grid midtread (2**b - 1 weight levels with a zero level)
  midtread_aligned_out  as midtread_aligned + output_quant: auto (8-bit output quantizers, trained with)
  midrise_aligned_out   as midrise_aligned + output_quant: auto; run after all other arms of all networks
per run: calib (FP calibration, {CALIB_BATCHES} batches of LR patches of --calib-set, no training), qat (ODMModel,
  cooperation off, Adam lr {QAT_LR:g} constant, --batch, --lr-patch, train.calibration.batches {CALIB_BATCHES}), export
  (odm-export --output-quant auto --calib <out>/calib_lr/x<scale> --sets Set5 Set14: sizes, onnxruntime integer
  convs, psnr trained / deploy / onnxruntime, onnxruntime vs deploy parity), and deploy_trained_outq (the deploy
  form with only the trained output quantizers: the nudge of a free grid alone, no export-added quantizer).
networks:
  rlfn   the published RLFN (--rlfn-opt, --rlfn-checkpoint), no FP training
  edsr   EDSR (--edsr-feat x --edsr-block, x--edsr-scale) trained here from scratch (stage edsr_fp: lr {FP_LR:g}
         halved at 2/3, seed {FP_SEED}, --edsr-fp-iters), or --edsr-opt/--edsr-checkpoint (an FP EDSR)
statistics:
  Y-PSNR (dB), border = scale, BasicSR's calculate_psnr, mean over a set. Deltas are paired per seed; with one
  seed |delta| < {TIE_DB} dB is called a tie, with more a tie when |mean| < max({TIE_DB}, 2 x std of the paired
  differences).
defaults and timing (2-core CPU VM, shared; see docs/DEPLOY_STUDY.md for the measured times):
  measured per iteration (batch 8, LR patch 24): RLFN QAT 0.5 (W4) to 0.85 s (W2, aligned, output quantizers),
  EDSR 64x16 FP 0.6 s, QAT 0.9 (W4) to 1.4-2.1 s (W2), on idle cores; two to four times that while other jobs
  share the machine (measured in the study: a calibration-only evaluation took 2 s idle and 70 s loaded). Hence
  RLFN {DEFAULT_RLFN_QAT_ITERS} QAT iterations, EDSR {DEFAULT_EDSR_FP_ITERS} FP and {DEFAULT_EDSR_QAT_ITERS} QAT
  iterations (first planned: 2500 and 150, cut when the shared machine ran 2-4x slower).
"""


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', required=True, help='work folder (rerun with the same folder to resume)')
    p.add_argument('--data', default=DEFAULT_DATA,
                   help=f'data root with train/<set>/ and benchmark/<Set>/HR, LRbicx<scale> (default {DEFAULT_DATA})')
    p.add_argument('--networks', nargs='+', choices=NETWORKS, default=list(NETWORKS))
    p.add_argument('--bits', nargs='+', type=bit_width, default=list(DEFAULT_BITS),
                   help='W=A bit widths (default 4 2)')
    p.add_argument('--arms', nargs='+', choices=list(ARMS), default=list(ARMS), help='default: all')
    p.add_argument('--seeds', nargs='+', type=int, default=[0], help='QAT seeds (default 0)')
    p.add_argument('--train-sets', nargs='+', default=list(DEFAULT_TRAIN_SETS), metavar='SET',
                   help=f'subfolders of <data>/train for training (default {" ".join(DEFAULT_TRAIN_SETS)})')
    p.add_argument('--calib-set', default=DEFAULT_CALIB_SET,
                   help='<data>/train subfolder for calibration patches and export crops '
                   f'(default {DEFAULT_CALIB_SET})')
    p.add_argument('--sets', nargs='+', default=list(BENCHMARKS), help='benchmark sets (default Set5 Set14)')
    p.add_argument('--batch', type=positive_int, default=BATCH)
    p.add_argument('--lr-patch', type=positive_int, default=LR_PATCH)
    p.add_argument('--rlfn-opt', default=DEFAULT_RLFN_OPT, help=f'default {DEFAULT_RLFN_OPT}')
    p.add_argument('--rlfn-checkpoint', default=DEFAULT_RLFN_CKPT, help=f'default {DEFAULT_RLFN_CKPT}')
    p.add_argument('--rlfn-qat-iters', type=positive_int, default=DEFAULT_RLFN_QAT_ITERS)
    p.add_argument('--edsr-opt', help='option file of a trained FP EDSR (with --edsr-checkpoint): no FP training')
    p.add_argument('--edsr-checkpoint')
    p.add_argument('--edsr-feat', type=positive_int, default=DEFAULT_EDSR_FEAT)
    p.add_argument('--edsr-block', type=positive_int, default=DEFAULT_EDSR_BLOCK)
    p.add_argument('--edsr-scale', type=int, choices=(2, 3, 4), default=DEFAULT_EDSR_SCALE)
    p.add_argument('--edsr-fp-iters', type=positive_int, default=DEFAULT_EDSR_FP_ITERS)
    p.add_argument('--edsr-qat-iters', type=positive_int, default=DEFAULT_EDSR_QAT_ITERS)
    p.add_argument('--edsr-sets', nargs='+', help='benchmark sets of the EDSR runs (default: --sets); EDSR-baseline '
                   'x4 on Set14 costs about 6x Set5 per evaluation')
    p.add_argument('--exporter', default='auto', choices=('auto', 'dynamo', 'torchscript'),
                   help='odm-export --exporter (default auto)')
    p.add_argument('--latency-size', type=int, default=64, help='odm-export --latency-size (0: skip; default 64)')
    p.add_argument('--no-export', action='store_true', help='skip step 3 (export)')
    p.add_argument('--redo-export', metavar='PATTERN',
                   help='redo step 3 (export) of finished runs whose name matches this glob (e.g. "rlfn_*") and whose '
                   'export was made by other code (another commit or other uncommitted changes under odm_basicsr/)')
    p.add_argument('--collect-only', action='store_true',
                   help='train, calibrate and export nothing: write study.json / study.md from the finished runs of '
                   'the plan (e.g. after stopping a study part-way through its seeds)')
    p.add_argument('--report-only', action='store_true',
                   help='only rewrite <out>/study.md and the summary of <out>/study.json from study.json (after a '
                   'change to the tables); runs nothing')
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.seeds = list(dict.fromkeys(args.seeds))
    args.bits = list(dict.fromkeys(args.bits))
    args.arms = [a for a in ARMS if a in args.arms]
    given_together(parser, ('--edsr-opt', '--edsr-checkpoint'), (args.edsr_opt, args.edsr_checkpoint))
    nets = {}
    for name in args.networks:
        if name == 'rlfn':
            opt_path, ckpt = args.rlfn_opt, args.rlfn_checkpoint
            iters = args.rlfn_qat_iters
        elif args.edsr_opt:
            opt_path, ckpt = args.edsr_opt, args.edsr_checkpoint
            iters = args.edsr_qat_iters
        else:
            arch = edsr_arch(Namespace(num_feat=args.edsr_feat, num_block=args.edsr_block, scale=args.edsr_scale))
            nets[name] = dict(arch=arch, scale=args.edsr_scale, checkpoint=None, param_key='params',
                              qat_iters=args.edsr_qat_iters, fp_iters=args.edsr_fp_iters, trained_here=True,
                              sets=list(args.edsr_sets or args.sets))
            continue
        arch, scale, key = pretrained_network(parser, opt_path, ckpt, f'{name}: ')
        nets[name] = dict(arch=arch, scale=scale, checkpoint=os.path.abspath(ckpt), param_key=key,
                          qat_iters=iters, fp_iters=None, trained_here=False, opt_file=opt_path,
                          sets=list(args.edsr_sets or args.sets) if name == 'edsr' else list(args.sets))
    args.nets = nets
    args.hr_images = train_images(parser, args.data, args.train_sets)
    if not os.path.isdir(os.path.join(args.data, 'train', args.calib_set)):
        parser.error(f'--calib-set: folder not found: {os.path.join(args.data, "train", args.calib_set)}')
    for spec in nets.values():
        check_benchmarks(parser, args.data, spec['sets'], spec['scale'])
    return args


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------

def make_calib_crops(data, calib_set, scale, folder, n=EXPORT_CALIB_IMAGES, lr_size=EXPORT_CALIB_LR, seed=0):
    """``n`` LR crops (MATLAB bicubic of random HR crops of ``<data>/train/<calib_set>``) as PNGs in ``folder``,
    for the output quantizers odm-export adds. Existing crops are kept. Returns the folder."""
    import cv2
    import numpy as np

    os.makedirs(folder, exist_ok=True)
    if len([f for f in os.listdir(folder) if f.endswith('.png')]) >= n:
        return folder
    paths = hr_images(os.path.join(data, 'train', calib_set))
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(paths), size=min(n, len(paths)), replace=False)
    for i, k in enumerate(picks):
        img = cv2.imread(paths[k], cv2.IMREAD_COLOR)
        h, w = img.shape[:2]
        side = min(lr_size * scale, h, w)
        side -= side % scale
        y, x = rng.integers(h - side + 1), rng.integers(w - side + 1)
        cv2.imwrite(os.path.join(folder, f'calib_{i:02d}.png'), bicubic_lr(img[y:y + side, x:x + side], scale))
    return folder


def psnr_sets(net, sets, scale, device):
    """Mean Y-PSNR per set (BasicSR's calculate_psnr, border = scale) of ``net`` on preloaded pairs."""
    out = {}
    for name, pairs in sets.items():
        values = [scoring.y_psnr(img, gt, scale)
                  for img, (_, _, gt) in zip(scoring.sr_images(net, pairs, device, scale), pairs)]
        out[name] = float(sum(values) / len(values))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Networks and stages
# ---------------------------------------------------------------------------------------------------------------

def quant_options(spec, bits, arm):
    return {'type': 'Quantized', 'arch': dict(spec['arch']), 'w_bits': bits, 'a_bits': bits, **ARMS[arm]}


def fp_checkpoint(spec, out):
    return spec['checkpoint'] or os.path.join(out, 'experiments', 'edsr_fp', 'models', 'net_g_latest.pth')


def edsr_fp_stage(spec, train_set):
    opt = fp_options('edsr_fp', spec['scale'], 'cpu', train_set, spec['fp_iters'], spec['arch'])
    opt['logger']['save_checkpoint_freq'] = max(1, spec['fp_iters'] // 5)  # resumable
    return Stage('edsr_fp', 'fp', 32, opt)


def qat_stage(net_name, spec, bits, arm, seed, train_set, out):
    name = run_name(net_name, bits, arm, seed)
    opt = qat_options(name, spec['scale'], 'cpu', train_set, spec['qat_iters'], quant_options(spec, bits, arm),
                      fp_checkpoint(spec, out), seed)
    opt['path']['param_key_g'] = spec['param_key']  # None: a plain state dict (the published RLFN)
    opt['train']['cooperation'] = 'off'
    return Stage(name, arm, bits, opt)


def run_name(net_name, bits, arm, seed):
    return f'{net_name}_w{bits}_{arm}_s{seed}'


def calibrated_network(spec, bits, arm, seed, args, out, device):
    """The ``Quantized`` network of ``arm`` with the FP weights and FP-calibrated ranges (no training)."""
    import torch

    from odm_basicsr.checkpoint import read_state
    from odm_basicsr.network_options import build_network
    from odm_basicsr.quant import calibrate

    net = build_network(quant_options(spec, bits, arm))
    path = fp_checkpoint(spec, out)
    state = read_state(path, spec['param_key'])[1]
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or any('quant' not in k for k in missing):
        raise SystemExit(f'{path} does not fit {spec["arch"]["type"]}: missing {missing}, unexpected {unexpected}')
    net.to(device).eval()
    torch.manual_seed(seed)
    batches = calibration_batches(args.data, args.calib_set, spec['scale'], CALIB_BATCHES, args.batch,
                                  args.lr_patch, seed=seed)
    calibrate(net, [b.to(device) for b in batches])
    return net


def export_run(stage_ckpt, opt_path, export_dir, calib_dir, args, sets):
    """odm-export in this process; returns (report, the equivalent command line)."""
    from odm_basicsr import export as ex

    argv = ['-opt', opt_path, '--checkpoint', stage_ckpt, '--out', export_dir, '--param-key', 'params',
            '--data', os.path.join(os.path.abspath(args.data), 'benchmark'), '--sets', *sets,
            '--calib', calib_dir, '--output-quant', 'auto', '--exporter', args.exporter,
            '--latency-size', str(args.latency_size)]
    command = shlex.join(['odm-export'] + argv)
    json_path = os.path.join(export_dir, 'export.json')
    if os.path.isfile(json_path):
        report = load_json(json_path)
        if report is not None:
            return report, command
    report = ex.run(ex.build_parser().parse_args(argv))
    return report, command


def summarize_export(report):
    """The study's share of an export.json: sizes, convs, parity means (no per-image rows)."""
    keep = {k: report.get(k) for k in ('sizes', 'max_nudge_steps', 'compact_reload_bit_identical', 'latency',
                                       'seconds')}
    keep['quantized_layers'] = len(report.get('quantized_layers') or [])
    keep['added_output_quantizers'] = len(report.get('added_output_quantizers') or [])
    o = report.get('onnxruntime') or {}
    keep['onnxruntime'] = {k: o.get(k) for k in ('integer_convs', 'float_convs', 'quantized_convs')}
    keep['parity'] = {s: {k: v for k, v in p.items() if k != 'per_image'}
                      for s, p in (report.get('parity') or {}).items()}
    return keep


def deploy_trained_outq(ckpt, net_opt, sets, scale, device):
    """Y-PSNR of the deploy form with only the trained output quantizers (none added): the nudge alone."""
    from odm_basicsr.deploy import to_deploy

    net = scoring.load_network(net_opt, ckpt, 'cpu', 'params')
    deployed, summary = to_deploy(net, output_quant='trained')
    nudges = [abs(v) for v in summary['nudged'].values()]
    return {**psnr_sets(deployed.to(device), sets, scale, device),
            'mean_nudge_steps': (sum(nudges) / len(nudges)) if nudges else 0.0}


# ---------------------------------------------------------------------------------------------------------------
# Summary and tables
# ---------------------------------------------------------------------------------------------------------------

def _get(run, path):
    cur = run
    for k in path:
        if not isinstance(cur, dict) or cur.get(k) is None:
            return None
        cur = cur[k]
    return cur


def _verdict(diffs):
    mean, std = mean_std(diffs)
    if mean is None:
        return None, None, None
    bound = TIE_DB if std is None else max(TIE_DB, 2 * std)
    return mean, std, 'tie' if abs(mean) < bound else ('better' if mean > 0 else 'worse')


#: (label, arm a, arm b, measure path in a, measure path in b): delta = a - b, paired per seed.
def comparisons(sets):
    out = []
    paths = {stage: (('export', 'parity', '{s}', 'psnr_deploy') if stage == 'deploy' else (stage, '{s}'))
             for stage in ('calib', 'qat', 'deploy')}
    for stage, path in paths.items():
        out.append((f'weight grid: midtread - midrise (aligned, {stage})', 'midtread_aligned', 'midrise_aligned',
                    path, path))
    for stage, path in paths.items():
        out.append((f'weight grid: midtread - midrise (aligned + out, {stage})', 'midtread_aligned_out',
                    'midrise_aligned_out', path, path))
    for stage, path in paths.items():
        out.append((f'nudging: aligned - free (midrise, {stage})', 'midrise_aligned', 'midrise_free', path, path))
    out += [
        ('nudging at export (+ bias rounding): free network, nudged grid - trained', 'midrise_free', 'midrise_free',
         ('deploy_trained_outq', '{s}'), ('qat', '{s}')),
        ('int32 bias rounding alone: deploy (trained out-quant only) - trained (midrise_aligned)', 'midrise_aligned',
         'midrise_aligned', ('deploy_trained_outq', '{s}'), ('qat', '{s}')),
        ('int32 bias rounding alone: deploy (trained out-quant only) - trained (midtread_aligned)',
         'midtread_aligned', 'midtread_aligned', ('deploy_trained_outq', '{s}'), ('qat', '{s}')),
        ('int32 bias rounding alone: deploy - trained (midtread_aligned_out)', 'midtread_aligned_out',
         'midtread_aligned_out', ('export', 'parity', '{s}', 'psnr_deploy'), ('qat', '{s}')),
        ('output quantizer added at export alone: deploy - deploy without it (midtread_aligned)', 'midtread_aligned',
         'midtread_aligned', ('export', 'parity', '{s}', 'psnr_deploy'), ('deploy_trained_outq', '{s}')),
        ('output quantizer added at export alone: deploy - deploy without it (midrise_aligned)', 'midrise_aligned',
         'midrise_aligned', ('export', 'parity', '{s}', 'psnr_deploy'), ('deploy_trained_outq', '{s}')),
        ('output quantizer trained: QAT with - QAT without (midtread_aligned)', 'midtread_aligned_out',
         'midtread_aligned', ('qat', '{s}'), ('qat', '{s}')),
        ('output quantizer trained vs added at export: deployed (midtread_aligned)', 'midtread_aligned_out',
         'midtread_aligned', ('export', 'parity', '{s}', 'psnr_deploy'), ('export', 'parity', '{s}', 'psnr_deploy')),
        ('output quantizer trained vs added at export: deployed (midrise_aligned)', 'midrise_aligned_out',
         'midrise_aligned', ('export', 'parity', '{s}', 'psnr_deploy'), ('export', 'parity', '{s}', 'psnr_deploy')),
        ('all-integer deploy, midtread_aligned_out - midrise_free exported', 'midtread_aligned_out', 'midrise_free',
         ('export', 'parity', '{s}', 'psnr_deploy'), ('export', 'parity', '{s}', 'psnr_deploy')),
    ]
    return out


def summarize(runs, sets):
    by = {}
    for r in runs:
        by.setdefault((r['network'], r['bits'], r['arm']), {})[r['seed']] = r
    rows = []
    for net, bits in sorted({(r['network'], r['bits']) for r in runs}, key=lambda k: (k[0], -k[1])):
        for label, a, b, pa, pb in comparisons(sets):
            ga, gb = by.get((net, bits, a), {}), by.get((net, bits, b), {})
            row = {'network': net, 'bits': bits, 'comparison': label, 'sets': {}}
            for s in sets:
                diffs = []
                for seed in sorted(set(ga) & set(gb)):
                    va = _get(ga[seed], [k.format(s=s) for k in pa])
                    vb = _get(gb[seed], [k.format(s=s) for k in pb])
                    if va is not None and vb is not None:
                        diffs.append(va - vb)
                mean, std, verdict = _verdict(diffs)
                if mean is not None:
                    row['sets'][s] = {'delta': mean, 'std': std, 'n': len(diffs), 'verdict': verdict}
            if row['sets']:
                rows.append(row)
    return rows


def _f(v, digits=2, signed=False):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return '-' if v is None else str(v)
    return f'{v:+.{digits}f}' if signed else f'{v:.{digits}f}'


def _mean_over_seeds(group, path):
    vals = [v for v in (_get(r, path) for r in group) if v is not None]
    return statistics.fmean(vals) if vals else None


def format_markdown(study):
    s = study['settings']
    sets = s['sets']
    lines = ['# Deployment study: weight grid, activation-grid nudging, output quantizers', '',
             f'Command: `{study["command"]}`  ', f'Date: {study["date"]}  ',
             f'Machine: {study["machine"]["summary"]}; load average at start '
             f'{study["machine"]["load_average_at_start"]}, now {study["machine"]["load_average_at_end"]}  ',
             f'Wall time of this invocation: {fmt_time(study["total_wall_s"])} (m:ss); runs finished: '
             f'{len(study["runs"])}; seeds {", ".join(map(str, s["seeds"]))}', '',
             f'QAT: ODMModel, cooperation off, Adam lr {QAT_LR:g} constant, batch {s["batch"]}, LR patch '
             f'{s["lr_patch"]}, training data {", ".join(s["train_sets"])}; calibration {CALIB_BATCHES} batches '
             f'(calib row: LR patches of {s["calib_set"]}). Export: odm-export --output-quant auto, output '
             f'quantizers calibrated on {EXPORT_CALIB_IMAGES} LR crops of {s["calib_set"]}. Y-PSNR (dB), '
             'border = scale, mean over seeds.', '']
    for net, info in study['fp'].items():
        spec = s['networks'][net]
        lines.append(f'- {net}: {spec["arch"]["type"]} x{spec["scale"]}, '
                     + (f'FP trained here ({spec["fp_iters"]} iterations), ' if spec['trained_here'] else
                        f'FP {spec["checkpoint"]}, ')
                     + f'QAT {spec["qat_iters"]} iterations; FP '
                     + ', '.join(f'{k} {_f(info.get(k))}' for k in sets))
    lines.append('')
    by = {}
    for r in study['runs']:
        by.setdefault((r['network'], r['bits']), {}).setdefault(r['arm'], []).append(r)
    header = ['network', 'W/A', 'arm'] + [f'calib {x}' for x in sets] + [f'QAT {x}' for x in sets] \
        + [f'deploy {x}' for x in sets] + [f'ORT {x}' for x in sets] + [f'nudged only {x}' for x in sets]
    lines += ['## PSNR at each step', '',
              'calib: FP calibration only; QAT: trained fake-quantization network; deploy: odm-export deploy form '
              '(output quantizers added where missing, activation grids aligned); ORT: onnxruntime on the '
              'exported integer model; nudged only: deploy form with the trained output quantizers only.', '',
              '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for (net, bits), arms in sorted(by.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        for arm in ARMS:
            if arm not in arms:
                continue
            g = arms[arm]
            cells = [net, f'W{bits}A{bits}', arm + (f' (n={len(g)})' if len(g) > 1 else '')]
            cells += [_f(_mean_over_seeds(g, ('calib', x))) for x in sets]
            cells += [_f(_mean_over_seeds(g, ('qat', x))) for x in sets]
            cells += [_f(_mean_over_seeds(g, ('export', 'parity', x, 'psnr_deploy'))) for x in sets]
            cells += [_f(_mean_over_seeds(g, ('export', 'parity', x, 'psnr_onnxruntime'))) for x in sets]
            cells += [_f(_mean_over_seeds(g, ('deploy_trained_outq', x))) for x in sets]
            lines.append('| ' + ' | '.join(cells) + ' |')
    header = ['network', 'W/A', 'arm', 'FP32 ckpt MB', 'compact MB', 'ONNX MB', 'integer / quantized convs',
              'float convs', 'out-quant added', 'max nudge (steps)'] \
        + [f'deploy − trained {x}' for x in sets] + ['ORT vs deploy: min PSNR', 'within 1 grey', 'max grey']
    lines += ['', '## Export (first seed)', '', '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for (net, bits), arms in sorted(by.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        for arm in ARMS:
            if arm not in arms or not arms[arm][0].get('export'):
                continue
            e = arms[arm][0]['export']
            z, o, par = e['sizes'], e['onnxruntime'], e['parity']
            cells = [net, f'W{bits}A{bits}', arm, _f(z['fp32_checkpoint'] / 1e6, 3), _f(z['compact'] / 1e6, 3),
                     _f(z['onnx'] / 1e6, 3) if z.get('onnx') else '-',
                     f'{o["integer_convs"]} / {o["quantized_convs"]}', str(o['float_convs']),
                     str(e['added_output_quantizers']), _f(e['max_nudge_steps'], 3)]
            cells += [_f(par[x]['psnr_deploy'] - par[x]['psnr_trained'], 3, True) if x in par else '-'
                      for x in sets]
            ort = [par[x] for x in sets if x in par and par[x].get('ort_vs_deploy_psnr') is not None]
            cells += [_f(min(p['ort_vs_deploy_psnr'] for p in ort), 1) if ort else '-',
                      (f'{100 * min(p["ort_vs_deploy_within_1"] for p in ort):.3f} %') if ort else '-',
                      str(max(p['ort_vs_deploy_max_grey'] for p in ort)) if ort else '-']
            lines.append('| ' + ' | '.join(cells) + ' |')
    lines += ['', '## Paired comparisons', '',
              f'Δ = a − b per seed, mean over seeds (dB). One seed: |Δ| < {TIE_DB} dB is a tie; more seeds: tie when '
              f'|Δ| < max({TIE_DB}, 2 × std). "better"/"worse" are for a.', '',
              '| network | W/A | comparison | ' + ' | '.join(f'Δ {x}' for x in sets) + ' |',
              '|---|---|---|' + '---|' * len(sets)]
    for row in study['summary']:
        cells = [row['network'], f'W{row["bits"]}A{row["bits"]}', row['comparison']]
        for x in sets:
            c = row['sets'].get(x)
            cells.append('-' if c is None else f'{c["delta"]:+.3f} ({c["verdict"]})')
        lines.append('| ' + ' | '.join(cells) + ' |')
    lines += ['', 'A CPU-scale study: short QAT runs, one seed unless stated; small differences are noise.', '']
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def code_version():
    """The last commit that changed odm_basicsr/ and its uncommitted changes there (the code this process imported)."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*cmd):
        try:
            return subprocess.run(['git', *cmd], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    return {'commit': git('log', '-1', '--format=%H', '--', 'odm_basicsr'),
            'odm_basicsr_changes': git('status', '--porcelain', 'odm_basicsr')}


def export_step(result, spec, sets, calib_dir, args, out, device, code):
    """Step 3 of a run, into ``result``: odm-export's numbers, and the deploy form with only the trained output
    quantizers (computed unless it is the export's own deploy form)."""
    name, arm, ckpt, opt_path = result['run'], result['arm'], result['checkpoint'], result['options']
    scale = spec['scale']
    for key in ('export', 'export_error', 'deploy_trained_outq'):
        result.pop(key, None)
    export_dir = os.path.join(out, 'exports', name)
    t0 = time.time()
    try:
        report, export_command = export_run(ckpt, opt_path, export_dir, calib_dir, args,
                                           spec['sets'])
        result['export'] = summarize_export(report)
        result['export']['command'] = export_command
    except ToolError as e:  # a failed export is a result
        result['export_error'] = str(e)[:500]
    result['export_wall_s'] = round(time.time() - t0, 1)
    t0 = time.time()
    added = _get(result, ('export', 'added_output_quantizers'))
    if added == 0 and not ARMS[arm]['act_grid'] == 'free':
        # nothing added, no nudge: the deploy form with the trained quantizers is the export's
        result['deploy_trained_outq'] = {x: result['export']['parity'][x]['psnr_deploy']
                                         for x in spec['sets'] if x in result['export']['parity']}
    else:
        result['deploy_trained_outq'] = deploy_trained_outq(ckpt, result['network_g'], sets, scale,
                                                            device)
        result['deploy_trained_outq']['seconds'] = round(time.time() - t0, 1)
    result['export_code'] = code or _export_code()
    return result


_EXPORT_CODE = []


def _export_code():
    """code_version() when this process first exported (odm_basicsr.export and .deploy are imported then)."""
    if not _EXPORT_CODE:
        _EXPORT_CODE.append(code_version())
    return _EXPORT_CODE[0]


def plan(args):
    """``[(network, bits, arm, seed)]`` in run order: seeds outermost, then the main arms of every network and bit
    width, then LATE_ARMS."""
    order = []
    for seed in args.seeds:
        for late in (False, True):
            for net in args.networks:
                for bits in args.bits:
                    for arm in args.arms:
                        if (arm in LATE_ARMS) == late:
                            order.append((net, bits, arm, seed))
    return order


def report_only(out):
    path = os.path.join(out, 'study.json')
    study = load_json(path)
    if study is None:
        raise SystemExit(f'{PROG}: error: --report-only: no study.json in {out}')
    study['summary'] = summarize(study['runs'], study['settings']['sets'])
    write_results(os.path.join(out, 'study'), study, format_markdown(study))
    print(format_markdown(study))
    return 0


def main(argv=None):
    if '--report-only' in (sys.argv[1:] if argv is None else argv):
        args = build_parser().parse_args(argv)
        return report_only(os.path.abspath(args.out))
    started, load_at_start = time.time(), load_average()
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    args = parse_args(argv)
    command = shlex.join(['python', 'scripts/deploy_study.py'] + (sys.argv[1:] if argv is None else list(argv)))
    cwd = os.getcwd()
    args.data = os.path.abspath(args.data)
    for spec in args.nets.values():
        if spec.get('opt_file'):
            spec['opt_file'] = os.path.abspath(spec['opt_file'])
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, 'runs'), exist_ok=True)
    import torch

    device = torch.device('cpu')

    def log(msg):
        print(msg, flush=True)

    log(f'deploy_study: work folder {out}')
    scales = sorted({spec['scale'] for spec in args.nets.values()})
    train_sets, bench, calib_dirs = {}, {}, {}
    for scale in scales:
        paired = prepare_paired_data(args.hr_images, os.path.join(out, f'data_x{scale}'), scale,
                                     args.lr_patch * scale, log, PROG)
        train_sets[scale] = (paired_dataset_opt(paired, scale, args.lr_patch, args.batch), paired[2])
        wanted = sorted({x for spec in args.nets.values() if spec['scale'] == scale for x in spec['sets']},
                        key=lambda x: (x not in args.sets, x))
        bench[scale] = {name: benchmark_pairs(args.data, name, scale) for name in wanted}
        calib_dirs[scale] = make_calib_crops(args.data, args.calib_set, scale,
                                             os.path.join(out, 'calib_lr', f'x{scale}'))

    code = code_version()
    all_sets = list(dict.fromkeys(args.sets + [x for spec in args.nets.values() for x in spec['sets']]))
    settings = {'networks': args.nets, 'bits': args.bits, 'arms': args.arms, 'seeds': args.seeds,
                'train_sets': args.train_sets, 'calib_set': args.calib_set, 'sets': all_sets, 'batch': args.batch,
                'lr_patch': args.lr_patch, 'qat_lr': QAT_LR, 'fp_lr': FP_LR, 'calibration_batches': CALIB_BATCHES,
                'export_calib_images': EXPORT_CALIB_IMAGES, 'export_calib_lr': EXPORT_CALIB_LR,
                'exporter': args.exporter, 'latency_size': args.latency_size, 'data': args.data,
                'train_images': {s: n for s, (_, n) in train_sets.items()}, 'code': code}
    runs, fp = [], {}

    def write_study():
        study = {'command': command, 'cwd': cwd,
                 'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
                 'settings': settings, 'fp': fp, 'runs': runs, 'summary': summarize(runs, all_sets),
                 'total_wall_s': round(time.time() - started, 1),
                 'machine': machine_info(device, load_at_start)}
        write_results(os.path.join(out, 'study'), study, format_markdown(study))
        return study

    os.chdir(out)
    try:
        for net_name, bits, arm, seed in plan(args):
            spec = args.nets[net_name]
            scale = spec['scale']
            sets = {x: bench[scale][x] for x in spec['sets']}
            if args.collect_only:
                done = load_json(os.path.join('runs', f'{run_name(net_name, bits, arm, seed)}.json'))
                cached_fp = load_json(os.path.join('runs', f'{net_name}_fp.json'))
                if cached_fp is not None:
                    fp[net_name] = cached_fp
                if done is not None:
                    runs.append(done)
                continue
            if net_name not in fp:  # the FP start (trained here for EDSR) and its PSNR
                fp_path = os.path.join('runs', f'{net_name}_fp.json')
                cached = load_json(fp_path)
                if cached is None:
                    rec = {}
                    if spec['trained_here']:
                        rec = run_stage(edsr_fp_stage(spec, train_sets[scale][0]), log, PROG)
                    t0 = time.time()
                    fp_net = scoring.load_network(spec['arch'], fp_checkpoint(spec, out), device, 'params')
                    cached = {**psnr_sets(fp_net, sets, scale, device),
                              'checkpoint': fp_checkpoint(spec, out), 'train_wall_s': rec.get('train_wall_s'),
                              'eval_s': round(time.time() - t0, 1)}
                    write_json(fp_path, cached)
                fp[net_name] = cached
                log(json.dumps({'run': f'{net_name}_fp', **cached}))
            name = run_name(net_name, bits, arm, seed)
            result_path = os.path.join('runs', f'{name}.json')
            result = load_json(result_path)
            if result is not None:
                if (args.redo_export and not args.no_export and fnmatch.fnmatch(name, args.redo_export)
                        and result.get('export_code') != code_version()):
                    log(f'[{name}] finished earlier; redoing its export with the current code')
                    shutil.rmtree(os.path.join(out, 'exports', name), ignore_errors=True)
                    export_step(result, spec, sets, calib_dirs[scale], args, out, device, None)
                    write_json(result_path, result)
                    write_study()
                else:
                    log(f'[{name}] skipped: {result_path} exists')
                runs.append(result)
                continue
            partial_path = os.path.join('runs', f'{name}.partial.json')
            part = load_json(partial_path) or {}
            if 'calib' not in part:
                t0 = time.time()
                net = calibrated_network(spec, bits, arm, seed, args, out, device)
                part['calib'] = {**psnr_sets(net, sets, scale, device), 'seconds': round(time.time() - t0, 1)}
                del net
                write_json(partial_path, part)
            stage = qat_stage(net_name, spec, bits, arm, seed, train_sets[scale][0], out)
            rec = run_stage(stage, log, PROG)
            ckpt = os.path.join(out, stage.checkpoint)
            opt_path = os.path.join(out, 'options', f'{stage.name}.yml')
            if 'qat' not in part:
                t0 = time.time()
                net = scoring.load_network(stage.opt['network_g'], ckpt, device, 'params')
                part['qat'] = {**psnr_sets(net, sets, scale, device), 'train_wall_s': rec.get('train_wall_s'),
                               'iters': stage.opt['train']['total_iter'], 'eval_s': round(time.time() - t0, 1)}
                del net
                write_json(partial_path, part)
            result = {'run': name, 'network': net_name, 'bits': bits, 'arm': arm, 'seed': seed,
                      'network_g': stage.opt['network_g'], 'options': opt_path, 'checkpoint': ckpt, **part}
            if not args.no_export:
                export_step(result, spec, sets, calib_dirs[scale], args, out, device, None)
            write_json(result_path, result)
            if os.path.isfile(partial_path):
                os.remove(partial_path)
            runs.append(result)
            line = {k: result[k] for k in ('run', 'calib', 'qat')}
            if 'export' in result:
                line['export'] = {'integer_convs': result['export']['onnxruntime']['integer_convs'],
                                  'parity': {x: {k: v for k, v in p.items() if k != 'images'}
                                             for x, p in result['export']['parity'].items()}}
            line['deploy_trained_outq'] = result.get('deploy_trained_outq')
            if 'export_error' in result:
                line['export_error'] = result['export_error']
            log(json.dumps(line))
            write_study()
        study = write_study()
    finally:
        os.chdir(cwd)
    log('')
    log(format_markdown(study))
    log(f'Results: {out}/study.md, {out}/study.json')
    return 0


if __name__ == '__main__':
    sys.exit(main())
