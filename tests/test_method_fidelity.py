"""ODM as METHOD.md defines it: the feature gate sees the total gradient at X_i, MismatchLoss targets what the conv
sees, clip factors learn from the reconstruction loss only, ``cooperation: false``; and the divergence guard."""
import copy
import os
import subprocess
import sys

import pytest
import torch
import yaml
from basicsr.utils import set_random_seed
from odm_helpers import odm_opt
from torch import nn

from odm_basicsr.losses.variance_loss import FeatureVarianceLoss
from odm_basicsr.models.odm_model import ODMModel
from odm_basicsr.odm import FeatureGate, coop_agree
from odm_basicsr.quant import QConv2d, fake_quantize
from odm_basicsr.quant.offsets import DistributionOffset
from odm_basicsr.utils.option_check import OptionError


def build(opt):
    set_random_seed(0)
    return ODMModel(opt)


def batch():
    g = torch.Generator().manual_seed(1)
    return {'lq': torch.rand(2, 3, 8, 8, generator=g), 'gt': torch.rand(2, 3, 16, 16, generator=g)}


# -------------------------------------------------------------------------- feature gate on the total gradient
def test_feature_gate_uses_the_total_gradient_of_a_residual_block():
    """y = a * x + x (a 1x1 conv on x plus the skip), loss = sum(c * y). With a = -0.5 the conv path gives
    -0.5 c, the skip + c: the total 0.5 c has the opposite sign of the conv-only gradient."""
    x0 = torch.tensor([[[[1.0, 2.0], [4.0, 5.0]]]], dtype=torch.float64)
    c = torch.tensor([[[[1.0, -1.0], [1.0, -1.0]]]], dtype=torch.float64)
    conv = nn.Conv2d(1, 1, 1, bias=False).double()
    with torch.no_grad():
        conv.weight.fill_(-0.5)
    var = FeatureVarianceLoss(loss_weight=1.0, reduction='layer')
    g_v = var.feature_grad(x0)  # 2 (x - mean) / n with mean 3, n 4
    assert torch.allclose(g_v.flatten(), torch.tensor([-1.0, -0.5, 0.5, 1.0], dtype=torch.float64))

    w = torch.ones((), dtype=torch.float64, requires_grad=True)  # a parameter upstream of x
    x = x0 * w
    gate = FeatureGate()
    conv.register_forward_pre_hook(lambda m, args: [gate.add(args[0], var.feature_grad, 'conv', record=True)]
                                   and None)
    ((conv(x) + x) * c).sum().backward()
    g_total = 0.5 * c  # by hand
    agree = (g_total * g_v) > 0
    # signs: g_total = [0.5, -0.5, 0.5, -0.5], g_v = [-1, -0.5, 0.5, 1]: elements 2 and 3 agree
    assert agree.flatten().tolist() == [False, True, True, False]
    expected_x_grad = g_total + g_v * agree
    assert torch.allclose(w.grad, (expected_x_grad * x0).sum())
    coop, agree_frac = coop_agree(gate.stats['conv'][0])
    assert float(agree_frac) == pytest.approx(0.5)
    assert float(coop) == pytest.approx((0.5 + 0.5) / (1 + 0.5 + 0.5 + 1))
    # gating the conv-only gradient (-0.5 c) would have accepted elements 1 and 4 instead
    conv_only = -0.5 * c
    assert ((conv_only * g_v) > 0).flatten().tolist() == [True, False, False, True]
    gate.reset()


def test_feature_gate_sums_the_regularisers_of_layers_sharing_an_input():
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x0.clone().requires_grad_(True)
    gate = FeatureGate()
    v1, v2 = FeatureVarianceLoss(0.3), FeatureVarianceLoss(0.2)
    h = gate.add(gate.add(x * 1.0, v1.feature_grad), v2.feature_grad)
    (h * 2.0).sum().backward()
    g_v = v1.feature_grad(x0) + v2.feature_grad(x0)
    assert torch.allclose(x.grad, 2.0 + g_v * (g_v > 0))


