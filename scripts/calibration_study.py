#!/usr/bin/env python
"""Calibration alone (no training) on a pretrained network: range statistic x calibration mode x weight range.

For each bit width, builds ``Quantized`` over the network of ``--opt`` (its ``network_g``), loads ``--checkpoint``,
calibrates the activation ranges on LR patches cut from ``<data>/train/<set>`` HR images (MATLAB bicubic), and
evaluates Y-PSNR on ``<data>/benchmark/Set5`` and ``Set14`` as odm-eval does (``odm_basicsr.scoring``). Prints one
JSON line per configuration and a Markdown table; ``--json`` writes them all.

Example (RLFN, the published network; about 15 minutes on 2 CPU cores)::

    python scripts/calibration_study.py --opt odm_basicsr/options/test/RLFN/test_RLFN_x4.yml \\
        --checkpoint ../shared/data/pretrained/RLFN_cut_x4_ntire22.pth --json calib.json
"""
# ruff: noqa: I001
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

import odm_basicsr.archs  # noqa: F401  (BasicSR fixes + registration first)
from basicsr.utils.matlab_functions import imresize
from odm_basicsr import scoring
from odm_basicsr.checkpoint import CheckpointMismatchError, load_state, read_state
from odm_basicsr.network_options import build_network, read_network_options
from odm_basicsr.quant import calibrate

ACT_STATS = ('percentile', 'minmax', 'mse')
WEIGHT_RANGES = ('maxabs', 'percentile', 'mse')
MODES = ('fp', 'sequential')
GRANULARITIES = ('layer', 'channel')


def calibration_batches(data, train_set, scale, n, batch, lr_patch, seed=0):
    """``n`` batches of ``batch`` random LR patches (1 x 3 x lr_patch^2 each, RGB in [0, 1]), bicubic from HR."""
    folder = os.path.join(data, 'train', train_set)
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    rng = np.random.default_rng(seed)
    hr_patch = lr_patch * scale
    out = []
    for _ in range(n):
        patches = []
        while len(patches) < batch:
            img = scoring.read_image(paths[rng.integers(len(paths))])[:, :, ::-1].astype(np.float32) / 255.0
            h, w = img.shape[:2]
            if h < hr_patch or w < hr_patch:
                continue
            y, x = rng.integers(h - hr_patch + 1), rng.integers(w - hr_patch + 1)
            lr = np.clip(np.round(imresize(img[y:y + hr_patch, x:x + hr_patch], 1 / scale) * 255), 0, 255) / 255
            patches.append(torch.from_numpy(np.ascontiguousarray(lr.transpose(2, 0, 1))).float())
        out.append(torch.stack(patches))
    return out


def set_psnr(net, pairs, scale, device):
    return scoring.mean_scores(scoring.evaluate_set(net, pairs, scale, device))['psnr']


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--opt', required=True, help='option file with the FP network_g (and scale)')
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--data', default=os.path.join('..', 'shared', 'data'))
    p.add_argument('--train-set', default='BSD200')
    p.add_argument('--bits', nargs='+', type=int, default=[8, 4, 3, 2])
    p.add_argument('--layers', default='default')
    p.add_argument('--batches', type=int, default=4)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--lr-patch', type=int, default=32)
    p.add_argument('--sets', nargs='+', default=['Set5', 'Set14'])
    p.add_argument('--json', help='write all results here')
    args = p.parse_args(argv)
    torch.manual_seed(0)
    net_opt, scale = read_network_options(args.opt)
    batches = calibration_batches(args.data, args.train_set, scale, args.batches, args.batch, args.lr_patch)
    pairs = {s: scoring.list_pairs(os.path.join(args.data, 'benchmark'), s, scale) for s in args.sets}
    device = torch.device('cpu')

    key, state = read_state(args.checkpoint)

    def with_weights(network_opt):
        """The network of ``network_opt`` with the checkpoint's FP weights (its quantizers not yet calibrated)."""
        net = build_network(network_opt)
        try:
            load_state(net, state, source=f'checkpoint {args.checkpoint} [{key}]')
        except CheckpointMismatchError as e:
            raise SystemExit(str(e)) from e
        return net

    results = []
    fp = with_weights(net_opt)
    fp.eval()
    row = {'config': 'FP'}
    for s, prs in pairs.items():
        row[s] = set_psnr(fp, prs, scale, device)
    print(json.dumps(row), flush=True)
    results.append(row)
    configs = []  # (bits, mode, act_init, weight_range, weight_granularity)
    for bits in args.bits:
        for act in ACT_STATS:
            configs.append((bits, 'fp', act, 'mse', 'layer'))
        configs.append((bits, 'sequential', 'mse', 'mse', 'layer'))
        for gran in GRANULARITIES:
            for w in WEIGHT_RANGES:
                if (w, gran) != ('mse', 'layer'):
                    configs.append((bits, 'fp', 'mse', w, gran))
    for bits, mode, act, wrange, gran in configs:
        t0 = time.time()
        qopt = {'type': 'Quantized', 'arch': net_opt, 'w_bits': bits, 'a_bits': bits, 'layers': args.layers,
                'act_init': act, 'weight_range': wrange, 'weight_granularity': gran}
        net = with_weights(qopt)
        net.eval()
        row = {'bits': bits, 'mode': mode, 'act_init': act, 'weight_range': wrange, 'weight_granularity': gran}
        try:
            calibrate(net, batches, mode)
            uppers = [float(m.act_quant.upper) for m in net.modules() if hasattr(m, 'act_quant') and m.act_quant]
            row['max_upper'] = max(uppers)
            for s, prs in pairs.items():
                row[s] = set_psnr(net, prs, scale, device)
        except Exception as e:  # noqa: BLE001  (a failed configuration is a result)
            row['error'] = str(e)[:200]
        row['seconds'] = round(time.time() - t0, 1)
        print(json.dumps(row), flush=True)
        results.append(row)
    lines = ['| bits | mode | act_init | weight_range | weight_granularity | max upper | ' + ' | '.join(args.sets)
             + ' |', '|---|---|---|---|---|---|' + '---|' * len(args.sets)]
    for r in results:
        if 'bits' not in r:
            lines.append('| FP | | | | | | ' + ' | '.join(f'{r[s]:.2f}' for s in args.sets) + ' |')
            continue
        cells = [f'{r[s]:.2f}' if s in r else r.get('error', '-')[:40] for s in args.sets]
        lines.append(f'| W{r["bits"]}A{r["bits"]} | {r["mode"]} | {r["act_init"]} | {r["weight_range"]} | '
                     f'{r["weight_granularity"]} | '
                     f'{r.get("max_upper", float("nan")):.4g} | ' + ' | '.join(cells) + ' |')
    print('\n'.join(lines))
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump({'command': ' '.join(sys.argv), 'results': results, 'table': lines}, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
