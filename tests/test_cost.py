"""odm-cost: MACs, BitOPs, parameters and storage (METHOD.md section 7).

Counting runs on the meta device (shapes only), so the 720p figures of EDSR-baseline take well under a second.
"""
import json
import math
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from basicsr.archs import build_network
from odm_helpers import TINY
from torch import nn

from odm_basicsr.cost import CostError, cost_report, lr_size, main, parse_size
from odm_basicsr.quant import DistributionOffset, fold_offsets, swap_layers

EDSR_BASELINE = dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=64, num_block=16, upscale=4)

# EDSR-baseline x4, 1280x720 output = 320x180 LR input (57,600 pixels), computed by hand per conv
_LR, _HR2, _HR = 320 * 180, 640 * 360, 1280 * 720
EDSR_BODY_MACS = 32 * _LR * 64 * 64 * 9  # the 32 quantized body convs
EDSR_FP_MACS = (_LR * 64 * 3 * 9  # conv_first
                + _LR * 64 * 64 * 9  # conv_after_body
                + _LR * 256 * 64 * 9 + _HR2 * 256 * 64 * 9  # upsampler convs (x2, x2)
                + _HR * 3 * 64 * 9)  # conv_last
EDSR_PARAMS = 1_517_571
EDSR_BODY_WEIGHTS = 32 * 64 * 64 * 9



def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# EDSR-baseline x4 at 720p: the figures of METHOD.md section 7
# ---------------------------------------------------------------------------------------------------------------

def test_edsr_baseline_fp():
    r = cost_report(build_network(dict(EDSR_BASELINE)), (1280, 720), 4)
    assert r['method'] == 'meta' and r['input_size'] == [320, 180]
    assert r['macs'] == EDSR_BODY_MACS + EDSR_FP_MACS == 114_230_476_800
    assert round(r['macs'] / 1e9, 1) == 114.2
    assert r['params'] == EDSR_PARAMS
    assert r['bitops'] == r['bitops_fp'] == r['macs'] and r['bitops_ratio'] == 1.0
    assert r['size_bytes_fp'] == r['size_bytes'] == 4 * EDSR_PARAMS == 6_070_284
    assert round(r['size_bytes_fp'] / 1e6, 2) == 6.07  # MB = 1e6 bytes (5.79 MiB)
    assert r['quantized_layers'] == [] and r['macs_matmul'] == 0


def test_edsr_baseline_w4a4():
    net = build_network(dict(type='Quantized', arch=dict(EDSR_BASELINE), w_bits=4, a_bits=4))
    r = cost_report(net, (1280, 720), 4)
    assert r['macs'] == 114_230_476_800
    assert r['num_quantized_layers'] == 32 and r['quantized_layers'] == net.quant_config['layers']
    assert r['macs_quantized'] == EDSR_BODY_MACS and r['macs_fp'] == EDSR_FP_MACS
    assert round(100 * r['quantized_fraction'], 1) == 59.5
    assert r['bitops'] == EDSR_FP_MACS + EDSR_BODY_MACS * 16 / 1024
    assert r['bitops_fp'] == r['macs']
    assert round(100 * r['bitops_ratio']) == 41  # 41.4 %: the FP upsampler dominates
    assert (r['w_bits'], r['a_bits']) == (4, 4)
    # storage: FP size of the same network (quantizer state excluded), and at W4
    assert r['size_bytes_fp'] == 6_070_284
    s = r['storage']
    assert s['quantized_weights'] == EDSR_BODY_WEIGHTS // 2  # 4 bits per weight, packed
    assert s['fp_params'] == 4 * (EDSR_PARAMS - EDSR_BODY_WEIGHTS)  # biases and FP layers at FP32
    assert s['quantizer'] == 32 * 4 * 4  # lower_raw, upper_raw, range_scale, initialized per layer
    assert s['weight_scales'] == 32 * 4  # one FP32 step size per layer (per-layer weight range)
    assert r['size_bytes'] == 589_824 + 1_351_692 + 512 + 128 == 1_942_156
    assert round(r['size_bytes'] / 1e6, 2) == 1.94
    assert r['params'] == EDSR_PARAMS and r['params_quantizer'] == 64


