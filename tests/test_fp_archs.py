"""Full-precision RDN and SRResNet (with BN): shapes, gradients, registry, module names, sizes, data flow.

Parameter counts: the expected figures below are computed twice, once by closed formulas written from the
reference layouts (``rdn_param_count`` / ``srresnet_param_count``) and once hard-coded. They were cross-checked
(scratch script, not part of the suite) by building EDSR-PyTorch-layout models with the keys of
``Cheeun/DAQ-pytorch: src/model/rdn.py`` (= EDSR-PyTorch's RDN) and ``zysxmu/DDTB: model/bnsrresnet_org.py``,
loading their state dicts into ours with ``strict=True`` through the key maps of the module docstrings, and
getting identical outputs. RDN config B: 22,123,395 (x2), 22,308,035 (x3), 22,271,107 (x4), i.e. the usually
quoted 22.1M / 22.3M / 22.27M. SRResNet (64 features, 16 blocks, BN, PReLU per block): 1,399,314 (x2),
1,583,634 (x3), 1,546,771 (x4), i.e. the usually quoted ~1.5M for x4.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import odm_basicsr.archs  # noqa: F401  (BasicSR fixes + registration first)
from odm_basicsr.archs.rdn_arch import RDN
from odm_basicsr.archs.srresnet_bn_arch import SRResNet

SCALES = (2, 3, 4)
TINY_RDN = dict(num_feat=8, num_block=2, num_layer=2, growth=4)
TINY_SRRESNET = dict(num_feat=8, num_block=2)
MEAN = (0.4488, 0.4371, 0.4040)


def _tiny(arch, scale, **kwargs):
    torch.manual_seed(0)
    if arch == 'RDN':
        return RDN(upscale=scale, **TINY_RDN, **kwargs)
    return SRResNet(upscale=scale, **TINY_SRRESNET, **kwargs)


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def _conv(cin, cout, k, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


def rdn_param_count(scale, g0=64, d=16, c=8, g=64, colors=3):
    """Closed form for EDSR-PyTorch's RDN (SFENet1/2, RDBs, GFF, UPNet)."""
    rdb = sum(_conv(g0 + j * g, g, 3) for j in range(c)) + _conv(g0 + c * g, g0, 1)
    up = _conv(g0, g * scale * scale, 3) if scale in (2, 3) else _conv(g0, 4 * g, 3) + _conv(g, 4 * g, 3)
    return (_conv(colors, g0, 3) + _conv(g0, g0, 3) + d * rdb + _conv(d * g0, g0, 1) + _conv(g0, g0, 3) + up
            + _conv(g, colors, 3))


def srresnet_param_count(scale, f=64, n=16, colors=3):
    """Closed form for the BN SRResNet: bias-free convs, BN (2 params/channel), PReLU (1 param each)."""
    block = 2 * _conv(f, f, 3, bias=False) + 2 * 2 * f + 1
    stages = [2, 2] if scale == 4 else [scale]
    up = sum(_conv(f, f * r * r, 3, bias=False) + 1 for r in stages)
    return (_conv(colors, f, 9, bias=False) + 1 + n * block + _conv(f, f, 3, bias=False) + 2 * f + up
            + _conv(f, colors, 9, bias=False))


@pytest.mark.parametrize('scale', SCALES)
@pytest.mark.parametrize('arch', ['RDN', 'SRResNet'])
def test_shape_and_gradients(arch, scale):
    model = _tiny(arch, scale)
    model.train()
    x = torch.rand(1, 3, 8, 8)
    out = model(x)
    assert out.shape == (1, 3, 8 * scale, 8 * scale)
    assert torch.isfinite(out).all()
    out.abs().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    # at least the body convs receive a non-zero gradient
    first_conv = model.rdbs[0].layers[0].conv if arch == 'RDN' else model.body[0].conv1
    assert first_conv.weight.grad.abs().sum() > 0


def test_registry_returns_classes():
    from basicsr.utils.registry import ARCH_REGISTRY  # after ``import odm_basicsr`` (module top)

    assert ARCH_REGISTRY.get('RDN') is RDN
    assert ARCH_REGISTRY.get('SRResNet') is SRResNet
    # BasicSR's own modified SRResNet is still there, distinct from ours
    assert ARCH_REGISTRY.get('MSRResNet') is not SRResNet


