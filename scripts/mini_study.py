#!/usr/bin/env python
"""A small-scale, rerunnable ODM study: several QAT arms x layer sets x seeds from one cached FP start.

Trains on HR images of ``<data>/train/<set>`` (LR made once with BasicSR's MATLAB bicubic into
``<out>/data_x<scale>/``), evaluates on ``<data>/benchmark/Set5`` and ``Set14`` (HR + LRbicx<scale>), and writes
``<out>/study.md`` and ``<out>/study.json``. Each stage is a real ``python -m odm_basicsr.train -opt`` run, written
and run as odm-demo's stages are; a finished run (checkpoint present) is skipped, so rerunning the
same command resumes the study. Stages run through ``odm_basicsr.study`` (as odm-demo's do) and are scored with
``odm_basicsr.scoring`` (as odm-eval scores). See ``--help`` for the arms, the statistics and the chosen defaults.
"""
# ruff: noqa: I001
import argparse
import datetime
import os
import shlex
import sys
import time
from argparse import Namespace

import odm_basicsr.plugin  # noqa: F401  (BasicSR fixes + registration first)
from odm_basicsr import scoring
from odm_basicsr.demo.recipe import DEFAULT_VAR_WEIGHT, OFFSETS, edsr_arch
from odm_basicsr.study.argtypes import (bit_width, check_benchmarks, given_together, positive_float, positive_int,
                                        pretrained_network, train_images)
from odm_basicsr.study.data import (BENCHMARKS, DEFAULT_DATA, DEFAULT_TRAIN_SETS, benchmark_pairs, paired_dataset_opt,
                                    prepare_paired_data)
from odm_basicsr.study.results import fmt_time, load_average, machine_info, mean_std, write_json, write_results
from odm_basicsr.study.options import BATCH, CALIB_BATCHES, FP_LR, FP_SEED, LR_PATCH, QAT_LR, fp_options, qat_options
from odm_basicsr.study.runner import Stage, load_json, run_stage
from odm_basicsr.study.train_record import read_record, record_path
from odm_basicsr.tool_cli import pick_device

PROG = 'mini_study.py'
ARMS = ('fp', 'qat', 'odm', 'odm_low', 'odm_high', 'naive_half', 'naive_matched', 'offsets_only', 'clip_only',
        'qlr10', 'v2', 'v2_noclip')
DEFAULT_ARMS = ('fp', 'qat', 'odm', 'naive_half', 'offsets_only', 'v2')
#: Regulariser strength of odm_low / odm / odm_high as a share of l_pix at the start (with --var-shares).
DEFAULT_VAR_SHARES = (0.01, 0.1, 0.5)
LAYER_SETS = ('default', 'all')

# Defaults (see EPILOG for the measurement they come from).
DEFAULT_FEAT = 16
DEFAULT_BLOCK = 4
DEFAULT_SCALE = 4
DEFAULT_FP_ITERS = 4000
DEFAULT_QAT_ITERS = 700
DEFAULT_SEEDS = (0, 1, 2)
# The training recipe (FP_LR, QAT_LR, BATCH, LR_PATCH, FP_SEED, CALIB_BATCHES) is odm_basicsr.study.options's,
# shared with scripts/deploy_study.py; OFFSETS (top 25 %) is the demo's.