# ---------------------------------------------------------------------------------------------------------------
# Hand-checkable networks
# ---------------------------------------------------------------------------------------------------------------

class OneConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 1, 1)

    def forward(self, x):
        return self.conv(x)


def test_one_conv_fp():
    r = cost_report(OneConv(), (10, 6), 1)  # 10 wide, 6 high
    macs = 10 * 6 * 4 * 3 * 3 * 3
    assert r['macs'] == r['bitops'] == r['bitops_fp'] == macs == 6480
    assert r['params'] == 4 * 27 + 4 == 112
    assert r['size_bytes'] == r['size_bytes_fp'] == 448
    assert [(ly['name'], ly['op'], ly['macs'], ly['params'], ly['in_elements']) for ly in r['layers']] == [
        ('conv', 'conv', 6480, 112, 3 * 60)]


@pytest.mark.parametrize('granularity,scales', [('layer', 1), ('channel', 4)])
def test_one_conv_w4a8(granularity, scales):
    net = swap_layers(OneConv(), ['conv'], 4, 8, weight_options=dict(granularity=granularity))
    r = cost_report(net, '10x6', 1)
    assert r['macs'] == r['macs_quantized'] == r['bitops_fp'] == 6480
    assert r['bitops'] == 6480 * 4 * 8 / 1024 == 202.5
    assert r['quantized_layers'] == ['conv'] and (r['w_bits'], r['a_bits']) == (4, 8)
    assert r['params'] == 112 and r['params_quantizer'] == 2
    # 108 weights at 4 bits + 4 FP32 biases + 4 act-quantizer values + weight step sizes
    assert r['size_bytes'] == 54 + 16 + 16 + 4 * scales
    assert r['size_bytes_fp'] == 448


