"""Helpers shared by the tests: option dicts, tiny arch options, study data, scripts, gloo ranks (not a test module)."""
import copy

TINY_EDSR = {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 2, 'upscale': 2}


def odm_opt(mode='feature', weight=1e-4, offsets=None, lr=1e-3, mult=1.0, reduction='channel', reg_type=None):
    """An in-process ODMModel option dict, as BasicSR's parse_options would return it."""
    train = {'name': 'emb', 'type': 'EmbeddedSRDataset', 'phase': 'train', 'scale': 2, 'split': 'train',
             'gt_size': 16, 'use_hflip': False, 'use_rot': False, 'batch_size_per_gpu': 2,
             'num_worker_per_gpu': 0, 'dataset_enlarge_ratio': 1}
    network = {'type': 'Quantized', 'arch': dict(TINY_EDSR), 'w_bits': 4, 'a_bits': 4}
    if offsets:
        network['offsets'] = offsets
    opt = {
        'name': 'odm', 'model_type': 'ODMModel', 'is_train': True, 'dist': False, 'rank': 0, 'world_size': 1,
        'num_gpu': 0, 'manual_seed': 0, 'scale': 2, 'datasets': {'train': train}, 'network_g': network,
        'path': {'pretrain_network_g': None, 'strict_load_g': True},
        'train': {'ema_decay': 0, 'optim_g': {'type': 'Adam', 'lr': lr}, 'total_iter': 10, 'warmup_iter': -1,
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [100], 'gamma': 0.5},
                  'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}, 'cooperation': mode,
                  'quant_lr_mult': mult, 'calibration': {'batches': 2}, 'log_layer_freq': 1000},
    }
    if mode != 'off':
        opt['train']['reg_opt'] = {'type': reg_type or 'FeatureVarianceLoss', 'loss_weight': weight}
        if (reg_type or 'FeatureVarianceLoss') == 'FeatureVarianceLoss':
            opt['train']['reg_opt']['reduction'] = reduction
    return copy.deepcopy(opt)

#: Tiny constructor options per arch with a default layer preset, as a function of the scale.
TINY = {
    'EDSR': lambda s: dict(num_in_ch=3, num_out_ch=3, num_feat=8, num_block=2, upscale=s),
    'RDN': lambda s: dict(num_feat=8, num_block=2, num_layer=2, growth=4, upscale=s),
    'SRResNet': lambda s: dict(num_feat=8, num_block=2, upscale=s),
    'MSRResNet': lambda s: dict(num_feat=8, num_block=2, upscale=s),
    'RCAN': lambda s: dict(num_in_ch=3, num_out_ch=3, num_feat=8, num_group=2, num_block=2, squeeze_factor=4,
                           upscale=s),
    'RRDBNet': lambda s: dict(num_in_ch=3, num_out_ch=3, num_feat=8, num_block=1, num_grow_ch=4, scale=s),
    'SwinIR': lambda s: dict(upscale=s, img_size=8, window_size=4, embed_dim=8, depths=[2], num_heads=[2],
                             mlp_ratio=2, upsampler='pixelshuffledirect'),
    # inputs below 15x15 (the sweeps' 8x8) run with RLFN's ESA pooling window clipped to the map (rlfn_arch.py)
    'RLFN': lambda s: dict(num_feat=8, mid_feat=8, num_block=2, esa_feat=4, upscale=s),
}


def load_script(name):
    """Import ``scripts/<name>.py`` as a module (registered in ``sys.modules`` so worker processes find it)."""
    import importlib.util
    import sys
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / 'scripts' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def smooth_image(rng, h, w):
    """A smooth random colour image (uint8 BGR): bicubic-friendly, unlike white noise."""
    import cv2
    import numpy as np
    small = rng.uniform(0, 255, (h // 8, w // 8, 3)).astype(np.float32)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def make_study_data(root, scale, train_images, train_size, bench_size):
    """The study scripts' data root in ``root`` (a ``pathlib.Path``), of :func:`smooth_image` images (seed 0):
    ``train/T91`` (``train_images`` HR images, ``train_size`` = (h, w)) and ``benchmark/Set5``, ``Set14`` (2 images
    each, ``bench_size``: HR and LRbicx<scale>, MATLAB bicubic). Returns ``root``."""
    import cv2
    import numpy as np

    from odm_basicsr.study.data import bicubic_lr
    rng = np.random.default_rng(0)
    train = root / 'train' / 'T91'
    train.mkdir(parents=True)
    for i in range(train_images):
        cv2.imwrite(str(train / f't{i}.png'), smooth_image(rng, *train_size))
    for name in ('Set5', 'Set14'):
        hr_dir, lr_dir = root / 'benchmark' / name / 'HR', root / 'benchmark' / name / f'LRbicx{scale}'
        hr_dir.mkdir(parents=True)
        lr_dir.mkdir(parents=True)
        for i in range(2):
            hr = smooth_image(rng, *bench_size)
            cv2.imwrite(str(hr_dir / f'img{i}.png'), hr)
            cv2.imwrite(str(lr_dir / f'img{i}.png'), bicubic_lr(hr, scale))
    return root


def run_script(script, args, cwd, timeout=300):
    """``python <script> <args>`` in ``cwd`` on one passive OpenMP thread; the CompletedProcess (text captured)."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS='1', OMP_WAIT_POLICY='PASSIVE')
    return subprocess.run([sys.executable, script] + args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _gloo_worker(rank, fn, world_size, init_file, result_file):
    import torch
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    try:
        torch.save(fn(rank), f'{result_file}.{rank}')
    finally:
        dist.destroy_process_group()


def run_on_gloo_ranks(fn, tmp_path, world_size=2):
    """Run ``fn(rank)`` in ``world_size`` forked processes joined in one gloo group; return its results by rank.

    fork: the children inherit the imported modules instead of importing basicsr again (~10 s each).
    """
    import torch
    import torch.multiprocessing as mp
    init, res = str(tmp_path / 'init'), str(tmp_path / 'res')
    mp.start_processes(_gloo_worker, args=(fn, world_size, init, res), nprocs=world_size, join=True,
                       start_method='fork')
    return [torch.load(f'{res}.{r}') for r in range(world_size)]

