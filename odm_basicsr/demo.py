"""``odm-demo``: a complete mini-experiment (FP EDSR, then plain QAT vs ODM) on the photos bundled with scikit-image.

Stages, each a real ``python -m odm_basicsr.train`` run on BasicSR option files written into the work folder:

1. ``fp``: FP EDSR trained from scratch (``SRModel``); with ``--pretrained-opt NET.yml --pretrained CKPT.pth``
   not trained: the FP row is that pretrained network, and the QAT stages start from its weights.
2. Per bit width b: ``w<b>_baseline`` (``ODMModel``, ``cooperation: off``, no offsets: plain QAT) and ``w<b>_odm``
   (``cooperation: feature``, ``FeatureVarianceLoss``, top-25 % distribution offsets), both from the FP checkpoint
   with the identical recipe, seed and data; with ``--controls`` also ``w<b>_naive_half`` (``cooperation: naive``
   at half the variance weight).

Every checkpoint (and bicubic) is then evaluated in this process on the held-out embedded val photos (Y-channel
PSNR / SSIM, border = scale, BasicSR's metric functions on 8-bit images, as BasicSR's own validation computes them).
Outputs in the work folder: ``results.json``, ``results.md``, ``comparison_w<b>.png``, ``options/*.yml``,
``experiments/`` and ``tb_logger/`` (BasicSR's), ``console/<stage>.txt`` (each run's full output).
"""
import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from copy import deepcopy

# The variance-loss weight (lambda_var of METHOD.md 4.1) of the ``odm`` stages; ``naive_half`` uses half of it.
DEFAULT_VAR_WEIGHT = 1e-6

DEFAULT_OUT = './odm_demo'
DEFAULT_BITS = (4, 2)
DEFAULT_FP_ITERS = 600
DEFAULT_QAT_ITERS = 250
DEFAULT_NUM_FEAT = 32
DEFAULT_NUM_BLOCK = 4
DEFAULT_SCALE = 2

FP_LR = 1e-3  # measured: 600 iterations at 1e-3 reach what 1000 at 5e-4 do (embedded val, x2)
QAT_LR = 1e-4
BATCH = 8
LR_PATCH = 32  # LR training patch (HR patch = LR_PATCH * scale: 64 at x2)
VAL_SIZE = 192
CALIB_BATCHES = 4
SEED = 10
OFFSETS = {'select': 'topk', 'fraction': 0.25}

# Side-by-side crops: CROP x CROP HR pixels, nearest-upscaled ZOOM times, a LABEL_H px label strip on top of each
# panel, GAP px between panels. Width of comparison_w<b>.png = 4 * CROP * ZOOM + 3 * GAP.
CROP = 64
ZOOM = 4
LABEL_H = 24
GAP = 4
PANELS = 4

IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')

EPILOG = f"""\
stages (each a real `python -m odm_basicsr.train -opt <work>/options/<stage>.yml` run, cwd = the work folder):
  fp               FP EDSR from scratch (SRModel), Adam lr {FP_LR:g}; not run with --pretrained (below)
  w<b>_baseline    plain QAT from the FP checkpoint: ODMModel, cooperation: off, no offsets, Adam lr {QAT_LR:g}
  w<b>_odm         the same recipe + FeatureVarianceLoss (--var-weight, cooperation: feature) + distribution
                   offsets (top 25 % of the quantized layers)
  w<b>_naive_half  (--controls) as w<b>_odm but cooperation: naive (no gating) at --var-weight / 2: the same
                   effective strength, as feature-level gating was measured to pass about half of the variance
                   gradient; compared with w<b>_odm it isolates the cooperation rule
resuming:
  A stage whose checkpoint (experiments/<stage>/models/net_g_latest.pth) exists is skipped, so re-running the same
  command resumes the study; a stage interrupted after a saved training state resumes from it (--auto_resume).
  Re-running with settings that change a finished stage is refused (use another --out); adding bit widths or
  --controls trains only the new stages.
evaluation:
  Held-out embedded val photos (chelsea, rocket; centre {VAL_SIZE} px), Y-channel PSNR / SSIM with a border of
  `scale` px (BasicSR's calculate_psnr / calculate_ssim, test_y_channel), bicubic by BasicSR's MATLAB imresize.
  Two small photos and one seed: differences of a few hundredths of a dB are noise, not findings.
--pretrained-opt NET.yml --pretrained CKPT.pth (always together):
  Start from a trained FP network instead of the fp stage, e.g.
    odm-demo --pretrained-opt options/test/RLFN/test_RLFN_x4.yml --pretrained RLFN_cut_x4_ntire22.pth --bits 2
  NET.yml is a BasicSR option file whose network_g is the FP network (as odm-eval reads it), or a network_g-only
  YAML; its scale is the file's `scale` key or else the arch's `upscale` (a different --scale is an error, and
  --num-feat, --num-block, --fp-iters do not apply). CKPT.pth: a BasicSR checkpoint (--param-key, falling back to
  `params`) or a plain state dict; it must load strictly into network_g. The network must take RGB in [0, 1].
  Nothing trains before both files are checked. The fp row is CKPT.pth evaluated as the other rows are (no
  train time); the QAT stages are network_g: {{type: Quantized, arch: <network_g>, ...}} with
  path.pretrain_network_g: CKPT.pth. Training data and validation: as without it (embedded photos, or --data).
--layers:
  Which layers the QAT stages quantize: `default` (the arch's preset, see layer_presets.py; for EDSR the two convs
  of every residual block), `all` (every Conv2d/Linear except the first and the last) or glob / "re:" patterns
  on module names (several allowed). Checked before anything trains.
--data:
  A folder of HR images (or a folder with an HR/ subfolder). The LR images are made once, with the same MATLAB
  bicubic as the benchmarks, as 8-bit PNGs under <work>/data_x<scale>/ (HR cropped to a multiple of the scale)
  and trained with BasicSR's PairedImageDataset; validation stays on the embedded val photos (keep chelsea and
  rocket out of your folder).
outputs (in --out): results.json, results.md, comparison_w<b>.png, options/, experiments/, tb_logger/
  (tensorboard --logdir <work>/tb_logger), console/<stage>.txt.
threads:
  The runs get OMP_WAIT_POLICY=PASSIVE unless it is set: spinning OpenMP threads made torch 8x slower on 2 cores
  shared with another job; idle cores lose nothing.
"""


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {value}')
    return value