class ConvShuffleAttention(nn.Module):
    """Grouped conv, pixel shuffle, a matmul pair, scaled_dot_product_attention and a linear layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, 1, 1, groups=3)
        self.shuffle = nn.PixelShuffle(2)
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        y = self.shuffle(self.conv(x))  # (1, 3, 2h, 2w)
        n, c, h, w = y.shape
        t = y.flatten(2).transpose(1, 2)  # (1, L, 3)
        z = (t @ t.transpose(1, 2)) @ t + F.scaled_dot_product_attention(t, t, t)
        return self.fc(z)[..., :3].transpose(1, 2).reshape(n, c, h, w)


def test_conv_linear_matmul_counts():
    r = cost_report(ConvShuffleAttention(), (6, 4), 2)  # LR 3x2, L = 24 tokens
    L = 24
    conv = 12 * 6 * 9  # out elements * (in_ch / groups) * 3 * 3
    matmul = 2 * L * L * 3 + 2 * L * L * 3  # (t t^T) t, and q k^T + attn v inside sdpa
    fc = L * 5 * 3
    assert r['macs'] == conv + matmul + fc
    assert r['macs_matmul'] == matmul and r['bitops'] == r['macs']
    assert r['params'] == 12 * 9 + 12 + 15 + 5
    ops = {(ly['name'], ly['op']): ly['macs'] for ly in r['layers']}
    assert ops == {('conv', 'conv'): conv, ('', 'matmul'): 2 * L * L * 3, ('', 'attention'): 2 * L * L * 3,
                   ('fc', 'linear'): fc}


def test_scaled_method_matches_meta():
    net = build_network(dict(type='EDSR', **TINY['EDSR'](2)))
    meta = cost_report(net, (192, 192), 2)
    scaled = cost_report(net, (192, 192), 2, method='scaled')  # LR 96x96 traced at 24x24, times 16
    assert meta['method'] == 'meta' and scaled['method'] == 'scaled'
    assert scaled['macs'] == meta['macs'] and scaled['layers'] == meta['layers']
    assert any('scaled from a 24x24' in n for n in scaled['notes'])


class DataDependent(nn.Module):
    """Python that reads tensor values (cannot run on the meta device)."""

    def __init__(self, fail=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, 1, 1)
        self.fail = fail

    def forward(self, x):
        if self.fail or x.abs().max().item() > 1e9:
            raise RuntimeError('boom')
        return F.interpolate(self.conv(x), scale_factor=2)


def test_fallback_when_meta_fails():
    r = cost_report(DataDependent(), (96, 96), 2)  # LR 48x48 traced at 24x24 on the CPU, times 4
    assert r['method'] == 'scaled' and r['macs'] == 48 * 48 * 3 * 27
    assert any('meta device' in n for n in r['notes']) and any('scaled from a 24x24' in n for n in r['notes'])
    with pytest.raises(CostError, match='cannot run DataDependent on a 48x48 input .*boom'):
        cost_report(DataDependent(fail=True), (96, 96), 2)
    with pytest.raises(CostError, match='meta device'):
        cost_report(DataDependent(), (96, 96), 2, method='meta')


def test_network_is_not_modified():
    net = build_network(dict(type='Quantized', arch=dict(type='EDSR', **TINY['EDSR'](2))))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cost_report(net, (32, 32), 2)
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(after[k].device.type == 'cpu' and torch.equal(before[k], after[k]) for k in before)
    assert not any(bool(m.act_quant.initialized) for _, m in net.quantized_layers())


# ---------------------------------------------------------------------------------------------------------------
# Offsets
# ---------------------------------------------------------------------------------------------------------------

def _with_offsets():
    net = build_network(dict(type='Quantized', arch=dict(type='EDSR', **TINY['EDSR'](2))))
    layers = dict(net.quantized_layers())
    layers['body.0.conv1'].offset = DistributionOffset(8, 'shift')
    layers['body.0.conv2'].offset = DistributionOffset(8, 'scale')
    return net


def test_offsets_unfolded_and_folded():
    net = _with_offsets()
    r = cost_report(net, (32, 32), 2)  # LR 16x16: each offset layer sees 8 * 16 * 16 inputs
    inputs = 8 * 16 * 16
    off = {o['layer']: o for o in r['offsets']['layers']}
    assert off['body.0.conv1']['fp_ops'] == 2 * inputs  # shift: subtract and add back
    assert off['body.0.conv2']['fp_ops'] == inputs + 8 * 8 * 9  # scale: divide, and W * rho once
    assert r['offsets']['params'] == r['params_offset'] == 16
    assert r['storage']['offsets'] == 4 * (8 + 1) * 2  # delta / rho and the folded flag, FP32
    fp = cost_report(build_network(dict(type='Quantized', arch=dict(type='EDSR', **TINY['EDSR'](2)))), (32, 32), 2)
    assert r['size_bytes'] == fp['size_bytes'] + 72 and r['macs'] == fp['macs'] and r['bitops'] == fp['bitops']

    fold_offsets(net)
    r = cost_report(net, (32, 32), 2)
    assert all(o['folded'] and o['fp_ops'] == inputs for o in r['offsets']['layers'])


def test_offsets_from_checkpoint(tmp_path, capsys):
    torch.save({'params': _with_offsets().state_dict()}, tmp_path / 'net.pth')
    opt = write_yaml(tmp_path / 'net.yml', {'scale': 2, 'network_g': {
        'type': 'Quantized', 'arch': dict(type='EDSR', **TINY['EDSR'](2)), 'offsets': {'fraction': 0.5}}})
    main(['-opt', opt, '--output-size', '32x32', '--json'])
    r = json.loads(capsys.readouterr().out)
    assert r['offsets']['layers'] == []
    assert any('offsets are configured' in n for n in r['notes'])
    main(['-opt', opt, '--output-size', '32x32', '--json', '--checkpoint', str(tmp_path / 'net.pth')])
    r = json.loads(capsys.readouterr().out)
    assert [o['layer'] for o in r['offsets']['layers']] == ['body.0.conv1', 'body.0.conv2']


# ---------------------------------------------------------------------------------------------------------------
# Every arch with a default layer preset, FP and quantized
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('arch', list(TINY))
def test_every_preset_arch(arch):
    fp = cost_report(build_network(dict(type=arch, **TINY[arch](2))), (64, 48), 2)
    assert fp['method'] == 'meta' and fp['macs'] > 0
    assert fp['bitops'] == fp['bitops_fp'] == fp['macs'] and fp['size_bytes'] == fp['size_bytes_fp']
    assert fp['num_quantized_layers'] == 0

    net = build_network(dict(type='Quantized', arch=dict(type=arch, **TINY[arch](2))))
    q = cost_report(net, (64, 48), 2)
    assert q['macs'] == fp['macs'] and q['params'] == fp['params'] and q['size_bytes_fp'] == fp['size_bytes_fp']
    assert q['quantized_layers'] == net.quant_config['layers']
    macs = {ly['name']: ly['macs'] for ly in q['layers'] if ly['quantized']}
    assert set(macs) == set(q['quantized_layers']) and all(v > 0 for v in macs.values())
    assert q['bitops'] == pytest.approx(q['macs_fp'] + q['macs_quantized'] / 64)
    assert q['bitops'] < q['bitops_fp'] and q['size_bytes'] < q['size_bytes_fp']
    if arch == 'SwinIR':  # q @ k^T and attn @ v: 2 * pixels * window^2 * embed_dim per block, 2 blocks
        assert q['macs_matmul'] == 2 * 2 * (32 * 24) * 16 * 8
    else:
        assert q['macs_matmul'] == 0


def test_swinir_input_padded_to_window():
    net = build_network(dict(type='Quantized', arch=dict(type='SwinIR', **TINY['SwinIR'](2))))
    exact = cost_report(net, (64, 48), 2)  # LR 32x24: multiples of the window (4)
    padded = cost_report(net, (60, 44), 2)  # LR 30x22 runs padded to 32x24
    assert padded['input_size'] == [30, 22] and padded['traced_input_size'] == [32, 24]
    assert padded['macs'] == exact['macs'] and padded['bitops'] == exact['bitops']
    assert any('padded from 30x22 to 32x24' in n for n in padded['notes'])
    assert not any('padded' in n for n in exact['notes'])
    assert padded['storage']['buffer_elements']['attn_mask'] > 0  # BasicSR's SwinIR keeps it in its state


def test_batchnorm_buffers_counted():
    r = cost_report(build_network(dict(type='SRResNet', **TINY['SRResNet'](2))), (32, 32), 2)
    # 2 blocks x 2 BN + body_tail BN, each running_mean + running_var (8) + num_batches_tracked (1)
    assert r['storage']['buffer_elements'] == {'running_mean': 40, 'running_var': 40, 'num_batches_tracked': 5}
    assert r['size_bytes_fp'] == 4 * (r['params'] + 85)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def test_entry_point_registered():
    eps = {ep.name: ep.value for ep in entry_points(group='console_scripts')}
    assert eps.get('odm-cost') == 'odm_basicsr.cost:main'


def test_cli_json_and_text(tmp_path, capsys):
    opt = write_yaml(tmp_path / 'edsr.yml', {'network_g': dict(EDSR_BASELINE)})  # network_g only, scale from arch
    main(['-opt', opt, '--json'])
    out = capsys.readouterr().out
    r = json.loads(out)
    assert out.count('\n') == 1
    for key in ('macs', 'params', 'bitops', 'bitops_fp', 'size_bytes', 'size_bytes_fp', 'quantized_layers',
                'output_size', 'w_bits', 'a_bits', 'macs_quantized'):
        assert key in r
    assert r['output_size'] == [1280, 720] and r['scale'] == 4 and r['macs'] == 114_230_476_800

    opt = write_yaml(tmp_path / 'q.yml', {'name': 'x', 'scale': 4, 'network_g': {
        'type': 'Quantized', 'arch': dict(EDSR_BASELINE), 'w_bits': 4, 'a_bits': 4}})
    main(['-opt', opt, '--per-layer'])
    text = capsys.readouterr().out
    assert '114.230 G' in text and '59.5 %' in text and '41.4 %' in text and '1.942 MB' in text
    assert '6.070 MB' in text and 'body.15.conv2' in text and 'Not counted' in text

    bare = write_yaml(tmp_path / 'bare.yml', dict(type='EDSR', **TINY['EDSR'](3)))  # the network mapping itself
    main(['-opt', bare, '--json', '--output-size', '30x15'])
    assert json.loads(capsys.readouterr().out)['input_size'] == [10, 5]


def _bad_options(tmp_path):
    ok = {'network_g': dict(EDSR_BASELINE)}
    return {
        'bad size': (['--output-size', '1280by720'], ok, 'bad output size'),
        'zero size': (['--output-size', '0x720'], ok, 'bad output size'),
        'not divisible': (['--output-size', '1282x720'], ok, 'not divisible by the scale 4'),
        'missing file': (['-opt', str(tmp_path / 'nope.yml')], None, 'option file not found'),
        'no network_g': ([], {'name': 'x', 'scale': 4}, 'no network_g'),
        'network_g not a mapping': ([], {'network_g': 'EDSR'}, 'must be a mapping with a "type" key'),
        'unknown arch': ([], {'network_g': {'type': 'EDSRR'}}, "unknown network_g.type 'EDSRR'"),
        'unknown inner arch': ([], {'network_g': {'type': 'Quantized', 'arch': {'type': 'EDSRR'}}},
                               "unknown network_g.arch.type 'EDSRR'"),
        'bad quantized option': ([], {'network_g': {'type': 'Quantized', 'arch': dict(EDSR_BASELINE), 'w_bits': 9}},
                                 'cannot build network_g (Quantized)'),
        'bad arch option': ([], {'network_g': {'type': 'EDSR', 'num_feats': 8}}, 'cannot build network_g (EDSR)'),
        'scale mismatch': ([], {'scale': 2, 'network_g': dict(EDSR_BASELINE)}, 'is the scale right?'),
        'bad --scale': (['--scale', 'x4'], ok, 'bad --scale'),
        'missing checkpoint': (['--checkpoint', str(tmp_path / 'no.pth')], ok, 'checkpoint file not found'),
        'yaml error': ([], 'network_g: [unclosed', 'cannot parse'),
    }


@pytest.mark.parametrize('case', list(_bad_options(Path('.'))))
def test_cli_errors(case, tmp_path, capsys):
    extra, content, message = _bad_options(tmp_path)[case]
    argv = []
    if content is not None:
        path = tmp_path / 'opt.yml'
        if isinstance(content, str):
            path.write_text(content)
        else:
            write_yaml(path, content)
        argv = ['-opt', str(path)]
    with pytest.raises(SystemExit) as e:
        main(argv + extra)
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ''
    err = captured.err.strip()
    assert err.startswith('odm-cost: error: ') and '\n' not in err and message in err, err


def test_helpers():
    assert parse_size('1280x720') == (1280, 720) and parse_size(' 64 X 48 ') == (64, 48)
    assert lr_size((1280, 720), 4) == (320, 180)
    with pytest.raises(CostError, match='not divisible'):
        lr_size((1280, 720), 3)
    with pytest.raises(CostError, match='bad output size'):
        parse_size('1280x')
    assert math.isclose(cost_report(OneConv(), '4x4', 1)['bitops_ratio'], 1.0)