def test_rdn_module_names():
    model = RDN(upscale=4, **TINY_RDN)
    modules = dict(model.named_modules())
    g0, g = TINY_RDN['num_feat'], TINY_RDN['growth']
    expected_convs = {
        'sfe1': (3, g0, 3), 'sfe2': (g0, g0, 3),
        'rdbs.0.layers.0.conv': (g0, g, 3), 'rdbs.0.layers.1.conv': (g0 + g, g, 3),
        'rdbs.1.layers.1.conv': (g0 + g, g, 3), 'rdbs.0.lff': (g0 + 2 * g, g0, 1), 'rdbs.1.lff': (g0 + 2 * g, g0, 1),
        'gff.0': (2 * g0, g0, 1), 'gff.1': (g0, g0, 3),
        'upsample.0': (g0, 4 * g, 3), 'upsample.2': (g, 4 * g, 3), 'conv_last': (g, 3, 3),
    }
    for name, (cin, cout, k) in expected_convs.items():
        m = modules[name]
        assert isinstance(m, nn.Conv2d), name
        assert (m.in_channels, m.out_channels, m.kernel_size) == (cin, cout, (k, k)), name
    assert isinstance(model.rdbs, nn.ModuleList) and len(model.rdbs) == 2
    assert isinstance(model.rdbs[0].layers, nn.ModuleList) and len(model.rdbs[0].layers) == 2
    assert isinstance(model.gff, nn.Sequential)
    assert isinstance(modules['upsample.1'], nn.PixelShuffle) and isinstance(modules['upsample.3'], nn.PixelShuffle)
    # x2 / x3: one conv to G * r^2 + PixelShuffle(r)
    up3 = RDN(upscale=3, **TINY_RDN).upsample
    assert len(up3) == 2 and up3[0].out_channels == 9 * g and up3[1].upscale_factor == 3
    # the quantization preset "3x3 convs inside the RDBs" finds exactly D * C convs
    dense_convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and '.layers.' in n]
    assert len(dense_convs) == 2 * 2


def test_srresnet_module_names():
    model = SRResNet(upscale=4, **TINY_SRRESNET)
    modules = dict(model.named_modules())
    f = TINY_SRRESNET['num_feat']
    expected_convs = {
        'head.0': (3, f, 9), 'body.0.conv1': (f, f, 3), 'body.0.conv2': (f, f, 3), 'body.1.conv1': (f, f, 3),
        'body.1.conv2': (f, f, 3), 'body_tail.0': (f, f, 3), 'upsample.0': (f, 4 * f, 3),
        'upsample.3': (f, 4 * f, 3), 'conv_last': (f, 3, 9),
    }
    for name, (cin, cout, k) in expected_convs.items():
        m = modules[name]
        assert isinstance(m, nn.Conv2d), name
        assert (m.in_channels, m.out_channels, m.kernel_size) == (cin, cout, (k, k)), name
        assert m.bias is None, name
    for name in ('body.0.bn1', 'body.0.bn2', 'body_tail.1'):
        assert isinstance(modules[name], nn.BatchNorm2d), name
    for name in ('head.1', 'body.0.act', 'upsample.2', 'upsample.5'):
        assert isinstance(modules[name], nn.PReLU), name
    assert isinstance(model.body, nn.Sequential) and len(model.body) == 2
    up3 = SRResNet(upscale=3, **TINY_SRRESNET).upsample
    assert len(up3) == 3 and up3[0].out_channels == 9 * f and up3[1].upscale_factor == 3


@pytest.mark.parametrize('scale, expected', [(2, 22_123_395), (3, 22_308_035), (4, 22_271_107)])
def test_rdn_default_param_count(scale, expected):
    assert rdn_param_count(scale) == expected
    assert _n_params(RDN(upscale=scale)) == expected
    if scale == 4:
        assert round(expected / 1e6, 2) == 22.27


@pytest.mark.parametrize('scale, expected', [(2, 1_399_314), (3, 1_583_634), (4, 1_546_771)])
def test_srresnet_default_param_count(scale, expected):
    assert srresnet_param_count(scale) == expected
    assert _n_params(SRResNet(upscale=scale)) == expected
    if scale == 4:
        assert round(expected / 1e6, 1) == 1.5


def test_tiny_param_counts_match_closed_forms():
    for scale in SCALES:
        assert _n_params(_tiny('RDN', scale)) == rdn_param_count(scale, g0=8, d=2, c=2, g=4)
        assert _n_params(_tiny('SRResNet', scale)) == srresnet_param_count(scale, f=8, n=2)


@pytest.mark.parametrize('arch', [RDN, SRResNet])
@pytest.mark.parametrize('upscale', [1, 8, 5])
def test_bad_upscale_raises(arch, upscale):
    with pytest.raises(ValueError, match=f'upscale={upscale}'):
        arch(upscale=upscale)


@pytest.mark.parametrize('arch', [RDN, SRResNet])
def test_bad_rgb_mean_raises(arch):
    with pytest.raises(ValueError, match='rgb_mean'):
        arch(rgb_mean=(0.5, 0.5))


