"""``scripts/convert_edsr_pytorch.py``: EDSR-PyTorch / DAQ / DDTB layouts -> BasicSR / odm_basicsr archs.

Source-layout state dicts come from the reference modules of ``odm_basicsr.convert`` (minimal copies of the
original module structure; their key sets are pinned below against the original files), with random weights, BN
statistics and PReLU slopes. A conversion must give the same outputs (to 1e-4 on the [0, 1] scale) and load into
the quantized network with only the quantizer entries missing.
"""
from pathlib import Path
from unittest import mock

import pytest
import torch
from basicsr.utils.registry import ARCH_REGISTRY
from odm_helpers import load_script

from odm_basicsr import convert as cv
from odm_basicsr.quant import quantizer_state_keys

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures('one_thread')
script = load_script('convert_edsr_pytorch')


def _no_init(t, *args, **kwargs):
    return t


# the networks a test builds only to load weights into skip their (slow, unused) random initialisation
NO_INIT = dict(kaiming_uniform_=_no_init, uniform_=_no_init, kaiming_normal_=_no_init, normal_=_no_init)


def _randomize(net, seed=0):
    """Random BN statistics and PReLU slopes on top of the default init (which leaves them trivial)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.num_batches_tracked.fill_(1000)
            elif isinstance(m, torch.nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 0.5)
    return net.eval()


CASES = {  # source-layout network, target arch, input size of the comparison
    'EDSR_x2': (lambda: cv.EDSRPyTorchRef(16, 64, 2), 'EDSR', 16),
    'EDSR_x4': (lambda: cv.EDSRPyTorchRef(16, 64, 4), 'EDSR', 12),
    'RDN_x4': (lambda: cv.RDNRef(4), 'RDN', 8),  # config B, 22.3 M parameters: a small input
    'SRResNet_x4_DAQ': (lambda: cv.SRResNetDAQRef(16, 64, 4), 'SRResNet', 12),
    'SRResNet_x4_DDTB': (lambda: cv.SRResNetDDTBRef(16, 64, 4), 'SRResNet', 12),
}


@pytest.mark.parametrize('case', list(CASES))
def test_conversion_gives_the_same_outputs(case):
    make_ref, arch, size = CASES[case]
    torch.manual_seed(0)
    ref = _randomize(make_ref())
    source = ref.state_dict()
    conv = cv.convert(source)
    assert conv.arch == arch
    assert conv.arch_opts['upscale'] == int(case.split('_x')[1][0]) and conv.arch_opts['img_range'] == 255.0
    if arch in ('EDSR', 'SRResNet'):
        assert conv.arch_opts['num_feat'] == 64 and conv.arch_opts['num_block'] == 16
    else:
        assert (conv.arch_opts['num_feat'], conv.arch_opts['num_block'], conv.arch_opts['num_layer'],
                conv.arch_opts['growth']) == (64, 16, 8, 64)
    with mock.patch.multiple(torch.nn.init, **NO_INIT):
        # against the original module (its true hyper-parameters), and against one rebuilt by the script
        assert cv.check(source, conv, size=size, reference=ref) < 1e-4
        assert cv.check(source, conv, size=size) < 1e-4
        # the converted weights fit the quantized network (strict_load_g: true): only quantizer entries miss
        qnet = ARCH_REGISTRY.get('Quantized')(arch=dict(type=arch, **conv.arch_opts), w_bits=4, a_bits=4)
    own = qnet.state_dict()
    assert set(conv.state_dict) <= set(own)
    assert set(own) - set(conv.state_dict) == set(quantizer_state_keys(qnet))
    assert all(own[k].shape == v.shape for k, v in conv.state_dict.items())


def test_reference_modules_have_the_original_key_layouts():
    """Key sets read off EDSR-PyTorch ``edsr.py``/``common.py``, DAQ ``srresnet.py``/``common_srresnet.py``,
    EDSR-PyTorch/DAQ/DDTB ``rdn.py`` and DDTB ``bnsrresnet_org.py`` for 2-block networks."""
    def conv(p, bias=True):
        return [f'{p}.weight'] + ([f'{p}.bias'] if bias else [])

    def bn(p):
        return [f'{p}.{k}' for k in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')]

    edsr = (conv('sub_mean') + conv('add_mean') + conv('head.0') + conv('body.0.body.0') + conv('body.0.body.2')
            + conv('body.1.body.0') + conv('body.1.body.2') + conv('body.2') + conv('tail.0.0') + conv('tail.0.2')
            + conv('tail.1'))
    assert set(cv.EDSRPyTorchRef(2, 8, 4).state_dict()) == set(edsr)
    rdn = (conv('SFENet1') + conv('SFENet2') + [k for i in range(2) for k in conv(f'RDBs.{i}.convs.0.conv.0')
                                                + conv(f'RDBs.{i}.convs.1.conv.0') + conv(f'RDBs.{i}.LFF')]
           + conv('GFF.0') + conv('GFF.1') + conv('UPNet.0') + conv('UPNet.2'))
    assert set(cv.RDNRef(2, 8, 2, 2, 4).state_dict()) == set(rdn)
    daq = (conv('sub_mean') + conv('add_mean') + conv('head.0', False) + ['head.1.weight']
           + [k for i in range(2) for k in conv(f'body.{i}.conv1', False) + conv(f'body.{i}.conv2', False)
              + bn(f'body.{i}.bn1') + bn(f'body.{i}.bn2')]
           + conv('body.2', False) + bn('body.3') + conv('tail.0.0', False) + ['tail.0.2.weight']
           + conv('tail.0.3', False) + ['tail.0.5.weight'] + conv('tail.1', False))
    assert set(cv.SRResNetDAQRef(2, 8, 4).state_dict()) == set(daq)
    ddtb = (conv('conv_input', False) + ['relu.weight']
            + [k for i in range(2) for k in conv(f'residual.{i}.conv1', False) + conv(f'residual.{i}.conv2', False)
               + bn(f'residual.{i}.in1') + bn(f'residual.{i}.in2') + [f'residual.{i}.relu.weight']]
            + conv('conv_mid', False) + bn('bn_mid') + conv('upscale.0', False) + ['upscale.2.weight']
            + conv('upscale.3', False) + ['upscale.5.weight'] + conv('conv_output', False))
    assert set(cv.SRResNetDDTBRef(2, 8, 4).state_dict()) == set(ddtb)


def test_edsr_mean_shift_and_res_scale():
    torch.manual_seed(1)
    ref = cv.EDSRPyTorchRef(2, 16, 3, res_scale=0.1, rgb_mean=(0.5, 0.4, 0.3))
    source = ref.state_dict()
    conv = cv.convert(source, res_scale=0.1)
    assert conv.arch_opts['rgb_mean'] == [0.5, 0.4, 0.3] and conv.arch_opts['upscale'] == 3
    assert cv.check(source, conv, size=12) < 1e-4
    # res_scale is not in the weights: the default 1 is wrong here, which --check cannot see, the original can
    assert cv.check(source, cv.convert(source), size=12, reference=ref) > 1e-2
    assert 'res_scale 1 assumed' in ' '.join(cv.convert(source).notes)


def test_check_detects_a_wrong_mapping():
    torch.manual_seed(2)
    source = cv.EDSRPyTorchRef(2, 16, 2).state_dict()
    conv = cv.convert(source)
    sd = conv.state_dict
    sd['body.0.conv1.weight'], sd['body.0.conv2.weight'] = sd['body.0.conv2.weight'], sd['body.0.conv1.weight']
    assert cv.check(source, conv, size=12) > 1e-3


def test_cli_writes_a_basicsr_checkpoint(tmp_path, capsys):
    torch.manual_seed(3)
    src = tmp_path / 'edsr_baseline_x2.pt'
    torch.save(cv.EDSRPyTorchRef(2, 16, 2).state_dict(), src)
    out = tmp_path / 'pretrained' / 'EDSR_x2_fp.pth'  # the folder is created
    assert script.main([str(src), str(out), '--check']) == 0
    printed = capsys.readouterr().out
    assert 'EDSR (edsr-pytorch layout)' in printed and ': ok' in printed
    assert '{type: EDSR, num_in_ch: 3, num_out_ch: 3, num_feat: 16, num_block: 2, upscale: 2' in printed
    ckpt = torch.load(out, map_location='cpu', weights_only=True)
    assert list(ckpt) == ['params'] and 'conv_first.weight' in ckpt['params']
    ours = ARCH_REGISTRY.get('EDSR')(num_in_ch=3, num_out_ch=3, num_feat=16, num_block=2, upscale=2)
    ours.load_state_dict(ckpt['params'], strict=True)


def _edsr_source(**kwargs):
    torch.manual_seed(4)
    return cv.EDSRPyTorchRef(2, 16, 2, **kwargs).state_dict()


@pytest.mark.parametrize('mutate,kwargs,message', [
    (lambda sd: {'foo.weight': torch.zeros(1)}, {}, 'unrecognised layout'),
    (lambda sd: {'conv_first.weight': torch.zeros(1), 'conv_last.weight': torch.zeros(1)}, {}, 'BasicSR'),
    (lambda sd: sd, {'arch': 'RDN'}, '--arch RDN, but the input has the keys of an EDSR checkpoint'),
    (lambda sd: {**sd, 'body.0.quant_act.alpha': torch.zeros(1)}, {}, 'body.0.quant_act.alpha'),
    (lambda sd: {k: v for k, v in sd.items() if k != 'tail.1.weight'}, {}, '1 missing (conv_last.weight)'),
    (lambda sd: {**sd, 'tail.1.weight': sd['tail.1.weight'][:, :8]}, {}, 'shape mismatch (conv_last.weight)'),
    (lambda sd: {**sd, 'sub_mean.weight': sd['sub_mean.weight'] / 2}, {}, 'rgb_std != 1'),
    (lambda sd: sd, {'rgb_range': 1.0}, 'is --rgb-range right?'),
    (lambda sd: sd, {'res_scale': 0.5, 'arch': 'auto'}, None),
])
def test_wrong_input_gives_a_clear_error(mutate, kwargs, message):
    source = mutate(_edsr_source())
    if message is None:
        cv.convert(source, **kwargs)
        return
    with pytest.raises(cv.ConversionError) as info:
        cv.convert(source, **kwargs)
    assert message in str(info.value)


def test_extra_keys_can_be_dropped_explicitly():
    source = {**_edsr_source(), 'body.0.quant_act.alpha': torch.zeros(1)}
    with pytest.raises(cv.ConversionError, match='--drop REGEX'):
        cv.convert(source)
    conv = cv.convert(source, drop=[r'\.quant_act\.'])
    assert 'body.0.quant_act.alpha' in conv.dropped


def test_cli_errors(tmp_path, capsys):
    out = str(tmp_path / 'out.pth')
    assert script.main([str(tmp_path / 'missing.pt'), out]) == 1
    assert 'file not found' in capsys.readouterr().err
    (tmp_path / 'notes.txt').write_text('not a checkpoint')
    assert script.main([str(tmp_path / 'notes.txt'), out]) == 1
    assert 'cannot be read as a PyTorch checkpoint' in capsys.readouterr().err
    torch.save([1, 2, 3], tmp_path / 'list.pt')
    assert script.main([str(tmp_path / 'list.pt'), out]) == 1
    assert 'not a state dict of tensors (found: list)' in capsys.readouterr().err
    torch.save(_edsr_source(), tmp_path / 'edsr.pt')
    assert script.main([str(tmp_path / 'edsr.pt'), out, '--arch', 'SRResNet']) == 1
    assert 'but the input has the keys of an EDSR checkpoint' in capsys.readouterr().err
    assert not Path(out).exists()


def test_wrapped_and_prefixed_checkpoints_are_unwrapped():
    sd = _edsr_source()
    for wrapped in ({'state_dict': sd}, {'model': {f'module.{k}': v for k, v in sd.items()}}, {'params': sd}):
        assert cv.convert(wrapped).arch == 'EDSR'
