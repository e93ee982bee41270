"""Option dicts shared by the ODMModel tests (not a test module)."""
import copy

TINY_EDSR = {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 2, 'upscale': 2}


def odm_opt(mode='feature', weight=1e-4, offsets=None, lr=1e-3, mult=1.0, reduction='channel', var_type=None):
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
        opt['train']['var_opt'] = {'type': var_type or 'FeatureVarianceLoss', 'loss_weight': weight}
        if (var_type or 'FeatureVarianceLoss') == 'FeatureVarianceLoss':
            opt['train']['var_opt']['reduction'] = reduction
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
