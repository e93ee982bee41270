"""RLFN (NTIRE 2022 ``RLFN_cut``): sizes, shapes, module names, data flow, the preset, and the published network.

The last tests use the real checkpoint ``../shared/data/pretrained/RLFN_cut_x4_ntire22.pth`` and the benchmark
sets beside the repository (skipped where absent): it loads with ``strict=True`` and no renaming, and ``odm-eval``
on Set5 / Set14 reproduces the numbers that the original code gives on these files (pretrained/README.md).
"""
import csv
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import odm_basicsr.archs  # noqa: F401  (BasicSR fixes + registration first)
from odm_basicsr.archs.rlfn_arch import RLFN

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared' / 'data'
CKPT = SHARED / 'pretrained' / 'RLFN_cut_x4_ntire22.pth'
BENCH = SHARED / 'benchmark'
OPT = REPO / 'odm_basicsr' / 'options' / 'test' / 'RLFN' / 'test_RLFN_x4.yml'
TINY = dict(num_feat=8, mid_feat=6, num_block=2, esa_feat=4)
# measured with the original code on these files (pretrained/README.md): (PSNR dB, SSIM), Y channel, border 4
TARGET = {'Set5': (32.0983, 0.8939), 'Set14': (28.6031, 0.7815)}

needs_ckpt = pytest.mark.skipif(not CKPT.is_file(), reason=f'{CKPT} is absent (the shared pretrained network '
                                'sits beside the project on team machines; see ../shared/data/pretrained)')
needs_bench = pytest.mark.skipif(not all((BENCH / s / d).is_dir() for s in TARGET for d in ('HR', 'LRbicx4')),
                                 reason=f'{BENCH}/Set5 or Set14 (HR, LRbicx4) is absent (shared benchmark data)')


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def _conv(cin, cout, k):
    return cin * cout * k * k + cout


def rlfn_param_count(scale, nf=46, mf=48, nb=4, ef=16, colors=3):
    """Closed form from the published layout (pretrained/README.md)."""
    esa = _conv(nf, ef, 1) + _conv(ef, ef, 1) + 2 * _conv(ef, ef, 3) + _conv(ef, nf, 1)
    block = _conv(nf, mf, 3) + _conv(mf, mf, 3) + _conv(mf, nf, 3) + _conv(nf, nf, 1) + esa
    return _conv(colors, nf, 3) + nb * block + _conv(nf, nf, 3) + _conv(nf, colors * scale * scale, 3)


# ------------------------------------------------------------------------------------------------ the FP network
def test_default_size_and_state_dict():
    model = RLFN()
    assert model.upscale == 4 and model.img_range == 255.
    assert _n_params(model) == rlfn_param_count(4) == 317_218
    assert len(model.state_dict()) == 78
    assert not any(k == 'mean' for k in model.state_dict())
    assert [_n_params(RLFN(upscale=s)) for s in (2, 3)] == [rlfn_param_count(2), rlfn_param_count(3)] == [
        302_278, 308_503]
    assert _n_params(RLFN(upscale=2, **TINY)) == rlfn_param_count(2, 8, 6, 2, 4)


def test_registered_through_the_arch_package():
    from basicsr.utils.registry import ARCH_REGISTRY

    import odm_basicsr.archs as archs

    assert ARCH_REGISTRY.get('RLFN') is RLFN
    assert 'odm_basicsr.archs.rlfn_arch' in [m.__name__ for m in archs._modules]


@pytest.mark.parametrize('scale', [2, 3, 4])
def test_forward_shapes(scale):
    torch.manual_seed(0)
    model = RLFN(upscale=scale).eval()
    with torch.no_grad():
        for h, w in ((16, 20), (8, 8), (3, 5)):  # from 15x15 as the original; below it, the clipped pooling
            out = model(torch.rand(2, 3, h, w))
            assert out.shape == (2, 3, h * scale, w * scale) and torch.isfinite(out).all()


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = RLFN(upscale=2, **TINY)
    model(torch.rand(2, 3, 16, 16)).abs().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.B1.c1_r.weight.grad.abs().sum() > 0


