"""The Quantized arch over every default preset and scale; black-box check of what is quantized."""
import fnmatch
import logging

import pytest
import torch
import torch.nn.functional as F
from basicsr.archs import build_network
from basicsr.utils.registry import ARCH_REGISTRY
from odm_helpers import TINY
from torch import nn

from odm_basicsr.archs.layer_presets import LAYER_PRESETS
from odm_basicsr.models.quant_sr_model import QuantSRModel
from odm_basicsr.quant import QConv2d, QLinear, quantizable_layers

SCALES = {'RRDBNet': (2, 4)}  # BasicSR's RRDBNet supports scales 1, 2 and 4 only
CASES = [(a, s) for a in TINY for s in SCALES.get(a, (2, 3, 4))]
OUR_ARCHS = ('Quantized', 'RDN', 'SRResNet')


def build(arch, scale, **options):
    return build_network(dict(type='Quantized', arch=dict(type=arch, **TINY[arch](scale)), **options))


def test_every_preset_and_plugin_arch_is_covered():
    assert set(LAYER_PRESETS) == set(TINY)
    for name in OUR_ARCHS:
        assert name in ARCH_REGISTRY


@pytest.mark.parametrize('arch,scale', CASES)
def test_forward_backward_shape(arch, scale):
    torch.manual_seed(0)
    net = build(arch, scale, w_bits=4, a_bits=4)
    assert type(net).__name__ == f'Quantized{arch}'
    x = torch.rand(2, 3, 8, 8)
    y = net(x)
    assert y.shape == (2, 3, 8 * scale, 8 * scale)
    y.mean().backward()
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize('arch', list(TINY))
def test_plain_fp_arch_forward(arch):
    net = build_network(dict(type=arch, **TINY[arch](2)))
    assert net(torch.rand(1, 3, 8, 8)).shape == (1, 3, 16, 16)


def _record_layer_io(net):
    """Black box: record (input, weight) of every F.conv2d / F.linear call, attributed to the calling module."""
    calls, stack = {}, []
    hooks = []
    for name, m in net.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_pre_hook(lambda mod, inp, name=name: stack.append(name)))
            hooks.append(m.register_forward_hook(lambda mod, inp, out: stack.pop() and None))
    originals = F.conv2d, F.linear

    def spy(fn):
        def wrapped(x, w, *args, **kwargs):
            if stack:
                calls.setdefault(stack[-1], (x.detach(), w.detach()))
            return fn(x, w, *args, **kwargs)
        return wrapped

    F.conv2d, F.linear = spy(originals[0]), spy(originals[1])
    return calls, hooks, originals


@pytest.mark.parametrize('arch', list(TINY))
@pytest.mark.parametrize('bits', [2, 3])
def test_exactly_the_preset_layers_see_quantized_inputs_and_weights(arch, bits):
    torch.manual_seed(0)
    net = build(arch, 2, w_bits=bits, a_bits=bits)
    fp_weights = {n: m.weight.detach().clone() for n, m in net.named_modules() if isinstance(m, (nn.Conv2d,
                                                                                                 nn.Linear))}
    net(torch.rand(2, 3, 8, 8))  # initialise the ranges from data
    calls, hooks, originals = _record_layer_io(net)
    try:
        with torch.no_grad():
            net(torch.rand(2, 3, 8, 8))
    finally:
        F.conv2d, F.linear = originals
        for h in hooks:
            h.remove()
    intended = [n for n in quantizable_layers(build_network(dict(type=arch, **TINY[arch](2))))
                if any(fnmatch.fnmatchcase(n, p) for p in LAYER_PRESETS[arch])]
    assert intended and set(intended) <= set(calls)
    for name, (x, w) in calls.items():
        if name in intended:
            assert len(torch.unique(x)) <= 2**bits, name
            assert len(torch.unique(w)) <= 2**bits, name
        else:
            if x.numel() >= 64:  # (RCAN's channel attention sees a pooled 1x1 map)
                assert len(torch.unique(x)) > 2**bits, name  # FP activations: many values
            assert torch.equal(w, fp_weights[name]), name


def test_layers_all_keeps_first_and_last_fp():
    net = build('EDSR', 2, layers='all')
    names = [n for n, m in net.named_modules() if isinstance(m, (QConv2d, QLinear))]
    fp_names = quantizable_layers(build_network(dict(type='EDSR', **TINY['EDSR'](2))))
    assert names == fp_names[1:-1]


def test_user_patterns_and_exclude():
    net = build('EDSR', 2, layers=['body.*', 're:conv_after_body'], exclude=['body.1.*'])
    assert net.quant_config['layers'] == ['body.0.conv1', 'body.0.conv2', 'conv_after_body']


def _sr_model(net_opt, pretrain=None, strict=True):
    opt = {'is_train': False, 'dist': False, 'num_gpu': 0, 'network_g': net_opt,
           'path': {'pretrain_network_g': pretrain, 'strict_load_g': strict, 'param_key_g': 'params'}}
    return QuantSRModel(opt)


