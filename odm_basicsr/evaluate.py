"""``odm-eval``: evaluate checkpoints on benchmark folders with the SR-quantization papers' protocol.

``odm-eval -opt NET.yml --checkpoint A.pth [B.pth ...] --data ROOT --sets Set5 Set14 [--scale 4]``

Layout: ``ROOT/<Set>/HR/<name>.png`` and ``ROOT/<Set>/LRbicx<scale>/<name>.png`` (BasicSR's benchmark folders). The
HR image is cropped from the top left to the LR size times the scale (as BasicSR's ``PairedImageDataset`` does
outside training). The SR output is rounded to 8 bit (``tensor2img``); PSNR and SSIM are BasicSR's
``calculate_psnr`` / ``calculate_ssim`` on the Y channel with ``crop_border = scale`` (:mod:`odm_basicsr.scoring`,
which the demo and the studies use too).

Writes ``<out>/eval.md``, ``<out>/eval.csv`` (one row per checkpoint x set), ``<out>/eval_per_image.csv`` and, with
``--save-images``, ``<out>/<ckpt-stem>/<Set>/<name>.png``. Errors exit with status 2 and one line on stderr; a
checkpoint holding NaN / Inf values (a diverged training run) is refused before it runs, with one line and exit
status 3 (as ``odm-train`` / ``odm-test`` do), and no table is written.
"""
import argparse
import csv
import os
from collections import Counter

import odm_basicsr.archs  # noqa: F401  (BasicSR fixes + registration first)
from odm_basicsr.network_options import build_network, read_network_options, window_size
from odm_basicsr.scoring import evaluate_set, list_pairs, load_weights, mean_scores
from odm_basicsr.tool_cli import NonFiniteCheckpointError, ToolError, pick_device, run_cli

__all__ = ['NonFiniteCheckpointError', 'build_parser', 'main', 'run']


def build_parser():
    p = argparse.ArgumentParser(prog='odm-eval', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-opt', '--opt', required=True, help='BasicSR option file (network_g, scale) or a network_g YAML')
    p.add_argument('--checkpoint', nargs='+', required=True, help='one or more network checkpoints (.pth)')
    p.add_argument('--data', required=True, help='benchmark root holding <Set>/HR and <Set>/LRbicx<scale>')
    p.add_argument('--sets', nargs='+', required=True, help='benchmark set folders, e.g. Set5 Set14')
    p.add_argument('--scale', type=int, default=None, help='upscaling factor (default: the option file\'s scale)')
    p.add_argument('--param-key', default='params_ema', help='checkpoint entry (falls back to params)')
    p.add_argument('--out', default='./odm_eval', help='output folder (default: ./odm_eval)')
    p.add_argument('--save-images', action='store_true', help='write the SR images to <out>/<ckpt>/<Set>/')
    p.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'), help='default: auto')
    return p


def _labels(paths):
    """Checkpoint labels: file stems, with the parent folder prepended where stems collide."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    counts = Counter(stems)
    labels = []
    for p, s in zip(paths, stems):
        label = s if counts[s] == 1 else f'{os.path.basename(os.path.dirname(os.path.abspath(p)))}_{s}'
        while label in labels:
            label += '_'
        labels.append(label)
    return labels


# --------------------------------------------------------------------------------------------------------- output
def format_markdown(summary, scale):
    lines = [f'| checkpoint | set | x{scale} PSNR (dB) | SSIM | images |', '|---|---|---:|---:|---:|']
    for r in summary:
        lines.append(f'| {r["checkpoint"]} | {r["set"]} | {r["psnr"]:.4f} | {r["ssim"]:.4f} | {r["images"]} |')
    return '\n'.join(lines) + '\n'


def write_outputs(out, summary, per_image, scale, header):
    os.makedirs(out, exist_ok=True)
    md = format_markdown(summary, scale)
    with open(os.path.join(out, 'eval.md'), 'w', encoding='utf-8') as f:
        f.write(f'# odm-eval\n\n{header}\n\n{md}')
    fields = ['checkpoint', 'set', 'scale', 'psnr', 'ssim', 'images', 'path']
    with open(os.path.join(out, 'eval.csv'), 'w', newline='', encoding='utf-8') as f:
        wr = csv.DictWriter(f, fieldnames=fields)
        wr.writeheader()
        for r in summary:
            wr.writerow({k: r[k] for k in fields})
    with open(os.path.join(out, 'eval_per_image.csv'), 'w', newline='', encoding='utf-8') as f:
        wr = csv.writer(f)
        wr.writerow(['checkpoint', 'set', 'image', 'psnr', 'ssim'])
        for ck, set_name, name, psnr, ssim in per_image:
            wr.writerow([ck, set_name, name, f'{psnr:.6f}', f'{ssim:.6f}'])
    return md


def run(args):
    if not os.path.isdir(args.data):
        raise ToolError(f'benchmark folder not found: {args.data}')
    for p in args.checkpoint:
        if not os.path.isfile(p):
            raise ToolError(f'checkpoint file not found: {p}')
    net_opt, scale = read_network_options(args.opt, args.scale)
    window = window_size(net_opt)
    sets = {s: list_pairs(args.data, s, scale) for s in args.sets}  # check all folders before any inference
    device = pick_device(args.device)
    summary, per_image = [], []
    for path, label in zip(args.checkpoint, _labels(args.checkpoint)):
        net = build_network(net_opt)
        key = load_weights(net, path, args.param_key)
        net.eval().to(device)
        for set_name, pairs in sets.items():
            save_dir = os.path.join(args.out, label, set_name) if args.save_images else None
            rows = evaluate_set(net, pairs, scale, device, window, save_dir)
            means = mean_scores(rows)
            summary.append({'checkpoint': label, 'set': set_name, 'scale': scale, 'psnr': means['psnr'],
                            'ssim': means['ssim'], 'images': len(rows), 'path': path, 'param_key': key})
            per_image.extend((label, set_name, *r) for r in rows)
        del net
    header = (f'Network `{net_opt["type"]}` from `{args.opt}`, x{scale}; PSNR / SSIM on the Y channel, border '
              f'{scale}, 8-bit SR output (BasicSR metrics). Data: `{args.data}`.')
    md = write_outputs(args.out, summary, per_image, scale, header)
    print(md, end='')
    print(f'written: {os.path.join(args.out, "eval.md")}, {os.path.join(args.out, "eval.csv")}, '
          f'{os.path.join(args.out, "eval_per_image.csv")}')
    return summary


def main(argv=None):
    return run_cli('odm-eval', build_parser(), run, argv)


if __name__ == '__main__':
    main()