def _bit_width(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'a bit width is an integer in 2..8, got {text!r}') from None
    if not 2 <= value <= 8:
        raise argparse.ArgumentTypeError(f'a bit width is an integer in 2..8, got {value}')
    return value


def _var_weight(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a positive number, got {text!r}') from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f'expected a positive finite number, got {text!r}')
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        prog='odm-demo',
        description='A complete mini-experiment: FP EDSR (or a pretrained FP network: --pretrained-opt, '
                    '--pretrained), then plain QAT vs ODM at each bit width, evaluated on held-out photos. Runs on '
                    'the photos bundled with scikit-image (no download); the defaults took 8 minutes on 2 CPU '
                    'cores shared with other jobs (less on idle cores).',
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default=DEFAULT_OUT, help=f'work folder (default {DEFAULT_OUT}); re-running with '
                        'the same folder skips the finished stages')
    parser.add_argument('--bits', type=_bit_width, nargs='+', default=list(DEFAULT_BITS), metavar='B',
                        help=f'bit widths W=A of the QAT stages, 2..8 (default {" ".join(map(str, DEFAULT_BITS))})')
    parser.add_argument('--fp-iters', type=_positive_int, default=None,
                        help=f'iterations of the FP stage (default {DEFAULT_FP_ITERS}; not with --pretrained)')
    parser.add_argument('--qat-iters', type=_positive_int, default=DEFAULT_QAT_ITERS,
                        help=f'iterations of each QAT stage (default {DEFAULT_QAT_ITERS})')
    parser.add_argument('--num-feat', type=_positive_int, default=None,
                        help=f'EDSR channels (default {DEFAULT_NUM_FEAT}; not with --pretrained)')
    parser.add_argument('--num-block', type=_positive_int, default=None,
                        help=f'EDSR residual blocks (default {DEFAULT_NUM_BLOCK}; not with --pretrained)')
    parser.add_argument('--scale', type=int, choices=(2, 3, 4), default=None,
                        help=f'upscaling factor (default {DEFAULT_SCALE}; with --pretrained-opt the network\'s scale)')
    parser.add_argument('--layers', nargs='+', default=['default'], metavar='L',
                        help='layers the QAT stages quantize: default (the arch\'s preset; default), all (every '
                             'conv/linear but the first and last) or glob / "re:" patterns on module names')
    parser.add_argument('--var-weight', type=_var_weight, default=DEFAULT_VAR_WEIGHT,
                        help=f'variance-loss weight lambda_var of the odm stages (default {DEFAULT_VAR_WEIGHT:g})')
    parser.add_argument('--controls', action='store_true',
                        help='also train the naive_half control (cooperation: naive, --var-weight / 2)')
    parser.add_argument('--data', default=None, metavar='DIR',
                        help='train on this folder of HR images instead of the embedded photos (see below)')
    parser.add_argument('--device', choices=('cpu', 'cuda', 'auto'), default='auto',
                        help='cpu (num_gpu: 0), cuda (num_gpu: 1) or auto (a GPU if there is one; default)')
    group = parser.add_argument_group('pretrained FP network (skips the fp stage; see below)')
    group.add_argument('--pretrained-opt', default=None, metavar='NET.yml',
                       help='option file whose network_g is the FP network (or a network_g-only YAML)')
    group.add_argument('--pretrained', default=None, metavar='CKPT.pth',
                       help='its weights: a BasicSR checkpoint or a plain state dict')
    group.add_argument('--param-key', default='params_ema',
                       help='checkpoint entry of --pretrained (default params_ema, falling back to params, then to '
                            'a plain state dict)')
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.bits = list(dict.fromkeys(args.bits))  # unique, in the given order
    args.layers = _layers_option(parser, args.layers)
    if args.pretrained_opt is None and args.pretrained is None:
        args.pretrained_net = args.pretrained_key = None
        args.scale = DEFAULT_SCALE if args.scale is None else args.scale
        args.num_feat = DEFAULT_NUM_FEAT if args.num_feat is None else args.num_feat
        args.num_block = DEFAULT_NUM_BLOCK if args.num_block is None else args.num_block
        args.fp_iters = DEFAULT_FP_ITERS if args.fp_iters is None else args.fp_iters
        if args.layers != 'default':
            _check_quantized(parser, edsr_arch(args), args)
    else:
        _check_pretrained(parser, args)
    if args.data is not None:
        if not os.path.isdir(args.data):
            parser.error(f'--data: folder not found: {args.data}')
        try:
            args.hr_images = _hr_images(args.data)
        except ValueError as e:
            parser.error(f'--data: {e}')
    if args.device == 'cuda':
        import torch
        if not torch.cuda.is_available():
            parser.error('--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)')
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f'--out: {args.out} exists and is not a folder')
    return args