EPILOG = f"""\
arms (every QAT arm starts from the same cached FP checkpoint, W<bits>A<bits>, Adam lr {QAT_LR:g} constant):
  fp            the FP start: EDSR trained once from scratch (lr {FP_LR:g}, halved at 2/3), seed {FP_SEED}; reused
                by every arm, layer set and seed (one run, so no std)
  qat           ODMModel, cooperation: off, no offsets (plain QAT; the reference of every delta)
  odm           cooperation: feature, FeatureVarianceLoss (channel) at --var-weight, offsets top 25 %
  odm_low/high  odm at the lower / higher --var-shares (with --pretrained-opt or --var-shares)
  naive_half    cooperation: naive at --var-weight / 2, offsets top 25 %
  naive_matched cooperation: naive at odm's weight x the coop that odm's run logged (the L1 share of the
                regulariser gradient that the gate let through, mean over its logged steps), offsets top 25 %
  offsets_only  cooperation: off + offsets top 25 % (no regulariser)
  clip_only     cooperation: off + network_g.clip_correction: true (2024 weight clipping correction alone)
  qlr10         cooperation: off + train.quant_lr_mult: 10 (the 2024 quantizer learning rate alone)
  v2            2024 version: cooperation: cosine, MismatchLoss weight 1e-5, network_g.clip_correction: true,
                train.quant_lr_mult: 10 (no offsets)
  v2_noclip     v2 without clip_correction
pretrained start (--pretrained-opt NET.yml --pretrained CKPT): no FP training; the fp row is that network, every
  QAT arm wraps its network_g and loads CKPT; odm's weight is then --var-shares[1] x l_pix / l_var(weight 1),
  both measured on one calibrated training batch at the start (odm_low / odm_high: the other two shares).
  Each QAT arm runs for each --layer-sets entry (network_g.layers: default = the paper's layers, all = every
  conv except the first and last) and each --seeds entry (train.manual_seed: data order, crops, flips).
statistics:
  Y-channel PSNR / SSIM, border = scale, BasicSR's calculate_psnr / calculate_ssim, mean over the images of a set;
  per arm: mean +- sample std over seeds. Delta vs qat = mean over seeds of (arm - qat) at the same seed and layer
  set (paired: same seed = same data order). A delta is a tie when |delta| < 2 x the std over seeds of those
  paired differences; otherwise win (> 0) or loss. With fewer than 2 seeds no verdict is given.
resuming:
  Runs live in <out>/experiments/<run>; a run whose checkpoint exists is skipped (its metrics are cached in
  <out>/runs/<run>.json), an interrupted run resumes from its last training state, and a run with changed
  settings is refused (use another --out). Adding seeds, arms or layer sets trains only the new runs.
defaults and why (aim: about 90 minutes on 2 idle CPU cores):
  Measured (one short run per arm, 40 iterations, on this project's 2-core dev machine at load average ~2, i.e.
  not idle): EDSR {DEFAULT_FEAT} ch x {DEFAULT_BLOCK} blocks, x4, batch {BATCH}, LR patch {LR_PATCH}:
  FP about 0.2 s/iteration, W2A2 QAT 0.13-0.18 s/iteration across arms and layer sets (noisy under load); about 10 s
  per run for process start and calibration, about 5 s per run for the Set5 + Set14 evaluation, about 1 minute
  once for the LR cache of T91 + BSD200. Taking 0.17 s/iteration for every run, the default study (1 FP run +
  5 arms x 2 layer sets x 3 seeds = 30 QAT runs) takes about
  {DEFAULT_FP_ITERS} x 0.17 + 30 x ({DEFAULT_QAT_ITERS} x 0.17 + 15) + 60 s = 680 + 3570 + 510 s, about 80 minutes,
  leaving some margin for the slower arms. Timed full study (2026-11-26, load 0.6-1.4): 75 min 50 s.
  {DEFAULT_FEAT} x {DEFAULT_BLOCK} keeps every run cheap enough for 3 seeds; the FP start gets most of its budget once
  ({DEFAULT_FP_ITERS} iterations) since every arm reuses it; the QAT runs are short fine-tunes, as in odm-demo.
"""


