"""``odm-eval``: evaluate checkpoints on benchmark folders with the SR-quantization papers' protocol.

``odm-eval -opt NET.yml --checkpoint A.pth [B.pth ...] --data ROOT --sets Set5 Set14 [--scale 4]``

Layout: ``ROOT/<Set>/HR/<name>.png`` and ``ROOT/<Set>/LRbicx<scale>/<name>.png`` (BasicSR's benchmark folders). The
HR image is cropped from the top left to the LR size times the scale (as BasicSR's ``PairedImageDataset`` does
outside training). The SR output is rounded to 8 bit (``tensor2img``); PSNR and SSIM are BasicSR's
``calculate_psnr`` / ``calculate_ssim`` on the Y channel with ``crop_border = scale``.

Writes ``<out>/eval.md``, ``<out>/eval.csv`` (one row per checkpoint x set), ``<out>/eval_per_image.csv`` and, with
``--save-images``, ``<out>/<ckpt-stem>/<Set>/<name>.png``. Errors exit with status 2 and one line on stderr; a
checkpoint holding NaN / Inf values (a diverged training run) is refused before it runs, with one line and exit
status 3 (as ``odm-train`` / ``odm-test`` do), and no table is written.
"""
import argparse
import csv
import os
import sys
from collections import Counter

import odm_basicsr.archs  # noqa: F401  (BasicSR fixes + registration first)

IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')


class EvalError(Exception):
    """A user error: reported as one line, exit status 2."""


class NonFiniteCheckpointError(EvalError):
    """A checkpoint with NaN / Inf values: reported as one line, exit status 3."""

    exit_status = 3


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


# ----------------------------------------------------------------------------------------------------------- setup
def load_net_options(path, scale=None):
    """``(network_g, scale)`` from a BasicSR option file or a network_g-only YAML."""
    import yaml

    if not os.path.isfile(path):
        raise EvalError(f'option file not found: {path}')
    with open(path, encoding='utf-8') as f:
        opt = yaml.safe_load(f)
    if not isinstance(opt, dict):
        raise EvalError(f'{path}: expected a mapping with network_g (or a network_g mapping with "type")')
    if isinstance(opt.get('network_g'), dict):
        net_opt, opt_scale = dict(opt['network_g']), opt.get('scale')
    elif 'type' in opt:
        net_opt, opt_scale = dict(opt), None
    else:
        raise EvalError(f'{path}: no network_g (and no "type" for a network_g-only file)')
    if 'type' not in net_opt:
        raise EvalError(f'{path}: network_g has no "type"')
    if opt_scale is None:
        inner = net_opt.get('arch') if isinstance(net_opt.get('arch'), dict) else net_opt
        opt_scale = inner.get('upscale', inner.get('scale'))
    scale = scale if scale is not None else opt_scale
    if scale is None:
        raise EvalError(f'{path}: no scale in the option file; give --scale')
    return net_opt, int(scale)


def window_size(net_opt):
    """The window size of a windowed arch (SwinIR), from network_g or its ``arch``; None otherwise."""
    for d in (net_opt, net_opt.get('arch')):
        if isinstance(d, dict) and d.get('window_size'):
            return int(d['window_size'])
    return None


def build_network(net_opt):
    from copy import deepcopy

    from basicsr.archs import build_network as _build

    try:
        return _build(deepcopy(net_opt))
    except Exception as e:
        raise EvalError(f'cannot build network_g {net_opt.get("type")}: {e}') from e