def _layers_option(parser, values):
    """``--layers`` values -> ``'default'``, ``'all'`` or a list of patterns (as ``Quantized`` takes them)."""
    if len(values) == 1 and values[0] in ('default', 'all'):
        return values[0]
    if any(v in ('default', 'all') for v in values):
        parser.error(f'--layers: "default" and "all" stand alone, got {" ".join(values)}')
    return list(dict.fromkeys(values))


def _one_line(text):
    return ' '.join(str(text).split())


def _check_quantized(parser, net_opt, args):
    """Build the QAT stages' network once, so that a bad --layers fails here and not inside a training run."""
    from odm_basicsr.archs.quantized_arch import Quantized  # (imports odm_basicsr first: compat, registration)

    try:
        Quantized(deepcopy(net_opt), w_bits=args.bits[0], a_bits=args.bits[0], layers=deepcopy(args.layers))
    except Exception as e:  # noqa: BLE001  (any build error is the user's option: report it in one line)
        shown = args.layers if isinstance(args.layers, str) else ' '.join(args.layers)
        parser.error(f'--layers {shown}: {_one_line(e)} (the QAT network: --layers all, or patterns)')


def _check_pretrained(parser, args):
    """Check --pretrained-opt / --pretrained before anything runs; set pretrained_net, pretrained_key, scale."""
    if args.pretrained_opt is None or args.pretrained is None:
        given, missing = (('--pretrained-opt', '--pretrained') if args.pretrained is None
                          else ('--pretrained', '--pretrained-opt'))
        parser.error(f'{given} needs {missing} too: give the network\'s option file (--pretrained-opt NET.yml) and '
                     'its weights (--pretrained CKPT.pth) together')
    for flag, value in (('--num-feat', args.num_feat), ('--num-block', args.num_block),
                        ('--fp-iters', args.fp_iters)):
        if value is not None:
            parser.error(f'{flag} does not apply with --pretrained: the network comes from --pretrained-opt and the '
                         'fp stage is not trained')
    from odm_basicsr.evaluate import EvalError, build_network, load_net_options, load_weights

    if not os.path.isfile(args.pretrained_opt):
        parser.error(f'--pretrained-opt: option file not found: {args.pretrained_opt}')
    if not os.path.isfile(args.pretrained):
        parser.error(f'--pretrained: checkpoint file not found: {args.pretrained}')
    try:
        net_opt, scale = load_net_options(args.pretrained_opt)
    except EvalError as e:
        parser.error(f'--pretrained-opt: {_one_line(e)}')
    if net_opt['type'] == 'Quantized':
        parser.error(f'--pretrained-opt: {args.pretrained_opt}: network_g is Quantized; give the FP network (the '
                     'demo wraps it in Quantized for the QAT stages)')
    upscale = net_opt.get('upscale', net_opt.get('scale'))
    if upscale is not None and int(upscale) != scale:
        parser.error(f'--pretrained-opt: {args.pretrained_opt}: scale {scale} conflicts with network_g upscale '
                     f'{upscale}')
    if args.scale is not None and args.scale != scale:
        parser.error(f'--scale {args.scale} conflicts with the x{scale} network of {args.pretrained_opt}: leave '
                     '--scale out (it comes from the network)')
    if scale not in (2, 3, 4):
        parser.error(f'--pretrained-opt: {args.pretrained_opt}: a x{scale} network; the demo runs x2, x3 or x4')
    try:
        net = build_network(net_opt)
    except EvalError as e:
        parser.error(f'--pretrained-opt: {_one_line(e)}')
    try:
        key = load_weights(net, args.pretrained, args.param_key)
    except EvalError as e:
        parser.error(f'--pretrained: {_one_line(e)}')
    del net
    args.pretrained_opt, args.pretrained = os.path.abspath(args.pretrained_opt), os.path.abspath(args.pretrained)
    args.pretrained_net, args.pretrained_key, args.scale = net_opt, key, scale
    _check_quantized(parser, net_opt, args)


# ---------------------------------------------------------------------------------------------------------------
# --data: HR folder -> HR / LR_bicubic pairs for PairedImageDataset
# ---------------------------------------------------------------------------------------------------------------

def _hr_images(folder):
    hr_dir = os.path.join(folder, 'HR') if os.path.isdir(os.path.join(folder, 'HR')) else folder
    files = sorted(f for f in os.listdir(hr_dir) if f.lower().endswith(IMAGE_EXTS)
                   and os.path.isfile(os.path.join(hr_dir, f)))
    if not files:
        raise ValueError(f'no images ({", ".join(IMAGE_EXTS)}) in {hr_dir}')
    return [os.path.join(hr_dir, f) for f in files]