def test_module_names_are_the_checkpoint_layout():
    """pretrained/README.md: every conv of the published network under its original name, with its shape."""
    model = RLFN()
    modules = dict(model.named_modules())
    expected = {'fea_conv': (3, 46, 3, 1), 'LR_conv': (46, 46, 3, 1), 'upsampler.0': (46, 48, 3, 1)}
    for b in ('B1', 'B2', 'B3', 'B4'):
        expected.update({
            f'{b}.c1_r': (46, 48, 3, 1), f'{b}.c2_r': (48, 48, 3, 1), f'{b}.c3_r': (48, 46, 3, 1),
            f'{b}.c5': (46, 46, 1, 1), f'{b}.esa.conv1': (46, 16, 1, 1), f'{b}.esa.conv_f': (16, 16, 1, 1),
            f'{b}.esa.conv2': (16, 16, 3, 2), f'{b}.esa.conv3': (16, 16, 3, 1), f'{b}.esa.conv4': (16, 46, 1, 1)})
    convs = {n for n, m in modules.items() if isinstance(m, nn.Conv2d)}
    assert convs == set(expected)
    for name, (cin, cout, k, stride) in expected.items():
        m = modules[name]
        assert (m.in_channels, m.out_channels, m.kernel_size, m.stride) == (cin, cout, (k, k), (stride, stride)), name
        assert m.padding == ((0, 0) if k == 1 or stride == 2 else (1, 1)), name
    assert isinstance(modules['upsampler.1'], nn.PixelShuffle) and modules['upsampler.1'].upscale_factor == 4
    assert {k.rsplit('.', 1)[0] for k in model.state_dict()} == set(expected)


@pytest.mark.parametrize('upscale', [1, 8])
def test_bad_upscale_and_tiny_input_raise(upscale):
    with pytest.raises(ValueError, match=f'upscale={upscale}'):
        RLFN(upscale=upscale)
    with pytest.raises(ValueError, match='at least 3x3'):
        RLFN(upscale=2, **TINY)(torch.rand(1, 3, 2, 8))


def _fconv(p, name, x, stride=1, padding=None):
    w = p[f'{name}.weight']
    return F.conv2d(x, w, p[f'{name}.bias'], stride=stride, padding=w.shape[-1] // 2 if padding is None else padding)


def _reference(model, x, pool):
    """RLFN_cut's data flow written from the paper / the challenge code, on the model's weights (0-255 scale)."""
    p = dict(model.named_parameters())

    def lrelu(t):
        return F.leaky_relu(t, 0.05)

    def esa(name, t):
        c1 = _fconv(p, f'{name}.conv1', t)
        c3 = _fconv(p, f'{name}.conv3', pool(_fconv(p, f'{name}.conv2', c1, stride=2, padding=0)))
        c3 = F.interpolate(c3, size=t.shape[-2:], mode='bilinear', align_corners=False)
        return t * torch.sigmoid(_fconv(p, f'{name}.conv4', c3 + _fconv(p, f'{name}.conv_f', c1)))

    fea = _fconv(p, 'fea_conv', x * 255.)
    h = fea
    for i in range(len(model.block_names)):
        b = f'B{i + 1}'
        r = lrelu(_fconv(p, f'{b}.c3_r', lrelu(_fconv(p, f'{b}.c2_r', lrelu(_fconv(p, f'{b}.c1_r', h)))))) + h
        h = esa(f'{b}.esa', _fconv(p, f'{b}.c5', r))
    out = _fconv(p, 'LR_conv', h) + fea
    return F.pixel_shuffle(_fconv(p, 'upsampler.0', out), model.upscale) / 255.


def _randomised(scale):
    torch.manual_seed(1)
    model = RLFN(upscale=scale, **TINY)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, (m.in_channels * m.kernel_size[0] ** 2) ** -0.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize('scale', [2, 3, 4])
def test_forward_matches_reference_data_flow(scale):
    model = _randomised(scale)
    x = torch.rand(2, 3, 23, 17)  # >= 15: the original's 7x7 / stride-3 pooling, several windows along H
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference(model, x, lambda t: F.max_pool2d(t, 7, 3)),
                                   rtol=1e-4, atol=1e-5)
        # below 15 px, one pooling window over the whole (smaller than 7x7) map: its global max
        x = torch.rand(2, 3, 8, 11)
        torch.testing.assert_close(model(x), _reference(model, x, lambda t: t.amax((2, 3), keepdim=True)),
                                   rtol=1e-4, atol=1e-5)


def test_img_range_scales_internal_features():
    model = RLFN(upscale=2, **TINY).eval()
    seen = {}
    model.fea_conv.register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        model(x)
    torch.testing.assert_close(seen['x'], x * 255.)