def load_weights(net, path, param_key='params_ema'):
    """Load ``path`` into ``net`` strictly; error when activation quantizers stay uninitialised or it is not finite."""
    from odm_basicsr.compat import load_checkpoint, select_state_dict
    from odm_basicsr.guards import NonFiniteError, check_finite
    from odm_basicsr.quant import quantized_layers
    from odm_basicsr.quant.layer_selection import quantizer_state_keys
    from odm_basicsr.quant.offsets import ensure_offsets_from_state

    try:
        key, state = select_state_dict(load_checkpoint(path), param_key, source=f'checkpoint {path}')
    except (FileNotFoundError, RuntimeError, TypeError) as e:
        raise EvalError(str(e)) from e
    except KeyError as e:
        raise EvalError(e.args[0]) from e
    try:
        check_finite(state, f'checkpoint {path}' + (f' [{key}]' if key else ''), 'refusing to evaluate it')
    except NonFiniteError as e:
        raise NonFiniteCheckpointError(str(e)) from e
    name = type(net).__name__
    try:
        ensure_offsets_from_state(net, state)
    except Exception as e:
        raise EvalError(f'checkpoint {path} [{key}] does not fit network {name}: {e}') from e
    own = net.state_dict()
    quant_keys = set(quantizer_state_keys(net))
    missing = set(own) - set(state)
    if missing and missing <= quant_keys and not (set(state) - set(own)):
        raise EvalError(f'checkpoint {path} [{key}] has no quantizer state for {name} ({len(missing)} quantizer '
                        'entries missing: an FP checkpoint?); its activation quantizers would be calibrated on the '
                        'test data. Calibrate/fine-tune it first (odm-train) and evaluate that checkpoint.')
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        msg = ' '.join(str(e).split())
        raise EvalError(f'checkpoint {path} [{key}] does not fit network {name}: {msg[:600]}') from e
    uninit = [n for n, m in quantized_layers(net)
              if getattr(m, 'act_quant', None) is not None and not bool(m.act_quant.initialized)]
    if uninit:
        shown = ', '.join(uninit[:5]) + (', ...' if len(uninit) > 5 else '')
        raise EvalError(f'checkpoint {path} [{key}] leaves {len(uninit)} activation quantizer(s) uninitialised '
                        f'({shown}); evaluating would calibrate them on the test data. Evaluate a calibrated '
                        'checkpoint instead.')
    return key


# ------------------------------------------------------------------------------------------------------------ data
def read_image(path):
    """8-bit (or 16-bit) image as a 3-channel BGR array (grey and alpha images converted)."""
    import cv2

    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise EvalError(f'cannot read image {path}')
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    elif img.shape[2] == 1:
        img = cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2BGR)
    if img.dtype != 'uint8':
        raise EvalError(f'{path}: only 8-bit images are supported (got {img.dtype})')
    return img


def _images(folder):
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))


def list_pairs(root, set_name, scale):
    """``[(name, lr_path, hr_path)]`` of one benchmark set; LR files may carry an ``x<scale>`` suffix."""
    set_dir = os.path.join(root, set_name)
    if not os.path.isdir(set_dir):
        avail = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        raise EvalError(f'unknown set {set_name!r}: folder not found: {set_dir} (available in {root}: '
                        f'{", ".join(avail) or "none"})')
    hr_dir, lr_dir = os.path.join(set_dir, 'HR'), os.path.join(set_dir, f'LRbicx{scale}')
    for d in (hr_dir, lr_dir):
        if not os.path.isdir(d):
            raise EvalError(f'folder not found: {d}')
    hrs, lrs = _images(hr_dir), _images(lr_dir)
    if len(hrs) != len(lrs):
        raise EvalError(f'{set_name}: {len(hrs)} HR images in {hr_dir} but {len(lrs)} LR images in {lr_dir}')
    if not hrs:
        raise EvalError(f'{set_name}: no images in {hr_dir}')
    lr_by_stem = {os.path.splitext(f)[0]: f for f in lrs}
    pairs = []
    for f in hrs:
        stem = os.path.splitext(f)[0]
        lr = lr_by_stem.get(stem) or lr_by_stem.get(f'{stem}x{scale}')
        if lr is None:
            raise EvalError(f'{set_name}: no LR image for {os.path.join(hr_dir, f)} in {lr_dir}')
        pairs.append((stem, os.path.join(lr_dir, lr), os.path.join(hr_dir, f)))
    return pairs


