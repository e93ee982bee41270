"""ODMModel: calibration, parameter groups, every cooperation mode's gradient, checkpoints, option errors."""
import copy
import logging

import pytest
import torch
from basicsr.utils import set_random_seed
from odm_helpers import odm_opt

from odm_basicsr.models.odm_model import ODMModel
from odm_basicsr.odm.cooperation import cosine_combine, gate_param_grads
from odm_basicsr.quant import all_initialized
from odm_basicsr.quant.offsets import offset_layers
from odm_basicsr.utils.option_check import OptionError

MODES = ('feature', 'param', 'cosine', 'naive', 'off')


def build(opt):
    set_random_seed(0)  # as BasicSR's option parser does: calibration crops come from Python's RNG
    return ODMModel(opt)


def batch():
    g = torch.Generator().manual_seed(1)
    return {'lq': torch.rand(2, 3, 8, 8, generator=g), 'gt': torch.rand(2, 3, 16, 16, generator=g)}


def step_grads(model):
    """Run one optimize_parameters with lr 0 and return the gradients it produced, in optimizer order."""
    model.feed_data(batch())
    model.optimize_parameters(1)
    return [p.grad.clone() if p.grad is not None else None
            for g in model.optimizer_g.param_groups for p in g['params']]


def reference_grads(model):
    """g_R and g_V computed independently with autograd, on the model's current parameters."""
    net = model.net_g
    params = [p for g in model.optimizer_g.param_groups for p in g['params']]
    feats = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: feats.append(args[0]) and None)
             for _, m in model.layers]
    try:
        data = batch()
        out = net(data['lq'])
    finally:
        for h in hooks:
            h.remove()
    l_pix = model.cri_pix(out, data['gt'])
    g_r = torch.autograd.grad(l_pix, params, retain_graph=True, allow_unused=True)
    g_v = torch.autograd.grad(model.cri_reg(feats), params, allow_unused=True)
    return list(g_r), list(g_v)


def test_calibration_sets_every_range_and_attaches_offsets():
    model = build(odm_opt(offsets={'select': 'topk', 'fraction': 0.5}))
    net = model.net_g
    assert all_initialized(net)
    assert len(offset_layers(net)) == 2  # ceil(0.5 * 4 quantized layers)
    for _, layer in model.layers:
        assert layer.act_quant.upper.item() > layer.act_quant.lower.item()


@pytest.mark.parametrize('mult', [1.0, 10.0])
def test_two_parameter_groups(mult):
    model = build(odm_opt(offsets={'fraction': 0.25}, lr=2e-4, mult=mult))
    weights, quant = model.optimizer_g.param_groups
    assert weights['lr'] == pytest.approx(2e-4) and quant['lr'] == pytest.approx(2e-4 * mult)
    assert quant['weight_decay'] == 0.0
    names = {id(p): n for n, p in model.net_g.named_parameters()}
    quant_names = {names[id(p)] for p in quant['params']}
    assert all(('act_quant' in n) or ('offset' in n) for n in quant_names)
    assert any('offset' in n for n in quant_names)
    assert not any(('act_quant' in names[id(p)]) for p in weights['params'])


def test_off_mode_is_reconstruction_only():
    model = build(odm_opt('off', lr=0.0))
    model.cri_reg = None
    grads = step_grads(model)
    model2 = build(odm_opt('naive', lr=0.0))
    g_r, _ = reference_grads(model2)
    for a, b in zip(grads, g_r):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-7)
    assert set(model.log_dict) == {'l_pix'}