# ----------------------------------------------------------------------------------------------------- quantized
def test_default_preset_quantizes_the_block_3x3_convs():
    from basicsr.archs import build_network

    from odm_basicsr.quant import quantizable_layers

    net = build_network({'type': 'Quantized', 'arch': {'type': 'RLFN'}, 'w_bits': 4, 'a_bits': 4})
    assert type(net).__name__ == 'QuantizedRLFN'
    names = [f'B{i}.{c}' for i in range(1, 5) for c in ('c1_r', 'c2_r', 'c3_r')]
    assert net.quant_config['layers'] == names
    assert [n for n, _ in net.quantized_layers()] == names
    fp = set(quantizable_layers(RLFN())) - set(names)
    assert {'fea_conv', 'LR_conv', 'upsampler.0', 'B1.c5', 'B4.esa.conv2'} <= fp and len(fp) == 3 + 4 * 6
    assert net(torch.rand(1, 3, 16, 16)).shape == (1, 3, 64, 64)


# ----------------------------------------------------------------------------------------- the published network
@needs_ckpt
def test_checkpoint_loads_strictly_as_a_plain_state_dict():
    from odm_basicsr.checkpoint import load_checkpoint, select_state_dict

    state = torch.load(CKPT, weights_only=True)
    assert 'params' not in state and 'params_ema' not in state and len(state) == 78
    model = RLFN()
    model.load_state_dict(state, strict=True)
    assert list(state) == list(model.state_dict())  # the original's order, too
    # BasicSR's param_key_g: params (and odm-eval's params_ema) fall through to the bare state dict
    for key in ('params', 'params_ema', None):
        used, selected = select_state_dict(load_checkpoint(str(CKPT)), key)
        assert used is None and set(selected) == set(state)


def test_option_file():
    with open(OPT, encoding='utf-8') as f:
        opt = yaml.safe_load(f)
    assert opt['model_type'] == 'SRModel' and opt['scale'] == 4
    net = dict(opt['network_g'])
    assert net.pop('type') == 'RLFN'
    assert net == dict(num_in_ch=3, num_out_ch=3, num_feat=46, mid_feat=48, num_block=4, esa_feat=16, upscale=4,
                       img_range=255.)
    assert opt['path'] == {'pretrain_network_g': '../shared/data/pretrained/RLFN_cut_x4_ntire22.pth',
                           'param_key_g': None, 'strict_load_g': True}
    assert [(d['name'], d['dataroot_gt'], d['dataroot_lq']) for d in opt['datasets'].values()] == [
        (s, f'../shared/data/benchmark/{s}/HR', f'../shared/data/benchmark/{s}/LRbicx4') for s in ('Set5', 'Set14')]
    for m in ('psnr', 'ssim'):
        assert opt['val']['metrics'][m] == {'type': f'calculate_{m}', 'crop_border': 4, 'test_y_channel': True}


@needs_ckpt
@needs_bench
def test_option_file_passes_basicsr_parser_and_checks(monkeypatch):
    """BasicSR's parse_options and check_options, run from the repository root (where its paths are relative)."""
    from basicsr.utils.options import parse_options

    from odm_basicsr.utils.option_check import check_options

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, 'argv', ['odm-test', '-opt', str(OPT)])
    opt, _ = parse_options(str(REPO), is_train=False)
    check_options(opt, is_train=False)


@pytest.mark.slow
@needs_ckpt
@needs_bench
def test_odm_eval_reproduces_the_published_numbers(tmp_path, capsys):
    from odm_basicsr.evaluate import build_parser, run

    args = build_parser().parse_args(['-opt', str(OPT), '--checkpoint', str(CKPT), '--data', str(BENCH),
                                      '--sets', *TARGET, '--out', str(tmp_path), '--device', 'cpu'])
    summary = run(args)
    capsys.readouterr()
    assert [(r['set'], r['images'], r['scale'], r['param_key']) for r in summary] == [
        ('Set5', 5, 4, None), ('Set14', 14, 4, None)]
    for r in summary:
        psnr, ssim = TARGET[r['set']]
        assert abs(r['psnr'] - psnr) < 1e-3, r
        assert abs(r['ssim'] - ssim) < 1e-4, r
    with open(tmp_path / 'eval.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [round(float(r['psnr']), 3) for r in rows] == [round(r['psnr'], 3) for r in summary]
    assert os.path.isfile(tmp_path / 'eval_per_image.csv')
