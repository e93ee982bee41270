"""The ``odm-demo`` command line: flags, help, and every check made before anything trains."""
import argparse
import os
from copy import deepcopy

from odm_basicsr.study.argtypes import bit_width, positive_float, positive_int
from odm_basicsr.study.data import hr_images
from odm_basicsr.tool_cli import one_line

from .recipe import (
    DEFAULT_BITS,
    DEFAULT_FP_ITERS,
    DEFAULT_NUM_BLOCK,
    DEFAULT_NUM_FEAT,
    DEFAULT_OUT,
    DEFAULT_QAT_ITERS,
    DEFAULT_SCALE,
    DEFAULT_VAR_WEIGHT,
    FP_LR,
    QAT_LR,
    VAL_SIZE,
    edsr_arch,
)

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
    parser.add_argument('--bits', type=bit_width, nargs='+', default=list(DEFAULT_BITS), metavar='B',
                        help=f'bit widths W=A of the QAT stages, 2..8 (default {" ".join(map(str, DEFAULT_BITS))})')
    parser.add_argument('--fp-iters', type=positive_int, default=None,
                        help=f'iterations of the FP stage (default {DEFAULT_FP_ITERS}; not with --pretrained)')
    parser.add_argument('--qat-iters', type=positive_int, default=DEFAULT_QAT_ITERS,
                        help=f'iterations of each QAT stage (default {DEFAULT_QAT_ITERS})')
    parser.add_argument('--num-feat', type=positive_int, default=None,
                        help=f'EDSR channels (default {DEFAULT_NUM_FEAT}; not with --pretrained)')
    parser.add_argument('--num-block', type=positive_int, default=None,
                        help=f'EDSR residual blocks (default {DEFAULT_NUM_BLOCK}; not with --pretrained)')
    parser.add_argument('--scale', type=int, choices=(2, 3, 4), default=None,
                        help=f'upscaling factor (default {DEFAULT_SCALE}; with --pretrained-opt the network\'s scale)')
    parser.add_argument('--layers', nargs='+', default=['default'], metavar='L',
                        help='layers the QAT stages quantize: default (the arch\'s preset; default), all (every '
                             'conv/linear but the first and last) or glob / "re:" patterns on module names')
    parser.add_argument('--var-weight', type=positive_float, default=DEFAULT_VAR_WEIGHT,
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
            args.hr_images = hr_images(args.data)
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


def _check_quantized(parser, net_opt, args):
    """Build the QAT stages' network once, so that a bad --layers fails here and not inside a training run."""
    from odm_basicsr.archs.quantized_arch import Quantized  # (imports odm_basicsr first: compat, registration)

    try:
        Quantized(deepcopy(net_opt), w_bits=args.bits[0], a_bits=args.bits[0], layers=deepcopy(args.layers))
    except Exception as e:  # noqa: BLE001  (any build error is the user's option: report it in one line)
        shown = args.layers if isinstance(args.layers, str) else ' '.join(args.layers)
        parser.error(f'--layers {shown}: {one_line(e)} (the QAT network: --layers all, or patterns)')


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
    from odm_basicsr.network_options import build_network, read_network_options
    from odm_basicsr.scoring import load_weights
    from odm_basicsr.tool_cli import ToolError

    if not os.path.isfile(args.pretrained_opt):
        parser.error(f'--pretrained-opt: option file not found: {args.pretrained_opt}')
    if not os.path.isfile(args.pretrained):
        parser.error(f'--pretrained: checkpoint file not found: {args.pretrained}')
    try:
        net_opt, scale = read_network_options(args.pretrained_opt)
    except ToolError as e:
        parser.error(f'--pretrained-opt: {one_line(e)}')
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
    except ToolError as e:
        parser.error(f'--pretrained-opt: {one_line(e)}')
    try:
        key = load_weights(net, args.pretrained, args.param_key)
    except ToolError as e:
        parser.error(f'--pretrained: {one_line(e)}')
    del net
    args.pretrained_opt, args.pretrained = os.path.abspath(args.pretrained_opt), os.path.abspath(args.pretrained)
    args.pretrained_net, args.pretrained_key, args.scale = net_opt, key, scale
    _check_quantized(parser, net_opt, args)