@pytest.mark.parametrize('mode', ['naive', 'param', 'cosine'])
def test_param_level_modes_match_their_definition(mode):
    model = build(odm_opt(mode, lr=0.0, weight=1e-3))
    g_r, g_v = reference_grads(model)
    grads = step_grads(model)
    if mode == 'naive':
        expected = [r + v if v is not None else r for r, v in zip(g_r, g_v)]
    elif mode == 'param':
        expected, agree = gate_param_grads(g_r, g_v)
        assert model.log_dict['agree'] == pytest.approx(float(agree), abs=1e-6)
        # coop: the L1 share of g_v that passes the gate, by hand
        applied = sum(float((v.abs() * (r * v > 0)).sum()) for r, v in zip(g_r, g_v) if v is not None)
        total = sum(float(v.abs().sum()) for v in g_v if v is not None)
        assert model.log_dict['coop'] == pytest.approx(applied / total, rel=1e-4)
    else:
        expected, weight, cosine = cosine_combine(g_r, g_v)
        assert model.log_dict['coop'] == pytest.approx(float(weight), abs=1e-6)
        assert model.log_dict['cos_weight'] == model.log_dict['coop']  # the weight under its own key too
        assert model.log_dict['cos'] == pytest.approx(float(cosine), abs=1e-6)
    for a, b in zip(grads, expected):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert model.log_dict['l_reg'] > 0


def test_feature_mode_gates_between_off_and_naive():
    feature = step_grads(build(odm_opt('feature', lr=0.0, weight=1e-3)))
    naive = step_grads(build(odm_opt('naive', lr=0.0, weight=1e-3)))
    model_off = build(odm_opt('naive', lr=0.0, weight=1e-3))
    g_r, _ = reference_grads(model_off)
    first_conv = 0  # the first quantized conv's weight sees every gated feature gradient downstream of it
    assert not torch.allclose(feature[first_conv], naive[first_conv])
    assert not torch.allclose(feature[first_conv], g_r[first_conv])
    model = build(odm_opt('feature', lr=0.0, weight=1e-3))
    step_grads(model)
    assert 0.0 < model.log_dict['coop'] < 1.0
    assert model.log_dict['l_reg'] > 0


@pytest.mark.parametrize('mode', MODES)
def test_zero_weight_reduces_every_mode_to_plain_qat(mode):
    off = step_grads(build(odm_opt('off', lr=0.0)))
    grads = step_grads(build(odm_opt(mode, lr=0.0, weight=0.0)))
    for a, b in zip(grads, off):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)


def test_mismatch_loss_mode_runs():
    model = build(odm_opt('cosine', weight=1e-5, reg_type='MismatchLoss'))
    step_grads(model)
    assert model.log_dict['l_reg'] > 0 and 0.0 <= model.log_dict['coop'] <= 1.0


def test_calibration_is_not_repeated_for_a_calibrated_checkpoint(tmp_path, caplog):
    model = build(odm_opt(offsets={'fraction': 0.5}))
    model.feed_data(batch())
    model.optimize_parameters(1)
    path = tmp_path / 'net.pth'
    torch.save({'params': model.net_g.state_dict()}, path)
    opt = odm_opt(offsets={'fraction': 0.5})
    opt['path']['pretrain_network_g'] = str(path)
    logging.getLogger('basicsr').addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger='basicsr')
    try:
        again = build(opt)
    finally:
        logging.getLogger('basicsr').removeHandler(caplog.handler)
    assert any('calibration skipped' in r.getMessage() for r in caplog.records)
    for k, v in model.net_g.state_dict().items():
        assert torch.equal(again.net_g.state_dict()[k], v), k


def check_train(opt, notices=None):
    """What odm-train runs on the train section before any folder is made (and ODMModel when it is built)."""
    return ODMModel.option_schema.validate(opt['train'], where='train', notices=notices)


@pytest.mark.parametrize('change,message', [
    (('cooperation', 'sign'),
     "option \"train.cooperation\" must be one of \\['feature', 'param', 'cosine', 'naive', 'off'\\], got 'sign'"),
    (('reg_opt', None), 'train.reg_opt" is required with cooperation: feature'),
    (('reg_opt', {'type': 'L1Loss'}), 'option "train.reg_opt.type": \'L1Loss\' is not a feature regulariser'),
    (('quant_lr_mult', -1), 'quant_lr_mult" must be a positive number'),
    (('calibration', {'batch': 2}), 'did you mean "batches"\\? "train.calibration" accepts only "batches"'),
    (('calibration', {'batches': 0}), 'must be an integer >= 1'),
    (('calibration', {'mode': 'quantized'}), "calibration.mode\" must be one of \\['fp', 'sequential'\\]"),
    (('log_layer_freq', 0), 'option "train.log_layer_freq" must be an integer >= 1, got 0'),
    (('max_nonfinite_steps', 2.5), 'option "train.max_nonfinite_steps" must be an integer >= 1, got 2.5'),
    (('calib_batches', 4), 'unknown option "train.calib_batches": ODMModel\'s "train" accepts only BasicSR\'s keys'),
    (('cooperaton', 'off'), 'unknown option "train.cooperaton": did you mean "cooperation"'),
])
def test_bad_odm_options(change, message):
    opt = odm_opt()
    key, value = change
    if value is None:
        opt['train'].pop(key)
    else:
        opt['train'][key] = value
    with pytest.raises(OptionError, match=message):
        check_train(opt)


