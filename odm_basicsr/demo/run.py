"""``odm-demo``: a complete mini-experiment (FP EDSR, then plain QAT vs ODM) on the photos bundled with scikit-image.

Stages, each a real ``odm-train`` run (recorded: :mod:`odm_basicsr.study.train_record`) on BasicSR option files
written into the work folder:

1. ``fp``: FP EDSR trained from scratch (``SRModel``); with ``--pretrained-opt NET.yml --pretrained CKPT.pth``
   not trained: the FP row is that pretrained network, and the QAT stages start from its weights.
2. Per bit width b: ``w<b>_baseline`` (``ODMModel``, ``cooperation: off``, no offsets: plain QAT) and ``w<b>_odm``
   (``cooperation: feature``, ``FeatureVarianceLoss``, top-25 % distribution offsets), both from the FP checkpoint
   with the identical recipe, seed and data; with ``--controls`` also ``w<b>_naive_half`` (``cooperation: naive``
   at half the variance weight).

Every checkpoint (and bicubic) is then scored in this process on the held-out embedded val photos
(:mod:`odm_basicsr.scoring`: Y-channel PSNR / SSIM, border = scale, as BasicSR's own validation computes them).
Outputs in the work folder: ``results.json``, ``results.md``, ``comparison_w<b>.png``, ``options/*.yml``,
``experiments/`` and ``tb_logger/`` (BasicSR's), ``console/<stage>.txt`` (each run's full output).
"""
import datetime
import os
import shlex
import sys
import time

from odm_basicsr.study.data import prepare_paired_data
from odm_basicsr.study.results import fmt_time, load_average, machine_info, write_results
from odm_basicsr.study.runner import run_stage
from odm_basicsr.tool_cli import pick_device

from .cli import parse_args
from .figures import CROP, ZOOM, comparison_png, crop_box
from .recipe import (
    BATCH,
    CALIB_BATCHES,
    FP_LR,
    LR_PATCH,
    OFFSETS,
    QAT_LR,
    SEED,
    VAL_SIZE,
    fp_arch,
    plan_stages,
    train_dataset_opt,
    val_pairs,
)
from .results import format_markdown, format_table