def build_parser():
    p = argparse.ArgumentParser(
        prog='mini_study.py', description='A CPU-scale ODM study: arms x layer sets x seeds from one cached FP start, '
        'on T91/BSD200, evaluated on Set5/Set14.', epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', required=True, help='work folder (rerun with the same folder to resume)')
    p.add_argument('--data', default=DEFAULT_DATA,
                   help=f'data root with train/<set>/ and benchmark/Set5, Set14 (default {DEFAULT_DATA})')
    p.add_argument('--train-sets', nargs='+', default=list(DEFAULT_TRAIN_SETS), metavar='SET',
                   help=f'subfolders of <data>/train (default {" ".join(DEFAULT_TRAIN_SETS)})')
    p.add_argument('--bits', type=bit_width, default=2, help='W=A bit width of the QAT arms (default 2)')
    p.add_argument('--layer-sets', nargs='+', choices=LAYER_SETS, default=list(LAYER_SETS),
                   help='network_g.layers values (default: default all)')
    p.add_argument('--arms', nargs='+', choices=ARMS, default=list(DEFAULT_ARMS),
                   help=f'arms to run (default: {" ".join(DEFAULT_ARMS)}); qat is always trained too, as the '
                   'reference of the deltas')
    p.add_argument('--pretrained-opt', help='option file whose network_g (and scale) is a pretrained FP network')
    p.add_argument('--pretrained', help='its checkpoint (params / params_ema / plain state dict)')
    p.add_argument('--var-shares', nargs=3, type=float, metavar=('LOW', 'MID', 'HIGH'),
                   help='odm_low / odm / odm_high regulariser weight as a share of l_pix at the start (default with '
                   f'--pretrained-opt: {" ".join(map(str, DEFAULT_VAR_SHARES))}; otherwise --var-weight for odm)')
    p.add_argument('--act-init', choices=('mse', 'percentile', 'minmax'),
                   help='network_g.act_init of every QAT arm (default: the Quantized default)')
    p.add_argument('--weight-range', choices=('mse', 'maxabs', 'percentile'),
                   help='network_g.weight_range of every QAT arm but v2 and clip_only, which keep the 2024 '
                   'percentile x learnable factor (default: the Quantized default)')
    p.add_argument('--batch', type=positive_int, default=BATCH, help=f'batch size (default {BATCH})')
    p.add_argument('--lr-patch', type=positive_int, default=LR_PATCH, help=f'LR patch (default {LR_PATCH})')
    p.add_argument('--seeds', nargs='+', type=int, default=list(DEFAULT_SEEDS),
                   help=f'seeds per QAT arm (default {" ".join(map(str, DEFAULT_SEEDS))})')
    p.add_argument('--var-weight', type=positive_float, default=DEFAULT_VAR_WEIGHT,
                   help=f'lambda_var of odm (naive_half uses half; default {DEFAULT_VAR_WEIGHT:g})')
    p.add_argument('--arch-feat', type=positive_int, default=DEFAULT_FEAT,
                   help=f'EDSR channels (default {DEFAULT_FEAT})')
    p.add_argument('--arch-block', type=positive_int, default=DEFAULT_BLOCK,
                   help=f'EDSR residual blocks (default {DEFAULT_BLOCK})')
    p.add_argument('--scale', type=int, choices=(2, 3, 4), default=DEFAULT_SCALE,
                   help=f'upscaling factor (default {DEFAULT_SCALE})')
    p.add_argument('--fp-iters', type=positive_int, default=DEFAULT_FP_ITERS,
                   help=f'iterations of the FP start (default {DEFAULT_FP_ITERS})')
    p.add_argument('--qat-iters', type=positive_int, default=DEFAULT_QAT_ITERS,
                   help=f'iterations of each QAT run (default {DEFAULT_QAT_ITERS})')
    p.add_argument('--device', choices=('cpu', 'cuda', 'auto'), default='cpu', help='default cpu')
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.seeds = list(dict.fromkeys(args.seeds))
    args.layer_sets = list(dict.fromkeys(args.layer_sets))
    args.arms = [a for a in ARMS if a in args.arms or a == 'qat']
    if 'naive_matched' in args.arms and 'odm' not in args.arms:
        args.arms.insert(args.arms.index('naive_matched'), 'odm')
    given_together(parser, ('--pretrained-opt', '--pretrained'), (args.pretrained_opt, args.pretrained))
    args.net_opt = None
    if args.pretrained_opt:
        args.net_opt, args.scale, args.pretrained_key = pretrained_network(parser, args.pretrained_opt,
                                                                           args.pretrained)
        args.pretrained = os.path.abspath(args.pretrained)
        if args.var_shares is None:
            args.var_shares = list(DEFAULT_VAR_SHARES)
    args.hr_images = train_images(parser, args.data, args.train_sets)
    check_benchmarks(parser, args.data, BENCHMARKS, args.scale)
    return args


# ---------------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------------

def _arch(args):
    if args.net_opt:
        return dict(args.net_opt)
    return edsr_arch(Namespace(num_feat=args.arch_feat, num_block=args.arch_block, scale=args.scale))


def fp_stage(args, train_set):
    return Stage('fp', 'fp', 32, fp_options('fp', args.scale, args.device, train_set, args.fp_iters, _arch(args)))


def var_weights(args, layers):
    """lambda_var of odm_low / odm / odm_high: --var-weight for odm, or shares of l_pix (see measure_var_unit)."""
    if not args.var_shares:
        return {'odm': args.var_weight}
    unit = args.var_unit[layers]
    return {arm: share * unit for arm, share in zip(('odm_low', 'odm', 'odm_high'), args.var_shares)}


def logged_coop(run_name):
    """Mean of the ``coop`` values a finished run logged (its training record: every logged iteration)."""
    path = record_path(os.path.join('experiments', run_name))
    values = [e['values']['coop'] for e in read_record(path) if e['event'] == 'iter' and 'coop' in e['values']]
    if not values:
        cached = load_json(os.path.join('runs', f'{run_name}.json')) or {}  # a run older than training records
        if cached.get('coop') is not None:
            return cached['coop']
        raise RuntimeError(f'naive_matched needs the coop logged by {run_name}; none found in {path}')
    return sum(values) / len(values)


def qat_stage(args, train_set, arm, layers, seed):
    name = f'{arm}_{layers}_s{seed}'
    network_g = {'type': 'Quantized', 'arch': _arch(args), 'w_bits': args.bits, 'a_bits': args.bits, 'layers': layers}
    fp_ckpt = args.pretrained or os.path.join('experiments', 'fp', 'models', 'net_g_latest.pth')
    opt = qat_options(name, args.scale, args.device, train_set, args.qat_iters, network_g, fp_ckpt, seed)
    if args.pretrained:
        opt['path']['param_key_g'] = args.pretrained_key  # params_ema, params, or None for a plain state dict
    for key in ('act_init', 'weight_range'):
        if getattr(args, key, None) and not (key == 'weight_range' and arm in ('v2', 'clip_only')):
            opt['network_g'][key] = getattr(args, key)
    train = opt['train']
    if arm in ('qat', 'offsets_only', 'clip_only', 'qlr10'):
        train['cooperation'] = 'off'
        if arm == 'offsets_only':
            opt['network_g']['offsets'] = dict(OFFSETS)
        elif arm == 'clip_only':
            opt['network_g']['clip_correction'] = True
        elif arm == 'qlr10':
            train['quant_lr_mult'] = 10
    elif arm in ('odm', 'odm_low', 'odm_high', 'naive_half', 'naive_matched'):
        weights = var_weights(args, layers)
        train['cooperation'] = 'feature' if arm.startswith('odm') else 'naive'
        if arm == 'naive_half':
            weight = weights['odm'] / 2
        elif arm == 'naive_matched':
            weight = weights['odm'] * logged_coop(f'odm_{layers}_s{seed}')
        else:
            weight = weights[arm]
        train['reg_opt'] = {'type': 'FeatureVarianceLoss', 'loss_weight': float(weight), 'reduction': 'channel'}
        opt['network_g']['offsets'] = dict(OFFSETS)
    elif arm in ('v2', 'v2_noclip'):
        train['cooperation'] = 'cosine'
        train['reg_opt'] = {'type': 'MismatchLoss', 'loss_weight': 1e-5}
        train['quant_lr_mult'] = 10
        opt['network_g']['clip_correction'] = arm == 'v2'
    else:
        raise ValueError(arm)
    stage = Stage(name, arm, args.bits, opt)
    stage.layers, stage.seed = layers, seed
    return stage


def plan(args, train_set):
    """Stage factories in run order (a naive_matched stage can only be written once its odm run has finished)."""
    stages = []
    if not args.pretrained:
        fp = fp_stage(args, train_set)
        fp.layers, fp.seed = '-', FP_SEED
        stages.append(lambda: fp)
    # Seeds outermost: a study stopped early still has every arm and layer set for its first seeds.
    for seed in args.seeds:
        for layers in args.layer_sets:
            for arm in args.arms:
                if arm != 'fp':
                    stages.append(lambda arm=arm, layers=layers, seed=seed: qat_stage(args, train_set, arm, layers,
                                                                                      seed))
    return stages


def measure_var_unit(args, train_set, layers, device):
    """``l_pix / l_var`` at loss weight 1 on one calibrated training batch of the quantized pretrained network:
    the lambda that makes the regulariser equal to l_pix at the start."""
    import torch
    from basicsr.data import build_dataset
    from torch.utils.data import DataLoader

    from odm_basicsr.checkpoint import load_weights
    from odm_basicsr.losses.variance_loss import FeatureVarianceLoss
    from odm_basicsr.network_options import build_network
    from odm_basicsr.quant import calibrate, quantized_layers

    net = build_network({'type': 'Quantized', 'arch': _arch(args), 'w_bits': args.bits, 'a_bits': args.bits,
                         'layers': layers}).to(device)
    load_weights(net, args.pretrained, args.pretrained_key)  # as the QAT runs load it (quantizer entries absent)
    loader = DataLoader(build_dataset(dict(train_set, phase='train', scale=args.scale)), batch_size=args.batch,
                        shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    batches = iter(loader)
    data = [next(batches) for _ in range(CALIB_BATCHES)]
    net.eval()
    calibrate(net, [d['lq'].to(device) for d in data])
    feats = []
    hooks = [m.register_forward_pre_hook(lambda m, a: feats.append(a[0])) for _, m in quantized_layers(net)]
    with torch.no_grad():
        out = net(data[0]['lq'].to(device))
    for h in hooks:
        h.remove()
    l_pix = torch.nn.functional.l1_loss(out, data[0]['gt'].to(device))
    l_var = FeatureVarianceLoss(1.0, reduction='channel')(feats)
    return float(l_pix / l_var)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------

def evaluate(net_opt, checkpoint, sets, scale, device, param_key='params_ema'):
    """``{set: {'psnr', 'ssim', 'per_image_psnr'}}`` of a trained (or the pretrained) network."""
    net = scoring.load_network(net_opt, checkpoint, device, param_key)
    return {name: scoring.mean_scores(scoring.evaluate_pairs(net, pairs, scale, device))
            for name, pairs in sets.items()}


# ---------------------------------------------------------------------------------------------------------------
# Statistics and tables
# ---------------------------------------------------------------------------------------------------------------

def summarize(runs, args):
    """Rows per (arm, layer set) with mean/std per set and metric, paired delta vs qat and a verdict."""
    by = {}
    for r in runs:
        by.setdefault((r['arm'], r['layers']), {})[r['seed']] = r
    rows = []
    fp = by.get(('fp', '-'), {})
    for layers in args.layer_sets:
        qat = by.get(('qat', layers), {})
        for arm in args.arms:
            group = fp if arm == 'fp' else by.get((arm, layers), {})
            if not group:
                continue
            row = {'arm': arm, 'layers': layers, 'n': len(group), 'sets': {}}
            for set_name in BENCHMARKS:
                cell = {}
                for metric in ('psnr', 'ssim'):
                    vals = [g['metrics'][set_name][metric] for g in group.values()]
                    mean, std = mean_std(vals)
                    cell[metric] = {'mean': mean, 'std': std}
                    if arm == 'qat':
                        continue
                    if arm == 'fp':  # one FP run against every qat seed
                        diffs = [fp[FP_SEED]['metrics'][set_name][metric] - q['metrics'][set_name][metric]
                                 for q in qat.values()]
                    else:
                        diffs = [group[s]['metrics'][set_name][metric] - qat[s]['metrics'][set_name][metric]
                                 for s in group if s in qat]
                    d_mean, d_std = mean_std(diffs)
                    verdict = None
                    if d_std is not None:
                        verdict = 'tie' if abs(d_mean) < 2 * d_std else ('win' if d_mean > 0 else 'loss')
                    cell[f'delta_{metric}'] = {'mean': d_mean, 'std': d_std, 'n': len(diffs), 'verdict': verdict}
                row['sets'][set_name] = cell
            rows.append(row)
    return rows


def _pm(stat, digits):
    if stat['mean'] is None:
        return '-'
    text = f'{stat["mean"]:.{digits}f}'
    return text + (f' ± {stat["std"]:.{digits}f}' if stat['std'] is not None else '')


def _delta(stat, digits):
    if stat is None or stat['mean'] is None:
        return '-'
    return f'{stat["mean"]:+.{digits}f} ({stat["verdict"] or "n/a"})'


def format_markdown(study):
    s = study['settings']
    lines = ['# ODM mini study', '',
             f'Command: `{study["command"]}`  ', f'Date: {study["date"]}  ',
             f'Machine: {study["machine"]["summary"]}; load average at start '
             f'{study["machine"]["load_average_at_start"]}, at end {study["machine"]["load_average_at_end"]}  ',
             f'Wall time of this invocation: {fmt_time(study["total_wall_s"])} (m:ss); sum of the run train '
             f'times: {fmt_time(study["train_wall_s_sum"])}', '',
             (f'Start: the pretrained {s["pretrained_opt"]} network ({s["pretrained"]}), no FP training; '
              if s.get('pretrained') else
              f'EDSR {s["arch_feat"]} ch x {s["arch_block"]} blocks, FP start {s["fp_iters"]} iterations '
              f'(lr {FP_LR:g}, seed {FP_SEED}); ')
             + f'x{s["scale"]}, W{s["bits"]}A{s["bits"]}; training data {", ".join(s["train_sets"])} '
             f'({s["train_images"]} images); each QAT run {s["qat_iters"]} iterations (lr {QAT_LR:g}), '
             f'batch {s["batch"]}, LR patch {s["lr_patch"]}; seeds {", ".join(map(str, s["seeds"]))}; '
             + (f'odm lambda as a share of l_pix at the start: {s["var_shares"]} (l_pix / l_var at weight 1: '
                f'{s["var_unit"]}).' if s.get('var_shares') else f'lambda_var {s["var_weight"]:g}.'), '',
             'Y-channel PSNR (dB) / SSIM, border = scale, mean ± std over seeds. Δ = paired mean over seeds of '
             '(arm − qat); tie when |Δ| < 2 × std of the paired differences, else win/loss; n/a with < 2 seeds. '
             'fp is one run (the start of every arm).', '']
    header = ['arm', 'layers', 'n', 'Set5 PSNR', 'Set5 SSIM', 'Set14 PSNR', 'Set14 SSIM', 'Δ Set5 PSNR',
              'Δ Set14 PSNR', 'Δ Set5 SSIM', 'Δ Set14 SSIM']
    lines += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for r in study['summary']:
        c5, c14 = r['sets']['Set5'], r['sets']['Set14']
        cells = [r['arm'], r['layers'], str(r['n']), _pm(c5['psnr'], 2), _pm(c5['ssim'], 4), _pm(c14['psnr'], 2),
                 _pm(c14['ssim'], 4), _delta(c5.get('delta_psnr'), 2), _delta(c14.get('delta_psnr'), 2),
                 _delta(c5.get('delta_ssim'), 4), _delta(c14.get('delta_ssim'), 4)]
        lines.append('| ' + ' | '.join(cells) + ' |')
    b = study['bicubic']
    lines += ['', f'Bicubic: Set5 {b["Set5"]["psnr"]:.2f} / {b["Set5"]["ssim"]:.4f}, '
              f'Set14 {b["Set14"]["psnr"]:.2f} / {b["Set14"]["ssim"]:.4f}.', '',
              'A CPU-scale study, not a reproduction of the paper (DIV2K, 60K iterations, EDSR 64 x 16).', '']
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def main(argv=None):
    started, load_at_start = time.time(), load_average()
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    args = parse_args(argv)
    command = shlex.join(['python', 'scripts/mini_study.py'] + (sys.argv[1:] if argv is None else list(argv)))
    data = os.path.abspath(args.data)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    log(f'mini_study: work folder {out}')
    paired = prepare_paired_data(args.hr_images, os.path.join(out, f'data_x{args.scale}'), args.scale,
                                 args.lr_patch * args.scale, log, PROG)
    train_set = paired_dataset_opt(paired, args.scale, args.lr_patch, args.batch)
    stages = plan(args, train_set)
    device = pick_device(args.device)
    args.var_unit = {}
    if args.var_shares:
        for layers in args.layer_sets:
            args.var_unit[layers] = measure_var_unit(args, train_set, layers, device)
            log(f'mini_study: layers {layers}: l_pix / l_var(weight 1) = {args.var_unit[layers]:.4g}; lambda '
                + ', '.join(f'{k} {v:.3g}' for k, v in var_weights(args, layers).items()))
    sets = {name: benchmark_pairs(data, name, args.scale) for name in BENCHMARKS}

    cwd = os.getcwd()
    os.chdir(out)
    try:
        os.makedirs('runs', exist_ok=True)
        bicubic = {name: scoring.mean_scores(scoring.score_images(scoring.bicubic_images(pairs, args.scale), pairs,
                                                                  args.scale))
                   for name, pairs in sets.items()}
        runs = []
        if args.pretrained:
            fp_metrics = evaluate(args.net_opt, args.pretrained, sets, args.scale, device)
            runs.append({'run': 'fp', 'arm': 'fp', 'layers': '-', 'seed': FP_SEED, 'metrics': fp_metrics,
                         'checkpoint': args.pretrained, 'skipped': False})
        for make_stage in stages:
            stage = make_stage()
            rec = run_stage(stage, log, PROG)
            run_path = os.path.join('runs', f'{stage.name}.json')
            cached = load_json(run_path)
            if rec.get('skipped') and cached is not None:
                run = {**cached, 'skipped': True}
            else:
                coop = None
                if stage.method.startswith('odm'):
                    coop = logged_coop(stage.name)
                metrics = evaluate(stage.opt['network_g'], stage.checkpoint, sets, args.scale, device)
                run = {'run': stage.name, 'arm': stage.method, 'layers': stage.layers, 'seed': stage.seed,
                       'metrics': metrics, 'train_wall_s': rec.get('train_wall_s'), 'iters': rec.get('iters'),
                       'basicsr_time_consumed': rec.get('basicsr_time_consumed'),
                       'coop': coop, 'loss_weight': (stage.opt['train'].get('reg_opt') or {}).get('loss_weight'),
                       'options': os.path.join(out, 'options', f'{stage.name}.yml'),
                       'checkpoint': os.path.join(out, stage.checkpoint)}
                write_json(run_path, run)
                run = {**run, 'skipped': False}
            log(f'[{stage.name}] Set5 {run["metrics"]["Set5"]["psnr"]:.2f} dB, '
                f'Set14 {run["metrics"]["Set14"]["psnr"]:.2f} dB')
            runs.append(run)

        study = {
            'command': command, 'cwd': cwd,
            'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
            'settings': {'arms': args.arms, 'layer_sets': args.layer_sets, 'seeds': args.seeds, 'bits': args.bits,
                         'var_weight': args.var_weight, 'arch_feat': args.arch_feat, 'arch_block': args.arch_block,
                         'scale': args.scale, 'fp_iters': args.fp_iters, 'qat_iters': args.qat_iters,
                         'data': data, 'train_sets': args.train_sets, 'train_images': paired[2],
                         'fp_lr': FP_LR, 'qat_lr': QAT_LR, 'batch': args.batch, 'lr_patch': args.lr_patch,
                         'fp_seed': FP_SEED,
                         'calibration_batches': CALIB_BATCHES, 'offsets': OFFSETS, 'device': args.device,
                         'pretrained': args.pretrained, 'pretrained_opt': args.pretrained_opt,
                         'var_shares': args.var_shares, 'var_unit': args.var_unit, 'act_init': args.act_init,
                         'weight_range': args.weight_range},
            'bicubic': bicubic,
            'runs': runs,
            'summary': summarize(runs, args),
            'reused_runs': [r['run'] for r in runs if r['skipped']],
            'train_wall_s_sum': round(sum(r.get('train_wall_s') or 0 for r in runs), 1),
            'total_wall_s': round(time.time() - started, 1),
            'machine': machine_info(device, load_at_start),
        }
        write_results('study', study, format_markdown(study))
    finally:
        os.chdir(cwd)
    log('')
    log(format_markdown(study))
    log(f'Results: {out}/study.md, {out}/study.json')
    return 0


if __name__ == '__main__':
    sys.exit(main())