def test_defaults_come_from_the_schema():
    train = check_train(odm_opt())
    assert train['calibration'] == {'batches': 2, 'mode': 'fp'}
    assert (train['log_layer_freq'], train['amp'], train['max_nonfinite_steps']) == (1000, False, 10)
    opt = odm_opt('off')
    for key in ('quant_lr_mult', 'calibration', 'log_layer_freq'):
        opt['train'].pop(key)
    train = check_train(opt)
    assert train['quant_lr_mult'] == 1.0 and train['calibration'] == {'batches': 8, 'mode': 'fp'}
    assert train['log_layer_freq'] == 500 and train['reg_opt'] is None and train['cooperation'] == 'off'


def test_var_opt_is_the_deprecated_name_of_reg_opt(caplog):
    opt = odm_opt('naive', lr=0.0, weight=1e-3)
    opt['train']['var_opt'] = opt['train'].pop('reg_opt')
    notices = []
    assert check_train(opt, notices)['reg_opt'] == {'type': 'FeatureVarianceLoss', 'loss_weight': 1e-3,
                                                    'reduction': 'channel'}
    assert notices == ['option "train.var_opt" is deprecated: it is now "train.reg_opt", and its value is used as '
                       'such (the loss it configures is logged as l_reg, formerly l_var). Rename it in the option '
                       'file.']
    logging.getLogger('basicsr').addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger='basicsr')
    try:
        model = build(opt)
        step_grads(model)
        step_grads(model)
    finally:
        logging.getLogger('basicsr').removeHandler(caplog.handler)
    assert [r.getMessage() for r in caplog.records if 'deprecated' in r.getMessage()] == notices  # logged once
    assert model.cri_reg.loss_weight == 1e-3 and model.log_dict['l_reg'] > 0 and 'l_var' not in model.log_dict
    both = copy.deepcopy(opt)
    both['train']['reg_opt'] = both['train']['var_opt']
    with pytest.raises(OptionError, match='option "train.var_opt" is the old name of "train.reg_opt": give only'):
        check_train(both)


def test_odm_needs_a_quantized_network():
    opt = odm_opt()
    opt['network_g'] = copy.deepcopy(opt['network_g']['arch'])
    with pytest.raises(OptionError, match='needs quantized layers'):
        ODMModel(opt)


def test_swinir_trains_and_tests_with_window_padding():
    opt = odm_opt('feature', offsets={'fraction': 0.5})
    opt['network_g']['arch'] = {'type': 'SwinIR', 'upscale': 2, 'img_size': 8, 'window_size': 4, 'embed_dim': 8,
                                'depths': [1], 'num_heads': [2], 'mlp_ratio': 2, 'upsampler': 'pixelshuffledirect'}
    model = build(opt)
    step_grads(model)
    assert model.log_dict['l_reg'] > 0
    model.feed_data({'lq': torch.rand(1, 3, 10, 7)})  # not a multiple of the window
    model.test()
    assert model.output.shape == (1, 3, 20, 14)


