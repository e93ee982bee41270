#!/usr/bin/env python
"""Write the paper-recipe option files ``odm_basicsr/options/{train,test}/ODM/*.yml`` (package data).

Usage::

    python scripts/make_option_files.py            # (re)write every file
    python scripts/make_option_files.py --check    # exit 1 if a file on disk differs from what would be written

Naming: ``{train,test}_{ODM,QAT}_{EDSR,RDN,SRResNet}_W{b}A{b}_x{s}.yml`` with b in 4, 3, 2 and s in 2, 4; the
experiment ``name`` is the file name without ``train_`` / ``test_`` and ``.yml`` (``ODM_EDSR_W2A2_x4``). Installed,
they are found by name: ``odm-train -opt train/ODM/train_ODM_EDSR_W2A2_x4.yml`` (``odm-train --list-options``).
The paths inside them are relative to the working directory (BasicSR reads them so), not to the file.

* ``ODM``: ``model_type: ODMModel``, ``cooperation: feature``, the variance regulariser ``reg_opt`` and
  distribution offsets ``network_g.offsets`` (METHOD.md 2, 4).
* ``QAT``: the plain QAT baseline: the same model, quantizer, recipe and data with ``cooperation: off``, no
  ``reg_opt`` and no offsets (METHOD.md 4.2).
* Recipe (METHOD.md 5): DIV2K 1-800 sub-images (``scripts/prepare_div2k.py``), 60K iterations, batch 8, Adam lr
  1e-4 halved at 15K/30K/45K, L1, HR patch 96 (x2) / 192 (x4), flips and rotations, from the FP network
  ``pretrained/<arch>_x<s>_fp.pth`` (``scripts/convert_edsr_pytorch.py`` or your own FP training); validation
  on Set5, tests on Set5, Set14, B100 and Urban100 (``scripts/prepare_benchmark.py``), Y-channel PSNR/SSIM with
  ``crop_border: <scale>``.

Everything that varies is in the tables below (``ARCHS``, ``LAMBDA_VAR``, ``RECIPE``); edit them and rerun.
"""
# ruff: noqa: I001
import odm_basicsr.archs  # noqa: F401  (BasicSR fixes + registration first)

import argparse
import os
import sys

import yaml
from basicsr.utils.options import ordered_yaml

from odm_basicsr.utils.schema import yaml_text as format_scalar  # one line of YAML per scalar, list or flow mapping

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS_DIR = os.path.join('odm_basicsr', 'options')  # package data (setup.py's package_data)
TRAIN_DIR = os.path.join(OPTIONS_DIR, 'train', 'ODM')
TEST_DIR = os.path.join(OPTIONS_DIR, 'test', 'ODM')

METHODS = ('ODM', 'QAT')
BITS = (4, 3, 2)
SCALES = (2, 4)
TEST_SETS = ('Set5', 'Set14', 'B100', 'Urban100')

# the FP networks (METHOD.md 5); inputs in [0, 1], features on EDSR-PyTorch's 0-255 scale (img_range 255)
ARCHS = {
    'EDSR': {'title': 'EDSR-baseline (64 channels, 16 blocks)',
             'arch': {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 64, 'num_block': 16,
                      'upscale': None, 'res_scale': 1, 'img_range': 255.0, 'rgb_mean': [0.4488, 0.4371, 0.4040]}},
    'RDN': {'title': 'RDN config B (16 blocks x 8 layers, growth 64)',
            'arch': {'type': 'RDN', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 64, 'num_block': 16,
                     'num_layer': 8, 'growth': 64, 'upscale': None, 'img_range': 255.0}},
    'SRResNet': {'title': 'SRResNet with batch norm (DAQ/DDTB variant, 64 channels, 16 blocks)',
                 'arch': {'type': 'SRResNet', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 64, 'num_block': 16,
                          'upscale': None, 'img_range': 255.0}},
}

# lambda_var, the weight of the variance regulariser: the paper does not give it (METHOD.md 4.1)
LAMBDA_VAR = {'EDSR': 1e-6, 'RDN': 1e-6, 'SRResNet': 1e-6}
OFFSETS = {'select': 'topk', 'fraction': 0.25}

RECIPE = {
    'total_iter': 60000,
    'milestones': [15000, 30000, 45000],
    'lr': 1e-4,
    'betas': [0.9, 0.999],  # EDSR-PyTorch's Adam defaults (the code base of the paper); BasicSR's files use 0.99
    'batch_size_per_gpu': 8,
    'gt_size': {2: 96, 3: 144, 4: 192},
    'val_freq': 5000,
    'save_checkpoint_freq': 5000,
}


class Flow(dict):
    """A mapping written on one line (YAML flow style)."""


class Comment:
    """A value with a comment written after it (or on the line above it)."""

    def __init__(self, value, comment, above=False):
        self.value, self.comment, self.above = value, comment, above


# ----------------------------------------------------------------------------------------------------------------
# a small YAML writer (block mappings; flow lists and BasicSR-friendly scalars: format_scalar)


