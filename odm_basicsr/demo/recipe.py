"""What the demo trains and evaluates on: its settings, networks, datasets and stages."""
import os
from copy import deepcopy

from odm_basicsr.study.data import paired_dataset_opt, patch_options
from odm_basicsr.study.options import training_options
from odm_basicsr.study.runner import Stage

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


def edsr_arch(args):
    """``network_g`` of the demo's EDSR (``args``: ``num_feat``, ``num_block``, ``scale``)."""
    return {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': args.num_feat, 'num_block': args.num_block,
            'upscale': args.scale}


def fp_arch(args):
    """``network_g`` of the FP network: the pretrained one (``args.pretrained_net``) or the demo's EDSR."""
    net = getattr(args, 'pretrained_net', None)
    return deepcopy(net) if net is not None else edsr_arch(args)


def val_dataset_opt():
    """The held-out embedded val photos (chelsea, rocket; centre ``VAL_SIZE`` px)."""
    return {'name': 'embedded_val', 'type': 'EmbeddedSRDataset', 'split': 'val', 'val_size': VAL_SIZE}


def train_dataset_opt(args, paired=None):
    """``datasets.train``: the embedded train photos, or the pairs made from ``--data``."""
    if paired is not None:
        return paired_dataset_opt(paired, args.scale, LR_PATCH, BATCH)
    return {'name': 'embedded_train', 'type': 'EmbeddedSRDataset', 'split': 'train', 'dataset_enlarge_ratio': 1000,
            **patch_options(args.scale, LR_PATCH, BATCH)}


def base_options(name, args, train_set, total_iter, lr, milestones):
    """The BasicSR options of a demo stage (``SRModel`` on the FP network, validated on the val photos)."""
    return training_options(name, args.scale, args.device, train_set, total_iter, lr, milestones, fp_arch(args),
                            seed=SEED, val_set=val_dataset_opt())


def plan_stages(args, train_set):
    """The stages of the demo, in run order (the first one, ``fp``, is not trained with ``--pretrained``)."""
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
                # the entry found in it; 'params' also loads a plain state dict (select_state_dict falls back)
                opt['path']['param_key_g'] = fp_key or 'params'
            opt['train']['calibration'] = {'batches': CALIB_BATCHES}
            if method == 'baseline':
                opt['train']['cooperation'] = 'off'
            elif method == 'odm':
                opt['train']['cooperation'] = 'feature'
                opt['train']['reg_opt'] = {'type': 'FeatureVarianceLoss', 'loss_weight': args.var_weight,
                                           'reduction': 'channel'}
                opt['network_g']['offsets'] = dict(OFFSETS)
            else:  # naive_half: odm without the gating, at half the weight (about the strength gating passes)
                opt['train']['cooperation'] = 'naive'
                opt['train']['reg_opt'] = {'type': 'FeatureVarianceLoss', 'loss_weight': args.var_weight / 2,
                                           'reduction': 'channel'}
                opt['network_g']['offsets'] = dict(OFFSETS)
            stages.append(Stage(name, method, b, opt))
    return stages


def val_pairs(scale):
    """The embedded val photos as scoring pairs ``(name, lq, gt)``, as BasicSR's val loader gives them."""
    from basicsr.utils import tensor2img

    from odm_basicsr.data.embedded_dataset import EmbeddedSRDataset

    ds = EmbeddedSRDataset({**val_dataset_opt(), 'phase': 'val', 'scale': scale})
    pairs = []
    for i in range(len(ds)):
        item = ds[i]
        name = os.path.splitext(os.path.basename(item['lq_path']))[0]
        pairs.append((name, item['lq'].unsqueeze(0), tensor2img([item['gt'].unsqueeze(0)])))
    return pairs