# ---------------------------------------------------------------------- MismatchLoss targets what the conv sees
@pytest.mark.parametrize('kind', [None, 'shift', 'scale'])
@pytest.mark.parametrize('folded', [False, True])
def test_effective_input_is_what_the_conv_sees(kind, folded):
    if kind is None and folded:
        pytest.skip('nothing to fold without an offset')
    torch.manual_seed(0)
    layer = QConv2d(3, 2, 1, bias=True, w_bits=32, a_bits=3)
    x = torch.randn(2, 3, 5, 5) * torch.tensor([1.0, 4.0, 0.5]).view(1, 3, 1, 1) + 2.0
    layer.act_quant.set_range(-1.0, 2.0)
    lo, hi = torch.tensor(-1.0), torch.tensor(2.0)
    if kind is None:
        expected = fake_quantize(x, lo, hi, 3)
    else:
        layer.offset = DistributionOffset(3, kind)
        with torch.no_grad():
            layer.offset.param.copy_(torch.tensor([0.5, 3.0, 1.5]))
        p = layer.offset.param.view(1, 3, 1, 1)
        expected = fake_quantize(x - p, lo, hi, 3) + p if kind == 'shift' else fake_quantize(x / p, lo, hi, 3) * p
        if folded:
            layer.offset.set_folded(True)
    assert torch.allclose(layer.effective_input(x), expected, atol=1e-6)
    if kind == 'scale' and not folded:  # and it is what the conv computes with: conv(x) == 1x1 conv of that, W
        out = layer(x)
        ref = nn.functional.conv2d(expected, layer.weight, layer.bias)
        assert torch.allclose(out, ref, atol=1e-5)


def test_mismatch_loss_in_training_uses_the_effective_input_with_offsets():
    opt = odm_opt('naive', weight=1e-2, offsets={'select': 'topk', 'fraction': 1.0, 'kind': 'scale'},
                  reg_type='MismatchLoss', lr=0.0)
    model = build(opt)
    feats = []
    hooks = [m.register_forward_pre_hook(lambda m, a: feats.append((m, a[0].detach()))) for _, m in model.layers]
    model.feed_data(batch())
    model.optimize_parameters(1)
    for h in hooks:
        h.remove()
    expected = sum(float(torch.linalg.vector_norm(x - m.effective_input(x))) for m, x in feats) * 1e-2
    assert model.log_dict['l_reg'] == pytest.approx(expected, rel=1e-5)
    # q(x / rho) alone (the old target) is a different, much larger distance for rho far from 1
    wrong = sum(float(torch.linalg.vector_norm(x - m.quantize_input(x))) for m, x in feats) * 1e-2
    assert abs(wrong - expected) > 1e-3 * expected


