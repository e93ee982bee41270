"""Reference modules: minimal copies of the source layouts (module names = state-dict keys), and :func:`check`,
which compares a converted network with the source-layout one on a random image."""
import math

import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from .layout import ConversionError, unwrap_state_dict
from .rules import DIV2K_MEAN


class MeanShift(nn.Conv2d):
    """EDSR-PyTorch ``common.MeanShift``."""

    def __init__(self, rgb_range, rgb_mean=DIV2K_MEAN, rgb_std=(1.0, 1.0, 1.0), sign=-1):
        super().__init__(3, 3, kernel_size=1)
        std = torch.Tensor(rgb_std)
        self.weight.data = torch.eye(3).view(3, 3, 1, 1) / std.view(3, 1, 1, 1)
        self.bias.data = sign * rgb_range * torch.Tensor(rgb_mean) / std
        for p in self.parameters():
            p.requires_grad = False


def _conv(cin, cout, k, bias=True):
    return nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)


class _EDSRResBlock(nn.Module):
    def __init__(self, n_feats, res_scale):
        super().__init__()
        self.body = nn.Sequential(_conv(n_feats, n_feats, 3), nn.ReLU(True), _conv(n_feats, n_feats, 3))
        self.res_scale = res_scale

    def forward(self, x):
        return self.body(x).mul(self.res_scale) + x


def _edsr_upsampler(scale, n_feats, bias=True, act=None):
    m = []
    stages = [3] if scale == 3 else [2] * int(math.log2(scale))
    for r in stages:
        m += [_conv(n_feats, r * r * n_feats, 3, bias=bias), nn.PixelShuffle(r)]
        if act == 'prelu':
            m.append(nn.PReLU())
    return nn.Sequential(*m)


class EDSRPyTorchRef(nn.Module):
    """EDSR-PyTorch ``src/model/edsr.py``; input and output in [0, rgb_range]."""

    def __init__(self, n_resblocks=16, n_feats=64, scale=4, rgb_range=255, n_colors=3, res_scale=1,
                 rgb_mean=DIV2K_MEAN):
        super().__init__()
        self.sub_mean = MeanShift(rgb_range, rgb_mean)
        self.add_mean = MeanShift(rgb_range, rgb_mean, sign=1)
        self.head = nn.Sequential(_conv(n_colors, n_feats, 3))
        self.body = nn.Sequential(*[_EDSRResBlock(n_feats, res_scale) for _ in range(n_resblocks)],
                                  _conv(n_feats, n_feats, 3))
        self.tail = nn.Sequential(_edsr_upsampler(scale, n_feats), _conv(n_feats, n_colors, 3))

    def forward(self, x):
        x = self.head(self.sub_mean(x))
        res = self.body(x) + x
        return self.add_mean(self.tail(res))


class _RDBConv(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(cin, growth, 3, padding=1), nn.ReLU())

    def forward(self, x):
        return torch.cat((x, self.conv(x)), 1)


class _RDB(nn.Module):
    def __init__(self, g0, g, c):
        super().__init__()
        self.convs = nn.Sequential(*[_RDBConv(g0 + i * g, g) for i in range(c)])
        self.LFF = nn.Conv2d(g0 + c * g, g0, 1)

    def forward(self, x):
        return self.LFF(self.convs(x)) + x


class RDNRef(nn.Module):
    """EDSR-PyTorch / DAQ / DDTB ``rdn.py`` (FP); input and output in [0, rgb_range]."""

    def __init__(self, scale=4, G0=64, D=16, C=8, G=64, n_colors=3):
        super().__init__()
        self.SFENet1 = nn.Conv2d(n_colors, G0, 3, padding=1)
        self.SFENet2 = nn.Conv2d(G0, G0, 3, padding=1)
        self.RDBs = nn.ModuleList(_RDB(G0, G, C) for _ in range(D))
        self.GFF = nn.Sequential(nn.Conv2d(D * G0, G0, 1), nn.Conv2d(G0, G0, 3, padding=1))
        if scale in (2, 3):
            self.UPNet = nn.Sequential(nn.Conv2d(G0, G * scale * scale, 3, padding=1), nn.PixelShuffle(scale),
                                       nn.Conv2d(G, n_colors, 3, padding=1))
        else:
            self.UPNet = nn.Sequential(nn.Conv2d(G0, G * 4, 3, padding=1), nn.PixelShuffle(2),
                                       nn.Conv2d(G, G * 4, 3, padding=1), nn.PixelShuffle(2),
                                       nn.Conv2d(G, n_colors, 3, padding=1))

    def forward(self, x):
        f1 = self.SFENet1(x)
        x = self.SFENet2(f1)
        outs = []
        for block in self.RDBs:
            x = block(x)
            outs.append(x)
        return self.UPNet(self.GFF(torch.cat(outs, 1)) + f1)


class _DAQResBlock(nn.Module):
    def __init__(self, n_feats, act):
        super().__init__()
        self.conv1 = _conv(n_feats, n_feats, 3, bias=False)
        self.conv2 = _conv(n_feats, n_feats, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(n_feats)
        self.act = act
        self.bn2 = nn.BatchNorm2d(n_feats)

    def forward(self, x):
        return self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))) + x