def prepare_paired_data(hr_paths, out, scale, min_size, log=print):
    """Write ``HR/*.png`` (cropped to a multiple of ``scale``) and ``LR_bicubic/X<scale>/*.png`` under ``out``.

    LR = BasicSR's MATLAB-compatible bicubic downscale, rounded to 8 bit (as DIV2K's LR files are made). Existing
    files are kept. Images with a side under ``min_size`` are skipped. Returns ``(hr_dir, lr_dir, count)``.
    """
    import cv2
    import numpy as np
    from basicsr.utils.matlab_functions import imresize

    hr_dir, lr_dir = os.path.join(out, 'HR'), os.path.join(out, 'LR_bicubic', f'X{scale}')
    os.makedirs(hr_dir, exist_ok=True)
    os.makedirs(lr_dir, exist_ok=True)
    count, skipped, made = 0, [], 0
    for path in hr_paths:
        name = os.path.splitext(os.path.basename(path))[0] + '.png'
        hr_out, lr_out = os.path.join(hr_dir, name), os.path.join(lr_dir, name)
        if os.path.isfile(hr_out) and os.path.isfile(lr_out):
            count += 1
            continue
        img = cv2.imread(path, cv2.IMREAD_COLOR)
        if img is None:
            skipped.append(f'{os.path.basename(path)} (unreadable)')
            continue
        h, w = img.shape[:2]
        h, w = h - h % scale, w - w % scale
        if min(h, w) < min_size:
            skipped.append(f'{os.path.basename(path)} ({img.shape[1]}x{img.shape[0]} < {min_size} px)')
            continue
        img = np.ascontiguousarray(img[:h, :w])
        lr = imresize(img.astype(np.float32) / 255., 1. / scale)
        lr = np.clip(np.round(lr * 255.), 0, 255).astype(np.uint8)
        cv2.imwrite(hr_out, img)
        cv2.imwrite(lr_out, lr)
        count += 1
        made += 1
    if skipped:
        log(f'--data: skipped {len(skipped)} image(s): {", ".join(skipped[:5])}{" ..." if len(skipped) > 5 else ""}')
    if count == 0:
        raise SystemExit(f'odm-demo: error: --data: no usable image (each side must be >= {min_size} px)')
    if made:
        log(f'--data: made {made} LR image(s) (MATLAB bicubic x1/{scale}) in {lr_dir}')
    return hr_dir, lr_dir, count


# ---------------------------------------------------------------------------------------------------------------
# Stages and their BasicSR options
# ---------------------------------------------------------------------------------------------------------------

class Stage:
    """One row of the study. ``checkpoint``: a given file (a pretrained FP network, not trained here: ``opt`` then
    only holds its ``network_g``) instead of the stage's own ``experiments/<name>/models/net_g_latest.pth``."""

    def __init__(self, name, method, bits, opt, checkpoint=None, param_key='params'):
        self.name, self.method, self.bits, self.opt = name, method, bits, opt
        self._checkpoint, self.param_key = checkpoint, param_key

    @property
    def pretrained(self):
        return self._checkpoint is not None

    @property
    def checkpoint(self):
        if self._checkpoint is not None:
            return self._checkpoint
        return os.path.join('experiments', self.name, 'models', 'net_g_latest.pth')


def edsr_arch(args):
    return {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': args.num_feat, 'num_block': args.num_block,
            'upscale': args.scale}


def fp_arch(args):
    """``network_g`` of the FP network: the pretrained one (``args.pretrained_net``) or the demo's EDSR."""
    net = getattr(args, 'pretrained_net', None)
    return deepcopy(net) if net is not None else edsr_arch(args)


def val_dataset_opt():
    return {'name': 'embedded_val', 'type': 'EmbeddedSRDataset', 'split': 'val', 'val_size': VAL_SIZE}


def train_dataset_opt(args, paired=None):
    common = {'gt_size': LR_PATCH * args.scale, 'use_hflip': True, 'use_rot': True, 'num_worker_per_gpu': 0,
              'batch_size_per_gpu': BATCH, 'prefetch_mode': None}
    if paired is None:
        return {'name': 'embedded_train', 'type': 'EmbeddedSRDataset', 'split': 'train',
                'dataset_enlarge_ratio': 1000, **common}
    hr_dir, lr_dir, count = paired
    return {'name': 'data_train', 'type': 'PairedImageDataset', 'dataroot_gt': os.path.abspath(hr_dir),
            'dataroot_lq': os.path.abspath(lr_dir), 'filename_tmpl': '{}', 'io_backend': {'type': 'disk'},
            'dataset_enlarge_ratio': max(1, math.ceil(100 * BATCH / count)), **common}


def _num_gpu(device):
    return {'cpu': 0, 'cuda': 1, 'auto': 'auto'}[device]