# ------------------------------------------------------------------------- clip factors: reconstruction only
@pytest.mark.parametrize('mode', ['feature', 'naive', 'param', 'cosine'])
def test_clip_factors_get_the_reconstruction_gradient_only(mode):
    def grads(mode, weight):
        opt = odm_opt(mode, weight=weight, lr=0.0)
        opt['network_g']['clip_correction'] = True
        opt['network_g']['w_bits'] = opt['network_g']['a_bits'] = 2
        model = build(opt)
        model.feed_data(batch())
        model.optimize_parameters(1)
        first_conv = model.net_g.conv_first.weight.grad.clone()  # upstream of every quantized input
        return [m.weight_quant.gamma.grad.clone() for _, m in model.layers], first_conv

    reference, ref_first = grads('off', 0.0)
    got, first = grads(mode, 1e-1)
    assert all(g.abs().sum() > 0 for g in reference)
    for a, b in zip(got, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    assert not torch.allclose(first, ref_first, rtol=1e-3)  # the other weights do see the regulariser


# ---------------------------------------------------------------------------------------- cooperation: false
def test_unquoted_off_means_off():
    opt = odm_opt('off')
    opt['train']['cooperation'] = False  # what YAML makes of `cooperation: off`
    assert yaml.safe_load('cooperation: off') == {'cooperation': False}
    assert ODMModel.option_schema.validate(opt['train'], where='train')['cooperation'] == 'off'
    model = build(opt)
    assert model.cooperation == 'off' and model.cri_reg is None
    opt['train']['cooperation'] = True
    with pytest.raises(OptionError, match='train.cooperation'):
        ODMModel.option_schema.validate(opt['train'], where='train')


# --------------------------------------------------------------------------------------- divergence guard
def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path):
    from odm_basicsr.guards import TrainingDivergedError
    opt = odm_opt('feature', lr=1e-3)
    opt['train']['max_nonfinite_steps'] = 3
    opt['path']['models'] = str(tmp_path)
    (tmp_path / 'net_g_5.pth').write_bytes(b'x')
    model = build(opt)
    before = copy.deepcopy(model.net_g.state_dict())
    bad = batch()
    bad['lq'][0, 0, 0, 0] = float('nan')
    model.feed_data(batch())
    model.optimize_parameters(1)
    assert model.nonfinite_steps == 0
    after_good = copy.deepcopy(model.net_g.state_dict())
    assert any(not torch.equal(before[k], after_good[k]) for k in before)
    for it in (2, 3):
        model.feed_data(bad)
        model.optimize_parameters(it)
        assert model.nonfinite_steps == it - 1
        for k, v in model.net_g.state_dict().items():  # no update from a non-finite step
            assert torch.equal(v, after_good[k]), k
    model.feed_data(batch())  # a finite step resets the run of non-finite ones
    model.optimize_parameters(4)
    assert model._nonfinite_run == []
    for it in (5, 6):
        model.feed_data(bad)
        model.optimize_parameters(it)
    model.feed_data(bad)
    with pytest.raises(TrainingDivergedError, match=r'diverged at iteration 7: 3 steps in a row \(iterations 5 to '
                       r'7\).*Last good checkpoint: .*net_g_5\.pth'):
        model.optimize_parameters(7)
    assert all(torch.isfinite(v).all() for v in model.net_g.state_dict().values() if v.is_floating_point())


def test_odm_train_stops_a_diverging_run_with_status_3_and_no_nan_checkpoint(tmp_path):
    opt = {
        'name': 'diverge', 'model_type': 'ODMModel', 'scale': 2, 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {'train': {'name': 'emb', 'type': 'EmbeddedSRDataset', 'split': 'train', 'gt_size': 16,
                               'use_hflip': False, 'use_rot': False, 'batch_size_per_gpu': 2,
                               'num_worker_per_gpu': 0, 'dataset_enlarge_ratio': 1}},
        'network_g': {'type': 'Quantized', 'arch': {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8,
                                                    'num_block': 2, 'upscale': 2}, 'w_bits': 4, 'a_bits': 4},
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'ema_decay': 0, 'optim_g': {'type': 'SGD', 'lr': 1.0e30}, 'total_iter': 40, 'warmup_iter': -1,
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [1000], 'gamma': 0.5},
                  'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}, 'cooperation': 'off',
                  'calibration': {'batches': 1}, 'max_nonfinite_steps': 4},
        'logger': {'print_freq': 1, 'save_checkpoint_freq': 1, 'use_tb_logger': False},
    }
    path = tmp_path / 'diverge.yml'
    path.write_text(yaml.safe_dump(opt))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-m', 'odm_basicsr.train', '-opt', str(path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('odm-train: error: training diverged at iteration ') and '4 steps in a row' in last
    assert 'Last good checkpoint:' in last
    models = tmp_path / 'experiments' / 'diverge' / 'models'
    for f in models.glob('*.pth'):
        state = torch.load(f, weights_only=True)['params']
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), f
