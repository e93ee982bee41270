"""The BasicSR options of one training run of a study: the demo's recipe (L1 loss, Adam, multi-step schedule).

:func:`training_options` is the recipe of every run (the demo's stages too). :func:`fp_options` and
:func:`qat_options` are the two runs of the study scripts (``scripts/mini_study.py``, ``scripts/deploy_study.py``):
an FP network trained from scratch and a short plain-QAT fine-tune of a pretrained one, neither validated during
training (:func:`strip_val`: the scripts score every run afterwards).
"""
from copy import deepcopy

# The study scripts' recipe (the demo's is in odm_basicsr.demo.recipe).
FP_LR = 1e-3  # halved at 2/3 of the FP run
QAT_LR = 1e-4  # constant
FP_SEED = 10
BATCH = 8
LR_PATCH = 24  # HR patch 96 at x4: keeps most of T91 (78 to 508 px; smaller images are skipped)
CALIB_BATCHES = 4  # train.calibration.batches of a QAT run


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


def strip_val(opt):
    """No in-training validation (a study scores every run itself afterwards); one checkpoint, at the end."""
    opt['datasets'].pop('val', None)
    opt.pop('val', None)
    opt['logger']['save_checkpoint_freq'] = opt['train']['total_iter']
    return opt


def fp_options(name, scale, device, train_set, total_iter, network_g, seed=FP_SEED):
    """An FP run from scratch: Adam lr FP_LR, halved at 2/3 of the run; no validation."""
    return strip_val(training_options(name, scale, device, train_set, total_iter, FP_LR,
                                      [max(1, (2 * total_iter) // 3)], network_g, seed))


def qat_options(name, scale, device, train_set, total_iter, network_g, pretrained, seed):
    """A plain-QAT fine-tune: ``ODMModel`` on ``network_g`` (a ``Quantized`` network) from the FP checkpoint
    ``pretrained``, Adam lr QAT_LR constant, CALIB_BATCHES calibration batches; no validation. The caller sets
    what its arm changes (``train.cooperation``, ``reg_opt``, ``path.param_key_g``, ...)."""
    opt = strip_val(training_options(name, scale, device, train_set, total_iter, QAT_LR, [10 * total_iter],
                                     network_g, seed))
    opt['model_type'] = 'ODMModel'
    opt['path']['pretrain_network_g'] = pretrained
    opt['train']['calibration'] = {'batches': CALIB_BATCHES}
    return opt