def to_yaml(node, indent=0):
    lines = []
    for key, value in node.items():
        comment = ''
        pad = ' ' * indent
        if isinstance(value, Comment):
            if value.above:
                lines.append(f'{pad}# {value.comment}')
            else:
                comment = f'  # {value.comment}'
            value = value.value
        if isinstance(value, dict) and not isinstance(value, Flow):
            lines.append(f'{pad}{key}:{comment}')
            lines.extend(to_yaml(value, indent + 2))
        else:
            lines.append(f'{pad}{key}: {format_scalar(value)}{comment}')
    return lines


def plain(node):
    """``node`` without Flow/Comment wrappers: what a YAML loader should give back."""
    if isinstance(node, Comment):
        return plain(node.value)
    if isinstance(node, dict):
        return {k: plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [plain(v) for v in node]
    return node


# ----------------------------------------------------------------------------------------------------------------
# the option files


def experiment_name(method, arch, bits, scale):
    return f'{method}_{arch}_W{bits}A{bits}_x{scale}'


def fp_checkpoint(arch, scale):
    return f'pretrained/{arch}_x{scale}_fp.pth'


def paired(name, gt, lq, extra=None):
    ds = {'name': name, 'type': 'PairedImageDataset', 'dataroot_gt': gt, 'dataroot_lq': lq,
          'io_backend': {'type': 'disk'}}
    ds.update(extra or {})
    return ds


def metrics(scale):
    return {m: {'type': f'calculate_{m}', 'crop_border': scale, 'test_y_channel': True} for m in ('psnr', 'ssim')}


def network(method, arch, bits, scale):
    inner = dict(ARCHS[arch]['arch'], upscale=scale)
    net = {'type': 'Quantized', 'arch': inner, 'w_bits': bits, 'a_bits': bits}
    if method == 'ODM':
        net['offsets'] = Comment(Flow(OFFSETS), 'distribution offsets (METHOD.md 4.3), attached at calibration')
    return net


def header(kind, method, arch, bits, scale):
    what = ('ODM quantization-aware training (variance regulariser, feature cooperation, distribution offsets)'
            if method == 'ODM' else 'plain QAT baseline of ODM (cooperation: off; same quantizer, recipe, data)')
    title = f'{ARCHS[arch]["title"]}, W{bits}A{bits}, x{scale}'
    stem = experiment_name(method, arch, bits, scale)
    if kind == 'train':
        return [
            f'# {what}:',
            f'# {title}.',
            '# Paper recipe (METHOD.md 5): DIV2K 1-800, 60K iterations, batch 8, Adam lr 1e-4 halved every 15K, '
            f'HR patch {RECIPE["gt_size"][scale]}.',
            '# Needs DIV2K sub-images (scripts/prepare_div2k.py), Set5 (scripts/prepare_benchmark.py) and the FP '
            'network',
            f'# {fp_checkpoint(arch, scale)} (scripts/convert_edsr_pytorch.py, or your own FP training).',
            '# Paths are relative to the working directory (as BasicSR reads them): run, where datasets/ and '
            'pretrained/ are,',
            f'#   odm-train -opt train/ODM/train_{stem}.yml   (a packaged name: odm-train --list-options)',
            '# Generated by scripts/make_option_files.py: edit the script and rerun it, not this file.',
        ]
    return [
        f'# Test of the network trained by train_{stem}.yml:',
        f'# {method}, {title}.',
        f'# Set5, Set14, B100, Urban100; PSNR and SSIM on the Y channel, border {scale} (METHOD.md 5).',
        '# Paths are relative to the working directory (as BasicSR reads them): run, where training ran,',
        f'#   odm-test -opt test/ODM/test_{stem}.yml   (a packaged name: odm-test --list-options)',
        '# Generated by scripts/make_option_files.py: edit the script and rerun it, not this file.',
    ]


def train_options(method, arch, bits, scale):
    train = {
        'ema_decay': 0,
        'optim_g': {'type': 'Adam', 'lr': RECIPE['lr'], 'weight_decay': 0, 'betas': RECIPE['betas']},
        'scheduler': {'type': 'MultiStepLR', 'milestones': RECIPE['milestones'], 'gamma': 0.5},
        'total_iter': RECIPE['total_iter'],
        'warmup_iter': -1,
        'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'},
    }
    if method == 'ODM':
        train['cooperation'] = 'feature'
        train['reg_opt'] = Comment(
            Flow(type='FeatureVarianceLoss', loss_weight=LAMBDA_VAR[arch], reduction='channel'),
            'lambda_var = reg_opt.loss_weight, not given by the paper (METHOD.md 4.1): tune it here', above=True)
    else:
        train['cooperation'] = Comment('off', 'plain QAT: no variance regulariser, no offsets')
    train['quant_lr_mult'] = 1.0
    train['calibration'] = {'batches': 8}
    train['log_layer_freq'] = 500
    return {
        'name': experiment_name(method, arch, bits, scale),
        'model_type': 'ODMModel',
        'scale': scale,
        'num_gpu': Comment(1, 'batch 8 on one GPU, as in the paper (more GPUs multiply the batch)'),
        'manual_seed': 10,
        'datasets': {
            'train': paired('DIV2K', 'datasets/DIV2K/DIV2K_train_HR_sub',
                            f'datasets/DIV2K/DIV2K_train_LR_bicubic/X{scale}_sub', {
                                'filename_tmpl': '{}',
                                'gt_size': RECIPE['gt_size'][scale],
                                'use_hflip': True,
                                'use_rot': True,
                                'use_shuffle': True,
                                'num_worker_per_gpu': 6,
                                'batch_size_per_gpu': RECIPE['batch_size_per_gpu'],
                                'dataset_enlarge_ratio': 1,
                                'prefetch_mode': None,
                            }),
            'val': paired('Set5', 'datasets/Set5/HR', f'datasets/Set5/LRbicx{scale}'),
        },
        'network_g': network(method, arch, bits, scale),
        'path': {
            'pretrain_network_g': Comment(fp_checkpoint(arch, scale), 'placeholder: the FP network, see header'),
            'param_key_g': 'params',
            'strict_load_g': True,
            'resume_state': None,
        },
        'train': train,
        'val': {'val_freq': RECIPE['val_freq'], 'save_img': False, 'metrics': metrics(scale)},
        'logger': {'print_freq': 100, 'save_checkpoint_freq': RECIPE['save_checkpoint_freq'],
                   'use_tb_logger': True, 'wandb': {'project': None, 'resume_id': None}},
        'dist_params': {'backend': 'nccl', 'port': 29500},
    }


