"""The BasicSR 1.4.2 bug fixes of odm_basicsr.compat that no other test exercises directly, and the line between
those fixes (every model) and the plugin's own policies (QuantSRModel and ODMModel only)."""
import os
import subprocess
import sys

import pytest
import torch
from basicsr.models.sr_model import SRModel
from torch import nn

from odm_basicsr.guards import NonFiniteError
from odm_basicsr.models.quant_sr_model import QuantSRModel
from odm_basicsr.utils.option_check import OptionError, check_options

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRRESNET = {'type': 'SRResNet', 'num_feat': 4, 'num_block': 1, 'upscale': 2}  # has BatchNorm buffers


def _opt(tmp_path, network, optim='Adam', ema=0.5):
    path = {'pretrain_network_g': None, 'strict_load_g': True, 'models': str(tmp_path / 'models'),
            'training_states': str(tmp_path / 'states')}
    for folder in ('models', 'states'):
        os.makedirs(tmp_path / folder, exist_ok=True)
    return {'is_train': True, 'dist': False, 'num_gpu': 0, 'scale': 2, 'network_g': dict(network), 'path': path,
            'train': {'ema_decay': ema, 'optim_g': {'type': optim, 'lr': 1e-3},
                      'scheduler': {'type': 'MultiStepLR', 'milestones': [100], 'gamma': 0.5},
                      'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}}}


def _step(model):
    g = torch.Generator().manual_seed(1)
    model.feed_data({'lq': torch.rand(2, 3, 6, 6, generator=g), 'gt': torch.rand(2, 3, 12, 12, generator=g)})
    model.optimize_parameters(1)


def test_basicsr_imports_on_current_torchvision():
    """BasicSR 1.4.2 imports torchvision.transforms.functional_tensor, removed in torchvision 0.17."""
    code = ('import odm_basicsr.plugin, sys, basicsr.data.degradations\n'
            'print("torchvision.transforms.functional_tensor" in sys.modules)\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == 'True', out.stderr


def test_ema_copies_buffers_for_every_model(tmp_path):
    """BasicSR's EMA averages parameters only: BatchNorm statistics of net_g_ema stayed at their initial values."""
    torch.manual_seed(0)
    model = SRModel(_opt(tmp_path, SRRESNET))
    _step(model)
    bn = [(n, m) for n, m in model.net_g.named_modules() if isinstance(m, nn.BatchNorm2d)]
    ema = dict(model.net_g_ema.named_modules())
    assert bn and all(torch.equal(m.running_mean, ema[n].running_mean) for n, m in bn)
    assert all(not torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for _, m in bn)


@pytest.mark.parametrize('optim', ['AdamW', 'Adamax', 'SGD', 'RMSprop'])
def test_optimizers_beyond_adam(tmp_path, optim):
    model = SRModel(_opt(tmp_path, SRRESNET, optim=optim))
    assert type(model.optimizer_g).__name__ == optim


def test_saves_are_atomic_for_every_model_and_nan_guards_are_the_plugins(tmp_path):
    """Atomic writes fix BasicSR for every model; refusing a NaN network is the plugin's policy (QuantSRModel)."""
    for cls, refuses in ((SRModel, False), (QuantSRModel, True)):
        folder = tmp_path / cls.__name__
        model = cls(_opt(folder, SRRESNET, ema=0))
        _step(model)
        model.save(epoch=0, current_iter=1)
        assert not [f for f in os.listdir(folder / 'models') if '.tmp' in f]  # written via a temporary file
        with torch.no_grad():
            next(model.net_g.parameters()).fill_(float('nan'))
        if refuses:
            with pytest.raises(NonFiniteError):
                model.save_network(model.net_g, 'net_g', 2)
            assert not os.path.exists(folder / 'models' / 'net_g_2.pth')
        else:
            model.save_network(model.net_g, 'net_g', 2)  # BasicSR's own models behave as BasicSR does
            assert os.path.exists(folder / 'models' / 'net_g_2.pth')


def test_quantized_networks_need_a_quantization_aware_model(tmp_path):
    opt = {'name': 't', 'model_type': 'SRModel', 'scale': 2, 'num_gpu': 0, 'is_train': False,
           'network_g': {'type': 'Quantized', 'arch': {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3,
                                                       'num_feat': 4, 'num_block': 1, 'upscale': 2}},
           'path': {}}
    with pytest.raises(OptionError, match='use model_type: QuantSRModel'):
        check_options(opt, is_train=False)
    check_options(dict(opt, model_type='QuantSRModel'), is_train=False)
