"""The BasicSR options of one training run of a study: the demo's recipe (L1 loss, Adam, multi-step schedule)."""
from copy import deepcopy


def num_gpu(device):
    """BasicSR's ``num_gpu`` for a ``--device`` value."""
    return {'cpu': 0, 'cuda': 1, 'auto': 'auto'}[device]


def training_options(name, scale, device, train_set, total_iter, lr, milestones, network_g, seed, val_set=None):
    """A complete BasicSR training option dict for ``SRModel`` (a stage changes what it needs afterwards).

    Logs ten times a run, saves five times; with ``val_set`` validates five times (Y-PSNR / SSIM, border = scale).
    """
    opt = {
        'name': name,
        'model_type': 'SRModel',
        'scale': scale,
        'num_gpu': num_gpu(device),
        'manual_seed': seed,
        'datasets': {'train': deepcopy(train_set)},
        'network_g': deepcopy(network_g),
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {
            'ema_decay': 0,
            'optim_g': {'type': 'Adam', 'lr': lr, 'weight_decay': 0, 'betas': [0.9, 0.99]},
            'scheduler': {'type': 'MultiStepLR', 'milestones': milestones, 'gamma': 0.5},
            'total_iter': total_iter,
            'warmup_iter': -1,
            'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'},
        },
    }
    if val_set is not None:
        opt['datasets']['val'] = deepcopy(val_set)
        opt['val'] = {'val_freq': max(1, total_iter // 5), 'save_img': False, 'metrics': {
            'psnr': {'type': 'calculate_psnr', 'crop_border': scale, 'test_y_channel': True},
            'ssim': {'type': 'calculate_ssim', 'crop_border': scale, 'test_y_channel': True},
        }}
    opt['logger'] = {'print_freq': max(1, total_iter // 10), 'save_checkpoint_freq': max(1, total_iter // 5),
                     'use_tb_logger': True, 'wandb': {'project': None, 'resume_id': None}}
    return opt