# ------------------------------------------------------------------------------------------------------ inference
def super_resolve(net, lr_bgr, scale, device, window=None):
    """SR of an 8-bit BGR image as an 8-bit BGR image (``tensor2img``)."""
    import torch
    from basicsr.utils import img2tensor, tensor2img

    from odm_basicsr.archs.arch_util import pad_to_window

    lq = img2tensor(lr_bgr.astype('float32') / 255.0, bgr2rgb=True, float32=True).unsqueeze(0).to(device)
    h, w = lq.shape[-2:]
    lq = pad_to_window(lq, window)
    with torch.no_grad():
        out = net(lq)
    out = out[..., :h * scale, :w * scale]
    if out.shape[-2:] != (h * scale, w * scale):
        raise EvalError(f'network output {tuple(out.shape[-2:])} for an LR of {(h, w)} is not x{scale}: does the '
                        'scale match the network\'s upscale?')
    return tensor2img([out.detach().float().cpu()])


def evaluate_set(net, pairs, scale, device, window=None, save_dir=None):
    """Per-image ``[(name, psnr, ssim)]``."""
    import cv2
    from basicsr.metrics import calculate_psnr, calculate_ssim

    rows = []
    for name, lr_path, hr_path in pairs:
        lr, hr = read_image(lr_path), read_image(hr_path)
        h, w = lr.shape[0] * scale, lr.shape[1] * scale
        if hr.shape[0] < h or hr.shape[1] < w:
            raise EvalError(f'{hr_path} ({hr.shape[1]}x{hr.shape[0]}) is smaller than {lr_path} x{scale}')
        hr = hr[:h, :w]
        sr = super_resolve(net, lr, scale, device, window)
        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
            cv2.imwrite(os.path.join(save_dir, f'{name}.png'), sr)
        psnr = calculate_psnr(sr, hr, crop_border=scale, test_y_channel=True)
        ssim = calculate_ssim(sr, hr, crop_border=scale, test_y_channel=True)
        rows.append((name, float(psnr), float(ssim)))
    return rows


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


def _device(name):
    import torch

    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise EvalError('--device cuda: CUDA is not available')
    return torch.device(name)


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
        raise EvalError(f'benchmark folder not found: {args.data}')
    for p in args.checkpoint:
        if not os.path.isfile(p):
            raise EvalError(f'checkpoint file not found: {p}')
    net_opt, scale = load_net_options(args.opt, args.scale)
    window = window_size(net_opt)
    sets = {s: list_pairs(args.data, s, scale) for s in args.sets}  # check all folders before any inference
    device = _device(args.device)
    summary, per_image = [], []
    for path, label in zip(args.checkpoint, _labels(args.checkpoint)):
        net = build_network(net_opt)
        key = load_weights(net, path, args.param_key)
        net.eval().to(device)
        for set_name, pairs in sets.items():
            save_dir = os.path.join(args.out, label, set_name) if args.save_images else None
            rows = evaluate_set(net, pairs, scale, device, window, save_dir)
            n = len(rows)
            summary.append({'checkpoint': label, 'set': set_name, 'scale': scale,
                            'psnr': sum(r[1] for r in rows) / n, 'ssim': sum(r[2] for r in rows) / n,
                            'images': n, 'path': path, 'param_key': key})
            per_image.extend((label, set_name, *r) for r in rows)
        del net
    header = (f'Network `{net_opt["type"]}` from `{args.opt}`, x{scale}; PSNR / SSIM on the Y channel, border '
              f'{scale}, 8-bit SR output (BasicSR metrics). Data: `{args.data}`.')
    md = write_outputs(args.out, summary, per_image, scale, header)
    print(md, end='')
    print(f'written: {os.path.join(args.out, "eval.md")}, {os.path.join(args.out, "eval.csv")}, '
          f'{os.path.join(args.out, "eval_per_image.csv")}')
    return summary


def run_cli(prog, parser, run_fn, argv=None):
    """Parse ``argv``, call ``run_fn(args)``; an :class:`EvalError` becomes one line ``<prog>: error: ...`` on
    stderr and its exit status (2, or 3 for a non-finite checkpoint)."""
    args = parser.parse_args(argv)
    try:
        run_fn(args)
    except EvalError as e:
        print(f'{prog}: error: {" ".join(str(e).split())}', file=sys.stderr)
        sys.exit(getattr(e, 'exit_status', 2))
    return 0


def main(argv=None):
    return run_cli('odm-eval', build_parser(), run, argv)


if __name__ == '__main__':
    main()