class SRResNetDAQRef(nn.Module):
    """DAQ ``src/model/srresnet.py`` + ``common_srresnet.py`` (FP; one ReLU shared by all blocks, mean shifts
    built but unused); input and output in [0, rgb_range]. DAQ forces x4; x2/x3 follow the same pattern."""

    def __init__(self, n_resblocks=16, n_feats=64, scale=4, rgb_range=255, n_colors=3):
        super().__init__()
        self.sub_mean = MeanShift(rgb_range)
        self.add_mean = MeanShift(rgb_range, sign=1)
        self.head = nn.Sequential(_conv(n_colors, n_feats, 9, bias=False), nn.PReLU())
        act = nn.ReLU(True)
        self.body = nn.Sequential(*[_DAQResBlock(n_feats, act) for _ in range(n_resblocks)],
                                  _conv(n_feats, n_feats, 3, bias=False), nn.BatchNorm2d(n_feats))
        self.tail = nn.Sequential(_edsr_upsampler(scale, n_feats, bias=False, act='prelu'),
                                  _conv(n_feats, n_colors, 9, bias=False))

    def forward(self, x):
        x = self.head(x)
        return self.tail(self.body(x) + x)


class _DDTBResBlock(nn.Module):
    def __init__(self, n_feats):
        super().__init__()
        self.conv1 = nn.Conv2d(n_feats, n_feats, 3, 1, 1, bias=False)
        self.in1 = nn.BatchNorm2d(n_feats, affine=True)
        self.relu = nn.PReLU()
        self.conv2 = nn.Conv2d(n_feats, n_feats, 3, 1, 1, bias=False)
        self.in2 = nn.BatchNorm2d(n_feats, affine=True)

    def forward(self, x):
        return self.in2(self.conv2(self.relu(self.in1(self.conv1(x))))) + x


class SRResNetDDTBRef(nn.Module):
    """DDTB ``model/bnsrresnet_org.py`` (64 channels, 16 blocks there); input and output in [0, rgb_range]."""

    def __init__(self, n_resblocks=16, n_feats=64, scale=4, n_colors=3):
        super().__init__()
        self.conv_input = nn.Conv2d(n_colors, n_feats, 9, 1, 4, bias=False)
        self.relu = nn.PReLU()
        self.residual = nn.Sequential(*[_DDTBResBlock(n_feats) for _ in range(n_resblocks)])
        self.conv_mid = nn.Conv2d(n_feats, n_feats, 3, 1, 1, bias=False)
        self.bn_mid = nn.BatchNorm2d(n_feats, affine=True)
        self.upscale = _edsr_upsampler(scale, n_feats, bias=False, act='prelu')
        self.conv_output = nn.Conv2d(n_feats, n_colors, 9, 1, 4, bias=False)

    def forward(self, x):
        out = self.relu(self.conv_input(x))
        out = self.bn_mid(self.conv_mid(self.residual(out))) + out
        return self.conv_output(self.upscale(out))


def build_reference(conv, rgb_range=255.):
    """The source-layout network that fits a :class:`Conversion` (FP, eval mode)."""
    o = conv.arch_opts
    if conv.arch == 'EDSR':
        ref = EDSRPyTorchRef(o['num_block'], o['num_feat'], o['upscale'], rgb_range, o['num_in_ch'],
                             o['res_scale'], o['rgb_mean'])
    elif conv.arch == 'RDN':
        ref = RDNRef(o['upscale'], o['num_feat'], o['num_block'], o['num_layer'], o['growth'], o['num_in_ch'])
    elif conv.layout == 'daq':
        ref = SRResNetDAQRef(o['num_block'], o['num_feat'], o['upscale'], rgb_range, o['num_in_ch'])
    else:
        ref = SRResNetDDTBRef(o['num_block'], o['num_feat'], o['upscale'], o['num_in_ch'])
    return ref.eval()


def check(source_state, conv, rgb_range=255., size=16, seed=0, reference=None):
    """Max |ours(x) - ref(x * rgb_range) / rgb_range| over a random image in [0, 1] (both FP, eval mode).

    ``reference``: the source-layout network to compare with (default: built from the conversion's options and
    loaded with ``source_state``).
    """
    if reference is None:
        ref = build_reference(conv, rgb_range)
        source_state = {k: v for k, v in unwrap_state_dict(source_state).items() if k not in conv.dropped
                        or k.startswith(('sub_mean.', 'add_mean.'))}
        missing, unexpected = ref.load_state_dict(source_state, strict=False)
        missing = [k for k in missing if not k.startswith(('sub_mean.', 'add_mean.'))
                   and not k.endswith('num_batches_tracked')]
        if missing or unexpected:
            raise ConversionError(f'--check: the input does not fit the reference {type(ref).__name__}: '
                                  f'missing {missing[:6]}, unexpected {unexpected[:6]}')
    else:
        ref = reference.eval()
    ours = ARCH_REGISTRY.get(conv.arch)(**conv.arch_opts).eval()
    ours.load_state_dict(conv.state_dict, strict=True)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(1, conv.arch_opts['num_in_ch'], size, size, generator=gen)
    with torch.no_grad():
        expected = ref(x * rgb_range) / rgb_range
        got = ours(x)
    if expected.shape != got.shape:
        raise ConversionError(f'--check: output shapes differ: reference {tuple(expected.shape)}, '
                              f'ours {tuple(got.shape)}')
    return (expected - got).abs().max().item()