def test_fp_checkpoint_loads_into_quantized_network(tmp_path, caplog):
    torch.manual_seed(0)
    fp = build_network(dict(type='EDSR', **TINY['EDSR'](2)))
    ckpt = tmp_path / 'fp.pth'
    torch.save({'params': fp.state_dict()}, ckpt)
    net_opt = dict(type='Quantized', arch=dict(type='EDSR', **TINY['EDSR'](2)), w_bits=4, a_bits=4)
    logging.getLogger('basicsr').addHandler(caplog.handler)  # BasicSR's logger does not propagate
    caplog.set_level(logging.INFO, logger='basicsr')
    try:
        model = _sr_model(net_opt, str(ckpt))
    finally:
        logging.getLogger('basicsr').removeHandler(caplog.handler)
    for k, v in fp.state_dict().items():
        assert torch.equal(model.net_g.state_dict()[k], v), k
    assert any('quantizer entries are not in' in r.getMessage() for r in caplog.records)
    assert not any(bool(m.act_quant.initialized) for _, m in model.net_g.quantized_layers())


def test_checkpoint_of_wrong_network_is_a_clear_error(tmp_path):
    other = build_network(dict(type='MSRResNet', **TINY['MSRResNet'](2)))
    ckpt = tmp_path / 'other.pth'
    torch.save({'params': other.state_dict()}, ckpt)
    net_opt = dict(type='Quantized', arch=dict(type='EDSR', **TINY['EDSR'](2)))
    with pytest.raises(RuntimeError, match='does not fit network QuantizedEDSR'):
        _sr_model(net_opt, str(ckpt))


def test_missing_pretrained_file_is_a_clear_error(tmp_path):
    net_opt = dict(type='Quantized', arch=dict(type='EDSR', **TINY['EDSR'](2)))
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        _sr_model(net_opt, str(tmp_path / 'nope.pth'))


@pytest.mark.parametrize('options,message', [
    (dict(arch=dict(type='EDSRR')), "unknown arch type 'EDSRR'.*Did you mean.*EDSR"),
    (dict(arch=dict(type='EDSR', upscal=2)), r"unknown option\(s\) \['upscal'\] for arch EDSR"),
    (dict(arch=dict(type='SwinIR', windowsize=4)), r"unknown option\(s\) \['windowsize'\] for arch SwinIR"),
    (dict(w_bits=0), 'w_bits must be one of 2..8 or 32'),
    (dict(a_bits=33), 'a_bits must be one of 2..8 or 32'),
    (dict(w_bit=4), r'unknown option "w_bit": did you mean "w_bits"\? Quantized accepts only "arch", "w_bits"'),
    (dict(layers=['body.*.conv9']), r"'body.\*.conv9' matches no Conv2d/Linear layer of EDSR. Candidate layers"),
    (dict(arch=dict(type='Quantized')), 'must be an FP architecture'),
    (dict(arch='EDSR'), 'must be a mapping with a "type" key'),
    (dict(act_init='mean'), 'act_init must be one of'),
    (dict(weight_granularity='tensor'), 'weight_granularity must be one of'),
])
def test_bad_options_are_clear_errors(options, message):
    spec = dict(type='Quantized', arch=dict(type='EDSR', **TINY['EDSR'](2)))
    spec.update(options)
    with pytest.raises(ValueError, match=message):
        build_network(spec)


def test_no_default_layer_set_for_unknown_arch_lists_candidates():
    with pytest.raises(ValueError, match='no default layer set for arch SRVGGNetCompact_basicsr.*Candidate'):
        build_network(dict(type='Quantized', arch=dict(type='SRVGGNetCompact_basicsr', num_feat=8, num_conv=2)))
    net = build_network(dict(type='Quantized', arch=dict(type='SRVGGNetCompact_basicsr', num_feat=8, num_conv=2),
                             layers=['body.2']))
    assert isinstance(net.body[2], QConv2d)


def test_select_state_dict_keys_fallback_bare_and_errors():
    from odm_basicsr.checkpoint import select_state_dict
    t = torch.zeros(1)
    assert select_state_dict({'params_ema': {'module.a': t}, 'params': {}}, 'params_ema') == ('params_ema', {'a': t})
    assert select_state_dict({'params': {'a': t}}, 'params_ema') == ('params', {'a': t})
    assert select_state_dict({'module.a': t}, 'params') == (None, {'a': t})
    with pytest.raises(KeyError) as e:
        select_state_dict({'other': 1}, 'params_ema', fallback=None, source='x.pth')
    assert e.value.args[0] == 'x.pth has no "params_ema" entry (found: [\'other\'])'
    with pytest.raises(TypeError, match='is not a state dict'):
        select_state_dict({'params': [t]}, 'params')