def main(argv=None):
    started, load_at_start = time.time(), load_average()
    # OpenMP threads that spin-wait make torch many times slower when another job shares the cores (measured: 2
    # threads on 2 busy cores, 1.4 s instead of 0.15 s per iteration); passive waiting costs nothing on idle cores.
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    args = parse_args(argv)
    command = shlex.join(['odm-demo'] + (sys.argv[1:] if argv is None else list(argv)))
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    print(f'odm-demo: work folder {out}', flush=True)

    def log(msg):
        print(msg, flush=True)

    import odm_basicsr.plugin  # noqa: F401  (BasicSR fixes + registration first)
    from odm_basicsr.scoring import bicubic_images, load_network, mean_scores, score_images, sr_images

    paired = None
    if args.data is not None:
        paired = prepare_paired_data(args.hr_images, os.path.join(out, f'data_x{args.scale}'), args.scale,
                                     LR_PATCH * args.scale, log)
    train_set = train_dataset_opt(args, paired)
    stages = plan_stages(args, train_set)
    cwd = os.getcwd()
    os.chdir(out)
    try:
        records = {}
        for s in stages:
            if s.pretrained:
                entry = f'[{s.param_key}]' if s.param_key else '(plain state dict)'
                log(f'[{s.name}] not trained: pretrained {s.opt["network_g"]["type"]} from {s.checkpoint} {entry}')
                records[s.name] = {'train_wall_s': None, 'skipped': False, 'iters': 0}
            else:
                records[s.name] = run_stage(s, log)

        log('Evaluating on the held-out embedded val photos ...')
        device = pick_device(args.device)
        pairs = val_pairs(args.scale)
        bicubic = bicubic_images(pairs, args.scale)
        images, rows = {'bicubic': bicubic}, []
        for s in stages:
            net = load_network(s.opt['network_g'], s.checkpoint, device, s.param_key)
            images[s.name] = sr_images(net, pairs, device, args.scale)
            m = mean_scores(score_images(images[s.name], pairs, args.scale))
            rec = records[s.name]
            row = {'stage': s.name, 'method': s.method, 'bits': s.bits, **m,
                   'checkpoint': os.path.join(out, s.checkpoint),
                   'options': args.pretrained_opt if s.pretrained else os.path.join(out, 'options', f'{s.name}.yml'),
                   **{k: rec.get(k) for k in ('train_wall_s', 'basicsr_time_consumed', 'log_psnr', 'log_ssim',
                                              'iters', 'skipped')}}
            if s.pretrained:
                row['pretrained'] = True
            if rec.get('log_psnr') is not None and abs(rec['log_psnr'] - m['psnr']) > 0.01:
                log(f'warning: {s.name}: PSNR here {m["psnr"]:.4f} dB differs from the final validation in its '
                    f'log ({rec["log_psnr"]:.4f} dB)')
            rows.append(row)

        results = {
            'command': command,
            'argv': sys.argv[1:] if argv is None else list(argv),
            'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
            'settings': {'bits': args.bits, 'fp_iters': args.fp_iters, 'qat_iters': args.qat_iters,
                         'num_feat': args.num_feat, 'num_block': args.num_block, 'scale': args.scale,
                         'var_weight': args.var_weight, 'controls': args.controls,
                         'data': os.path.abspath(args.data) if args.data else 'embedded train photos',
                         'device': args.device, 'fp_lr': FP_LR, 'qat_lr': QAT_LR, 'batch': BATCH,
                         'lr_patch': LR_PATCH, 'val_size': VAL_SIZE, 'calibration_batches': CALIB_BATCHES,
                         'seed': SEED, 'offsets': OFFSETS, 'layers': args.layers,
                         'network': fp_arch(args),
                         'pretrained': None if not args.pretrained else {
                             'network': args.pretrained_net['type'], 'options': args.pretrained_opt,
                             'checkpoint': args.pretrained, 'param_key': args.pretrained_key}},
            'bicubic': {'method': 'bicubic', **mean_scores(score_images(bicubic, pairs, args.scale))},
            'stages': rows,
        }

        name0, _, gt0 = pairs[0]
        box = crop_box(gt0)
        fp_row = next(r for r in rows if r['method'] == 'fp')
        for b in args.bits:
            by = {r['method']: r for r in rows if r['bits'] == b}
            panels = [(f'bicubic {results["bicubic"]["psnr"]:.2f} dB', images['bicubic'][0]),
                      (f'FP {fp_row["psnr"]:.2f} dB', images['fp'][0]),
                      (f'W{b}A{b} baseline {by["baseline"]["psnr"]:.2f} dB', images[f'w{b}_baseline'][0]),
                      (f'W{b}A{b} ODM {by["odm"]["psnr"]:.2f} dB', images[f'w{b}_odm'][0])]
            comparison_png(os.path.join(out, f'comparison_w{b}.png'), panels, box)
        results['comparison'] = {'image': name0, 'top_left': list(box), 'size': CROP, 'zoom': ZOOM,
                                 'files': [f'comparison_w{b}.png' for b in args.bits],
                                 'labels': 'PSNR of the whole val set (both photos), not of the crop'}
        results['total_wall_s'] = round(time.time() - started, 1)  # this invocation (reused stages cost ~0)
        results['reused_stages'] = [r['stage'] for r in rows if r['skipped']]
        results['train_wall_s_sum'] = round(sum(r['train_wall_s'] or 0 for r in rows), 1)
        results['machine'] = machine_info(device, load_at_start)
        write_results('results', results, format_markdown(results))
    finally:
        os.chdir(cwd)

    log('')
    log(format_table(results))
    log('')
    log(f'Y-channel PSNR/SSIM on the held-out embedded val photos (chelsea, rocket; centre {VAL_SIZE} px), '
        f'border {args.scale}. One seed, two photos: differences of a few hundredths of a dB are noise.')
    log(f'Results: {out}/results.md, results.json, ' + ', '.join(f'comparison_w{b}.png' for b in args.bits)
        + f'; tensorboard --logdir {out}/tb_logger')
    reused = f' ({len(results["reused_stages"])} stage(s) reused)' if results['reused_stages'] else ''
    log(f'Wall time {fmt_time(results["total_wall_s"])} (m:ss){reused}')
    return 0