def _fconv(params, name, x, bias=True):
    w = params[f'{name}.weight']
    return F.conv2d(x, w, params[f'{name}.bias'] if bias else None, padding=w.shape[-1] // 2)


def _rdn_reference(model, x, img_range, mean):
    """RDN data flow written from the paper / EDSR-PyTorch, on the model's weights."""
    p = dict(model.named_parameters())
    shift = torch.zeros(1, 3, 1, 1) if mean is None else torch.tensor(mean).view(1, 3, 1, 1)
    x = (x - shift) * img_range
    f1 = _fconv(p, 'sfe1', x)
    feat = _fconv(p, 'sfe2', f1)
    outs = []
    for i, block in enumerate(model.rdbs):
        dense = feat
        for j in range(len(block.layers)):
            dense = torch.cat((dense, F.relu(_fconv(p, f'rdbs.{i}.layers.{j}.conv', dense))), 1)
        feat = _fconv(p, f'rdbs.{i}.lff', dense) + feat
        outs.append(feat)
    g = _fconv(p, 'gff.1', _fconv(p, 'gff.0', torch.cat(outs, 1))) + f1
    if model.upscale == 4:
        g = F.pixel_shuffle(_fconv(p, 'upsample.2', F.pixel_shuffle(_fconv(p, 'upsample.0', g), 2)), 2)
    else:
        g = F.pixel_shuffle(_fconv(p, 'upsample.0', g), model.upscale)
    return _fconv(p, 'conv_last', g) / img_range + shift


def _srresnet_reference(model, x, img_range, mean):
    """Eval-mode SRResNet data flow (BN with running statistics), on the model's weights."""
    p = dict(model.named_parameters())
    b = dict(model.named_buffers())
    shift = torch.zeros(1, 3, 1, 1) if mean is None else torch.tensor(mean).view(1, 3, 1, 1)

    def bn(name, t):
        return F.batch_norm(t, b[f'{name}.running_mean'], b[f'{name}.running_var'], p[f'{name}.weight'],
                            p[f'{name}.bias'], False, 0., 1e-5)

    x = (x - shift) * img_range
    h = F.prelu(_fconv(p, 'head.0', x, bias=False), p['head.1.weight'])
    feat = h
    for i in range(len(model.body)):
        r = F.prelu(bn(f'body.{i}.bn1', _fconv(p, f'body.{i}.conv1', feat, bias=False)), p[f'body.{i}.act.weight'])
        feat = bn(f'body.{i}.bn2', _fconv(p, f'body.{i}.conv2', r, bias=False)) + feat
    feat = bn('body_tail.1', _fconv(p, 'body_tail.0', feat, bias=False)) + h
    stages = [2, 2] if model.upscale == 4 else [model.upscale]
    for k, r in enumerate(stages):
        feat = F.prelu(F.pixel_shuffle(_fconv(p, f'upsample.{3 * k}', feat, bias=False), r),
                       p[f'upsample.{3 * k + 2}.weight'])
    return _fconv(p, 'conv_last', feat, bias=False) / img_range + shift


def _randomise(model):
    """Non-trivial weights, BN statistics and PReLU slopes, so the comparison exercises every term."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.normal_(0, 1 / math.sqrt(fan_in))
                if m.bias is not None:
                    m.bias.normal_(0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
            elif isinstance(m, nn.PReLU):
                m.weight.uniform_(0.05, 0.5)


@pytest.mark.parametrize('rgb_mean', [None, MEAN])
@pytest.mark.parametrize('scale', SCALES)
@pytest.mark.parametrize('arch', ['RDN', 'SRResNet'])
def test_forward_matches_reference_data_flow(arch, scale, rgb_mean):
    img_range = 255.
    model = _tiny(arch, scale, img_range=img_range, rgb_mean=rgb_mean)
    _randomise(model)
    model.eval()
    x = torch.rand(2, 3, 8, 8)
    reference = _rdn_reference if arch == 'RDN' else _srresnet_reference
    with torch.no_grad():
        out = model(x)
        expected = reference(model, x, img_range, rgb_mean)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    # the mean is not a checkpoint entry (BasicSR's EDSR does not save it either)
    assert not any(k == 'mean' for k in model.state_dict())


def test_img_range_scales_internal_features():
    """Features live on the 0-255 scale: the first conv sees the input times img_range."""
    for model, first in ((_tiny('RDN', 2), 'sfe1'), (_tiny('SRResNet', 2), 'head.0')):
        seen = {}
        dict(model.named_modules())[first].register_forward_hook(lambda m, i, o, seen=seen: seen.update(x=i[0]))
        x = torch.rand(1, 3, 8, 8)
        model.eval()
        with torch.no_grad():
            model(x)
        torch.testing.assert_close(seen['x'], x * 255.)


def test_srresnet_init_is_he_fan_out():
    """Convs start as N(0, 2 / (k * k * out_channels)) like DAQ/DDTB; BN as weight 1, bias 0."""
    torch.manual_seed(0)
    model = SRResNet()
    w = model.body[0].conv1.weight
    assert abs(w.std().item() - math.sqrt(2. / (9 * 64))) < 0.005
    assert torch.equal(model.body[0].bn1.weight, torch.ones(64))
    assert torch.equal(model.body[0].bn1.bias, torch.zeros(64))