def base_options(name, args, train_set, total_iter, lr, milestones):
    freq = max(1, total_iter // 10)
    return {
        'name': name,
        'model_type': 'SRModel',
        'scale': args.scale,
        'num_gpu': _num_gpu(args.device),
        'manual_seed': SEED,
        'datasets': {'train': deepcopy(train_set), 'val': val_dataset_opt()},
        'network_g': fp_arch(args),
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {
            'ema_decay': 0,
            'optim_g': {'type': 'Adam', 'lr': lr, 'weight_decay': 0, 'betas': [0.9, 0.99]},
            'scheduler': {'type': 'MultiStepLR', 'milestones': milestones, 'gamma': 0.5},
            'total_iter': total_iter,
            'warmup_iter': -1,
            'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'},
        },
        'val': {'val_freq': max(1, total_iter // 5), 'save_img': False, 'metrics': {
            'psnr': {'type': 'calculate_psnr', 'crop_border': args.scale, 'test_y_channel': True},
            'ssim': {'type': 'calculate_ssim', 'crop_border': args.scale, 'test_y_channel': True},
        }},
        'logger': {'print_freq': freq, 'save_checkpoint_freq': max(1, total_iter // 5), 'use_tb_logger': True,
                   'wandb': {'project': None, 'resume_id': None}},
    }


def plan_stages(args, train_set):
    """The stages of this study, in run order (the first one, ``fp``, is not trained with ``--pretrained``)."""
    pretrained = getattr(args, 'pretrained', None)
    layers = getattr(args, 'layers', 'default')
    if pretrained:
        fp_key = getattr(args, 'pretrained_key', None)
        stages = [Stage('fp', 'fp', 32, {'network_g': fp_arch(args)}, checkpoint=os.path.abspath(pretrained),
                        param_key=fp_key)]
        fp_ckpt = os.path.abspath(pretrained)
    else:
        fp = base_options('fp', args, train_set, args.fp_iters, FP_LR, [max(1, (2 * args.fp_iters) // 3)])
        stages = [Stage('fp', 'fp', 32, fp)]
        fp_ckpt = os.path.join('experiments', 'fp', 'models', 'net_g_latest.pth')
    methods = ['baseline', 'odm'] + (['naive_half'] if args.controls else [])
    for b in args.bits:
        for method in methods:
            name = f'w{b}_{method}'
            opt = base_options(name, args, train_set, args.qat_iters, QAT_LR, [10 * args.qat_iters])  # constant
            opt['model_type'] = 'ODMModel'
            opt['network_g'] = {'type': 'Quantized', 'arch': fp_arch(args), 'w_bits': b, 'a_bits': b}
            if layers != 'default':  # (absent by default: the option files of earlier studies stay reusable)
                opt['network_g']['layers'] = deepcopy(layers)
            opt['path']['pretrain_network_g'] = fp_ckpt  # relative to the work folder (the runs' cwd)
            if pretrained:
                # the entry found in it; 'params' also loads a plain state dict (compat.load_network falls back)
                opt['path']['param_key_g'] = fp_key or 'params'
            opt['train']['calibration'] = {'batches': CALIB_BATCHES}
            if method == 'baseline':
                opt['train']['cooperation'] = 'off'
            elif method == 'odm':
                opt['train']['cooperation'] = 'feature'
                opt['train']['var_opt'] = {'type': 'FeatureVarianceLoss', 'loss_weight': args.var_weight,
                                           'reduction': 'channel'}
                opt['network_g']['offsets'] = dict(OFFSETS)
            else:  # naive_half: odm without the gating, at half the weight (about the strength gating passes)
                opt['train']['cooperation'] = 'naive'
                opt['train']['var_opt'] = {'type': 'FeatureVarianceLoss', 'loss_weight': args.var_weight / 2,
                                           'reduction': 'channel'}
                opt['network_g']['offsets'] = dict(OFFSETS)
            stages.append(Stage(name, method, b, opt))
    return stages


# ---------------------------------------------------------------------------------------------------------------
# Running one stage
# ---------------------------------------------------------------------------------------------------------------

_ITER_RE = re.compile(r'\]\[epoch:\s*\d+, iter:\s*([\d,]+), lr:\(([^)]*)\)\]\s*(?:\[eta: ([^,]+),[^\]]*\])?(.*)$')
_LOSS_RE = re.compile(r'(\w+): ([-+0-9.eEnaif]+)')
_VAL_RE = re.compile(r'# (psnr|ssim): ([-+0-9.eEnaif]+)')


def _dump_yaml(opt, path):
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def float_repr(dumper, value):  # '1e-06' would be read back as a string by PyYAML: always write a '.'
        text = repr(value)
        if 'e' in text and '.' not in text.split('e')[0]:
            text = text.replace('e', '.0e', 1)
        return dumper.represent_scalar('tag:yaml.org,2002:float', text)

    Dumper.add_representer(float, float_repr)
    with open(path, 'w', encoding='utf-8') as f:
        yaml.dump(opt, f, Dumper=Dumper, sort_keys=False, default_flow_style=False)


def _load_yaml(path):
    import yaml
    with open(path, encoding='utf-8') as f:
        return yaml.safe_load(f)


def _comparable(opt):
    opt = deepcopy(opt)
    opt.pop('num_gpu', None)  # the device may change between runs of one study
    return opt


def _diff_keys(a, b, prefix=''):
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff_keys(a.get(k), b.get(k), f'{prefix}{k}.')
        return out
    return [] if a == b else [prefix.rstrip('.')]


def _stage_started(name):
    root = os.path.join('experiments', name)
    return os.path.isfile(os.path.join(root, 'models', 'net_g_latest.pth')) or (
        os.path.isdir(os.path.join(root, 'training_states')) and os.listdir(os.path.join(root, 'training_states')))


def check_reuse(stage, opt_path):
    """Refuse to resume or reuse a stage trained with other settings."""
    if not (os.path.isfile(opt_path) and _stage_started(stage.name)):
        return
    old = _load_yaml(opt_path)
    diff = _diff_keys(_comparable(old), _comparable(stage.opt))
    if diff:
        raise SystemExit(f'odm-demo: error: stage {stage.name} in {os.getcwd()} was trained with other settings '
                         f'({", ".join(diff[:6])} differ). Use another --out, or delete experiments/{stage.name} '
                         f'to retrain it.')


def run_stage(stage, log=print):
    """Train one stage (or skip it when its checkpoint exists). Returns its record. cwd = the work folder."""
    os.makedirs('options', exist_ok=True)
    os.makedirs('console', exist_ok=True)
    opt_path = os.path.join('options', f'{stage.name}.yml')
    meta_path = os.path.join('experiments', stage.name, 'demo_stage.json')
    check_reuse(stage, opt_path)
    _dump_yaml(stage.opt, opt_path)
    if os.path.isfile(stage.checkpoint):
        meta = _load_json(meta_path) or {}
        log(f'[{stage.name}] skipped: {stage.checkpoint} exists (finished earlier)')
        return {**meta, 'skipped': True}
    total = stage.opt['train']['total_iter']
    cmd = [sys.executable, '-m', 'odm_basicsr.train', '-opt', opt_path, '--auto_resume']
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    log(f'[{stage.name}] training: {total} iterations ({shlex.join(cmd[1:])})')
    start = time.time()
    tail, val, consumed, last_val = [], {}, None, None
    with open(os.path.join('console', f'{stage.name}.txt'), 'a', encoding='utf-8') as console:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
        for line in proc.stdout:
            console.write(line)
            tail = (tail + [line.rstrip('\n')])[-40:]
            m = _ITER_RE.search(line)
            if m:
                it = int(m.group(1).replace(',', ''))
                losses = ' '.join(f'{k} {float(v):.4g}' for k, v in _LOSS_RE.findall(m.group(4)))
                eta = f'  eta {m.group(3)}' if m.group(3) and not m.group(3).startswith('-') else ''
                log(f'[{stage.name}] iter {it}/{total} {losses}{eta}')
                continue
            v = _VAL_RE.search(line)
            if v:
                val[v.group(1)] = float(v.group(2))
                if v.group(1) == 'ssim' and 'psnr' in val:
                    shown = f'[{stage.name}] val psnr {val["psnr"]:.2f} dB  ssim {val["ssim"]:.4f}'
                    if shown != last_val:  # the final validation repeats the one at the last iteration
                        log(shown)
                    last_val = shown
            if 'Resuming training from' in line:
                log(f'[{stage.name}] {line.split(" INFO: ")[-1].strip()}')
            if 'Time consumed:' in line:
                consumed = line.split('Time consumed:')[-1].strip()
        rc = proc.wait()
    seconds = time.time() - start
    if rc != 0 or not os.path.isfile(stage.checkpoint):
        raise SystemExit(f'odm-demo: error: stage {stage.name} failed (exit status {rc}); last output:\n'
                         + '\n'.join(tail) + f'\n(full output: {os.path.abspath("console")}/{stage.name}.txt)')
    meta = {'train_wall_s': round(seconds, 1), 'basicsr_time_consumed': consumed, 'log_psnr': val.get('psnr'),
            'log_ssim': val.get('ssim'), 'iters': total}
    with open(meta_path, 'w', encoding='utf-8') as f:
        json.dump(meta, f, indent=2)
    log(f'[{stage.name}] done in {seconds:.0f} s')
    return {**meta, 'skipped': False}


def _load_json(path):
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# Evaluation (in process)
# ---------------------------------------------------------------------------------------------------------------

def val_pairs(scale):
    """``[(name, lq tensor 1xCxhxw, gt uint8 BGR)]`` of the embedded val split, as BasicSR's val loader gives them."""
    from basicsr.utils import tensor2img

    from odm_basicsr.data.embedded_dataset import EmbeddedSRDataset

    ds = EmbeddedSRDataset({**val_dataset_opt(), 'phase': 'val', 'scale': scale})
    pairs = []
    for i in range(len(ds)):
        item = ds[i]
        name = os.path.splitext(os.path.basename(item['lq_path']))[0]
        pairs.append((name, item['lq'].unsqueeze(0), tensor2img([item['gt'].unsqueeze(0)])))
    return pairs


def _metrics(images, pairs, scale):
    from basicsr.metrics import calculate_psnr, calculate_ssim
    psnr = [calculate_psnr(img, gt, crop_border=scale, test_y_channel=True) for img, (_, _, gt) in zip(images, pairs)]
    ssim = [calculate_ssim(img, gt, crop_border=scale, test_y_channel=True) for img, (_, _, gt) in zip(images, pairs)]
    return {'psnr': float(sum(psnr) / len(psnr)), 'ssim': float(sum(ssim) / len(ssim)),
            'per_image_psnr': {name: round(float(p), 4) for (name, _, _), p in zip(pairs, psnr)}}


def bicubic_images(pairs, scale):
    from basicsr.utils import img2tensor, tensor2img
    from basicsr.utils.matlab_functions import imresize
    out = []
    for _, lq, _ in pairs:
        lr = lq[0].permute(1, 2, 0).numpy()
        up = imresize(lr, scale)
        out.append(tensor2img([img2tensor(up, bgr2rgb=False, float32=True).unsqueeze(0)]))
    return out


def load_net(network_opt, path, device, param_key='params'):
    """Build ``network_opt`` with BasicSR's ``build_network`` and load ``param_key`` of ``path`` strictly.

    ``param_key`` falls back to ``params``, then to a plain state dict (None: a plain state dict).
    """
    from basicsr.archs import build_network

    from odm_basicsr.compat import load_checkpoint, select_state_dict
    from odm_basicsr.quant.offsets import ensure_offsets_from_state

    net = build_network(deepcopy(network_opt))
    _, state = select_state_dict(load_checkpoint(path), param_key, source=f'checkpoint {path}')
    ensure_offsets_from_state(net, state)
    net.load_state_dict(state, strict=True)
    return net.to(device).eval()


def sr_images(net, pairs, device):
    import torch
    from basicsr.utils import tensor2img
    out = []
    with torch.no_grad():
        for _, lq, _ in pairs:
            out.append(tensor2img([net(lq.to(device)).cpu()]))
    return out


def _eval_device(device):
    import torch
    if device == 'cuda' or (device == 'auto' and torch.cuda.is_available()):
        return torch.device('cuda')
    return torch.device('cpu')


# ---------------------------------------------------------------------------------------------------------------
# Pictures and tables
# ---------------------------------------------------------------------------------------------------------------

def crop_box(gt_bgr, size=CROP):
    """Top-left corner of the ``size`` x ``size`` window with the most HR gradient energy (fixed by the HR image
    alone, never by the results)."""
    import cv2
    import numpy as np
    y = cv2.cvtColor(gt_bgr, cv2.COLOR_BGR2GRAY).astype(np.float64)
    energy = np.abs(np.diff(y, axis=0))[:, :-1] + np.abs(np.diff(y, axis=1))[:-1, :]
    integral = cv2.integral(energy)
    h, w = energy.shape
    size = min(size, h, w)
    best, best_pos = -1.0, (0, 0)
    for top in range(0, h - size + 1, 4):
        for left in range(0, w - size + 1, 4):
            s = (integral[top + size, left + size] - integral[top, left + size] - integral[top + size, left]
                 + integral[top, left])
            if s > best:
                best, best_pos = s, (top, left)
    return best_pos


def comparison_png(path, panels, box, size=CROP):
    """Write panels ``[(label, uint8 BGR image)]`` side by side: crop at ``box``, nearest x ZOOM, label strip."""
    import cv2
    import numpy as np
    top, left = box
    tiles = []
    for label, img in panels:
        crop = img[top:top + size, left:left + size]
        crop = cv2.resize(crop, (crop.shape[1] * ZOOM, crop.shape[0] * ZOOM), interpolation=cv2.INTER_NEAREST)
        strip = np.full((LABEL_H, crop.shape[1], 3), 255, np.uint8)
        cv2.putText(strip, label, (4, LABEL_H - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(np.concatenate([strip, crop], axis=0))
    gap = np.full((tiles[0].shape[0], GAP, 3), 255, np.uint8)
    row = [tiles[0]]
    for t in tiles[1:]:
        row += [gap, t]
    cv2.imwrite(path, np.concatenate(row, axis=1))


def _fmt_time(seconds):
    if seconds is None:
        return '-'
    return f'{int(seconds) // 60}:{int(seconds) % 60:02d}'


def table_rows(results):
    """Rows ``(method, bits, psnr, ssim, dpsnr, dssim, time)`` as strings; differences to the same-bit baseline."""
    rows = []
    base = {r['bits']: r for r in results['stages'] if r['method'] == 'baseline'}
    b = results['bicubic']
    rows.append(('bicubic', '-', f'{b["psnr"]:.2f}', f'{b["ssim"]:.4f}', '', '', '-'))
    for r in results['stages']:
        d_psnr = d_ssim = ''
        ref = base.get(r['bits'])
        if r['method'] not in ('fp', 'baseline') and ref is not None:
            d_psnr, d_ssim = f'{r["psnr"] - ref["psnr"]:+.2f}', f'{r["ssim"] - ref["ssim"]:+.4f}'
        bits = 'FP32' if r['method'] == 'fp' else f'W{r["bits"]}A{r["bits"]}'
        method = 'fp (pretrained)' if r.get('pretrained') else r['method']
        rows.append((method, bits, f'{r["psnr"]:.2f}', f'{r["ssim"]:.4f}', d_psnr, d_ssim,
                     _fmt_time(r.get('train_wall_s'))))
    return rows


HEADER = ('method', 'bits', 'PSNR (dB)', 'SSIM', 'dPSNR vs baseline', 'dSSIM vs baseline', 'train time')


def format_table(results):
    rows = [HEADER] + table_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ['  '.join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, '-' * len(lines[0]))
    return '\n'.join(lines)


def _network_text(s):
    """The network / recipe sentence of results.md."""
    p = s.get('pretrained')
    if p:
        entry = f'[{p["param_key"]}]' if p['param_key'] else '(plain state dict)'
        text = (f'Pretrained FP {p["network"]} (`{p["options"]}`, weights `{p["checkpoint"]}` {entry}), '
                f'x{s["scale"]}, not trained here; training data: {s["data"]}; each QAT stage {s["qat_iters"]} '
                f'iterations (lr {QAT_LR:g}) from these weights')
    else:
        text = (f'EDSR {s["num_feat"]} channels x {s["num_block"]} blocks, x{s["scale"]}; training data: '
                f'{s["data"]}; FP {s["fp_iters"]} iterations (lr {FP_LR:g}), each QAT stage {s["qat_iters"]} '
                f'iterations (lr {QAT_LR:g}) from the FP checkpoint')
    text += f', batch {BATCH}, LR patch {LR_PATCH}, seed {SEED}. '
    layers = s.get('layers', 'default')
    if layers != 'default':
        text += f'Quantized layers: {layers if isinstance(layers, str) else ", ".join(layers)}. '
    return text


def format_markdown(results):
    s = results['settings']
    lines = ['# odm-demo results', '',
             f'Command: `{results["command"]}`  ',
             f'Date: {results["date"]}  ',
             f'Machine: {results["machine"]["summary"]}; load average (1/5/15 min) at start '
             f'{results["machine"]["load_average_at_start"]}, at end {results["machine"]["load_average_at_end"]}  ',
             f'Wall time of this invocation: {_fmt_time(results["total_wall_s"])} (m:ss)'
             + (f'; {len(results["reused_stages"])} stage(s) reused from an earlier run of the same study '
                f'({", ".join(results["reused_stages"])}), their train times are from that run' if
                results['reused_stages'] else '') + '  ',
             f'Sum of the stage train times: {_fmt_time(results["train_wall_s_sum"])} (m:ss)', '',
             _network_text(s) + f'ODM: FeatureVarianceLoss (channel) weight {s["var_weight"]:g}, cooperation '
             f'feature, offsets top {OFFSETS["fraction"]:.0%} of the quantized layers.', '',
             f'Evaluation: embedded val photos (chelsea, rocket; centre {VAL_SIZE} px), Y channel, border = scale, '
             "BasicSR's calculate_psnr / calculate_ssim on 8-bit images (mean over the photos). Train time = wall "
             'time of the stage (process start, calibration and validation included).', '',
             '| ' + ' | '.join(HEADER) + ' |', '|' + '---|' * len(HEADER)]
    lines += ['| ' + ' | '.join(c or ' ' for c in row) + ' |' for row in table_rows(results)]
    if s.get('pretrained'):
        start = (f'The QAT stages fine-tune the pretrained network {s["qat_iters"]} iterations on the training data '
                 'above (not its own training data): the FP row is their starting point. ')
    else:
        start = (f'The QAT stages train the network {s["qat_iters"]} iterations beyond the FP checkpoint, so a short '
                 'FP stage can end below a quantized one: the FP row is their starting point, not an upper bound. ')
    lines += ['', 'Two small photos and one seed: treat differences of a few hundredths of a dB as noise. ' + start
              + 'This is a smoke-scale study, not a reproduction of the paper (DIV2K, 60K iterations, '
              'Set5/Set14/B100/Urban100).']
    pngs = [f'comparison_w{b}.png' for b in s['bits']]
    lines += ['', 'Crops: ' + ', '.join(f'[{p}]({p})' for p in pngs) + ' (bicubic | FP | baseline | ODM).', '']
    return '\n'.join(lines)


def _load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(device, load_at_start=None):
    import torch
    info = {'platform': platform.platform(), 'machine': platform.machine(), 'processor': platform.processor(),
            'python': platform.python_version(), 'torch': torch.__version__, 'cpu_count': os.cpu_count(),
            'torch_threads': torch.get_num_threads(), 'cuda_available': torch.cuda.is_available(),
            'device': str(device)}
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    info['load_average_at_start'], info['load_average_at_end'] = load_at_start, _load_average()  # 1, 5, 15 min
    where = info.get('gpu') or f'{info["cpu_count"]}-core {info["machine"]} CPU'
    info['summary'] = f'{where}, torch {info["torch"]}, Python {info["python"]}, {info["platform"]}'
    return info


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def main(argv=None):
    started, load_at_start = time.time(), _load_average()
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
        device = _eval_device(args.device)
        pairs = val_pairs(args.scale)
        bicubic = bicubic_images(pairs, args.scale)
        images, rows = {'bicubic': bicubic}, []
        for s in stages:
            net = load_net(s.opt['network_g'], s.checkpoint, device, s.param_key)
            images[s.name] = sr_images(net, pairs, device)
            m = _metrics(images[s.name], pairs, args.scale)
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
            'bicubic': {'method': 'bicubic', **_metrics(bicubic, pairs, args.scale)},
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
        with open('results.json', 'w', encoding='utf-8') as f:
            json.dump(results, f, indent=2)
        with open('results.md', 'w', encoding='utf-8') as f:
            f.write(format_markdown(results))
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
    log(f'Wall time {_fmt_time(results["total_wall_s"])} (m:ss){reused}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