def test_clip_factors_follow_the_reconstruction_gradient_only():
    opt = odm_opt('cosine', lr=0.0, weight=1e-3)
    opt['network_g']['clip_correction'] = True
    model = build(opt)
    gammas = {id(m.weight_quant.gamma) for _, m in model.layers}
    g_r, _ = reference_grads(model)
    params = [p for g in model.optimizer_g.param_groups for p in g['params']]
    grads = step_grads(model)
    checked = 0
    for p, got, ref in zip(params, grads, g_r):
        if id(p) in gammas:
            assert torch.allclose(got, ref, rtol=1e-5, atol=1e-9)
            checked += 1
    assert checked == len(model.layers) == 4


# ------------------------------------------------------------------ mixed precision (train.amp)
@pytest.mark.parametrize('mode', MODES)
def test_loss_scaling_leaves_every_mode_unchanged(mode):
    """float16 AMP multiplies the loss by a scale and divides the gradients by it: the update must not change.

    Autocast is switched off here so that the scaling logic alone is compared (a power-of-two scale is exact).
    """
    plain = step_grads(build(odm_opt(mode, lr=0.0, weight=1e-3)))
    model = build(odm_opt(mode, lr=0.0, weight=1e-3))
    model.grad_scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 12)
    scaled = step_grads(model)
    assert model.recorder.loss_scale == 2.0 ** 12
    for a, b in zip(scaled, plain):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-5, atol=1e-9)
    # feature mode: equal only because the closed-form g_v is scaled as well (weight 1e-3 changes the gate)


@pytest.mark.parametrize('amp,dtype', [('bfloat16', torch.bfloat16), (True, torch.bfloat16),
                                        ('float16', torch.float16)])
def test_amp_runs_layers_in_half_precision_with_float32_quantization(amp, dtype):
    opt = odm_opt('feature', lr=0.0, weight=1e-3, offsets={'fraction': 0.5})
    opt['train']['amp'] = amp
    model = build(opt)
    assert model.amp_dtype == dtype and model.grad_scaler.is_enabled() == (dtype == torch.float16)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: seen.update({n: out.dtype}))
             for n, m in model.layers]
    quant_inputs = []
    hooks += [m.act_quant.register_forward_pre_hook(lambda mod, args: quant_inputs.append(args[0].dtype))
              for _, m in model.layers]
    try:
        grads = step_grads(model)
    finally:
        for h in hooks:
            h.remove()
    assert set(seen.values()) == {dtype}  # the convolutions ran in half precision
    assert set(quant_inputs) == {torch.float32}  # the fake quantizers did not
    assert model.output.dtype == torch.float32
    fp32 = step_grads(build(odm_opt('feature', lr=0.0, weight=1e-3, offsets={'fraction': 0.5})))
    for a, b in zip(grads, fp32):
        assert torch.isfinite(a).all()
        if b.dim() >= 2:  # conv weights; a scalar range gradient near 0 may flip sign in half precision
            cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
            assert cosine > 0.95, float(cosine)  # bfloat16 keeps 8 mantissa bits: lowest seen 0.978
    assert 0.0 < model.log_dict['coop'] < 1.0


def test_amp_trains_and_the_scaler_state_survives_resume(tmp_path):
    opt = odm_opt('feature', lr=1e-3, weight=1e-4)
    opt['train']['amp'] = 'float16'
    opt['path']['training_states'] = str(tmp_path)
    model = build(copy.deepcopy(opt))  # BasicSR pops keys from the options it is given
    model.feed_data(batch())
    model.optimize_parameters(1)
    first = model.log_dict['l_pix']
    for it in range(2, 31):
        model.optimize_parameters(it)
    assert model.log_dict['l_pix'] < first
    assert all(torch.isfinite(p).all() for p in model.net_g.parameters())
    model.grad_scaler.update(123.0)  # a scale that no fresh scaler would have
    model.save_training_state(epoch=0, current_iter=30)
    state = torch.load(tmp_path / '30.state', weights_only=True)
    assert state['grad_scaler']['scale'] == 123.0
    again = build(opt)
    again.resume_training(state)
    assert again.grad_scaler.get_scale() == 123.0


def test_bad_amp_option():
    opt = odm_opt()
    opt['train']['amp'] = 'fp8'
    with pytest.raises(OptionError, match='train.amp" must be true, false, float16 or bfloat16'):
        check_train(opt)