def test_options(method, arch, bits, scale):
    name = experiment_name(method, arch, bits, scale)
    return {
        'name': name,
        'model_type': 'ODMModel',
        'scale': scale,
        'num_gpu': Comment(1, '0 = CPU'),
        'manual_seed': 10,
        'datasets': {f'test_{i}': paired(s, f'datasets/{s}/HR', f'datasets/{s}/LRbicx{scale}')
                     for i, s in enumerate(TEST_SETS, 1)},
        'network_g': network(method, arch, bits, scale),
        'path': {
            'pretrain_network_g': Comment(f'experiments/{name}/models/net_g_latest.pth',
                                          f'written by train_{name}.yml'),
            'param_key_g': 'params',
            'strict_load_g': True,
        },
        'val': {'save_img': True, 'suffix': None, 'metrics': metrics(scale)},
    }


SECTION_BREAKS = ('datasets', 'network_g', 'path', 'train', 'val', 'logger', 'dist_params')


def render(lines_header, options):
    lines = list(lines_header)
    for key in options:
        if key in SECTION_BREAKS:
            lines.append('')
        lines.extend(to_yaml({key: options[key]}))
    return '\n'.join(lines) + '\n'


def generate():
    """``{relative path: (file text, options as a YAML loader should read them)}`` for every file."""
    files = {}
    for method in METHODS:
        for arch in ARCHS:
            for bits in BITS:
                for scale in SCALES:
                    stem = experiment_name(method, arch, bits, scale)
                    for kind, make, folder in (('train', train_options, TRAIN_DIR), ('test', test_options, TEST_DIR)):
                        opts = make(method, arch, bits, scale)
                        text = render(header(kind, method, arch, bits, scale), opts)
                        files[os.path.join(folder, f'{kind}_{stem}.yml')] = (text, plain(opts))
    return files


def _loads(text):
    return yaml.load(text, Loader=ordered_yaml()[0])  # BasicSR's loader


def _same(a, b):
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--root', default=ROOT, help='repository root (default: this script\'s)')
    parser.add_argument('--check', action='store_true', help='only compare with the files on disk')
    args = parser.parse_args(argv)
    files = generate()
    for rel, (text, expected) in files.items():
        if not _same(_loads(text), expected):  # the writer's own test: the YAML reads back as intended
            raise RuntimeError(f'{rel}: the written YAML does not read back as the intended options')
    stale = []
    for folder in (TRAIN_DIR, TEST_DIR):
        path = os.path.join(args.root, folder)
        if os.path.isdir(path):
            stale += [os.path.join(folder, f) for f in sorted(os.listdir(path))
                      if f.endswith('.yml') and os.path.join(folder, f) not in files]
    if args.check:
        differ = []
        for rel, (text, _) in files.items():
            path = os.path.join(args.root, rel)
            if not os.path.isfile(path) or open(path, encoding='utf-8').read() != text:
                differ.append(rel)
        for rel in differ:
            print(f'out of date: {rel}')
        for rel in stale:
            print(f'not generated by this script: {rel}')
        if differ or stale:
            print('rerun: python scripts/make_option_files.py')
            return 1
        print(f'{len(files)} option files up to date')
        return 0
    for rel, (text, _) in files.items():
        path = os.path.join(args.root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'w', encoding='utf-8') as f:
            f.write(text)
    print(f'wrote {len(files)} option files under {os.path.join(args.root, OPTIONS_DIR)}')
    for rel in stale:
        print(f'note: {rel} is not generated by this script (left as it is)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
