"""Residual Dense Network (RDN), full precision.

Zhang, Tian, Kong, Zhong, Fu, "Residual Dense Network for Image Super-Resolution", CVPR 2018
(https://arxiv.org/abs/1802.08797), with the layer layout of EDSR-PyTorch's ``src/model/rdn.py``, which the
SR-quantization code bases (DAQ, DDTB, AdaBM) use unchanged in full precision. Checked against
``Cheeun/DAQ-pytorch: src/model/rdn.py`` and the unmodified EDSR-PyTorch fork ``Liang-ZX/EDSR-PyTorch:
src/model/rdn.py``.

Only the interface differs from EDSR-PyTorch: inputs and outputs are in [0, 1] (BasicSR convention) and are
multiplied by ``img_range`` on entry and divided by it on exit, so that the features live on EDSR-PyTorch's
0-255 scale (``--rgb_range 255``). EDSR-PyTorch's RDN has no mean shift; ``rgb_mean=None`` (the default) keeps it
that way.

State-dict key mapping, EDSR-PyTorch -> this module (``i``: RDB index, ``j``: dense layer index, ``.weight`` and
``.bias`` suffixes unchanged):

==================================  =================================
EDSR-PyTorch (``RDN``)              ``odm_basicsr`` (``RDN``)
==================================  =================================
``SFENet1``                         ``sfe1``
``SFENet2``                         ``sfe2``
``RDBs.{i}.convs.{j}.conv.0``       ``rdbs.{i}.layers.{j}.conv``
``RDBs.{i}.LFF``                    ``rdbs.{i}.lff``
``GFF.0`` / ``GFF.1``               ``gff.0`` / ``gff.1``
``UPNet.0``                         ``upsample.0``
``UPNet.2`` (x4 only)               ``upsample.2``
``UPNet.2`` (x2, x3)                ``conv_last``
``UPNet.4`` (x4)                    ``conv_last``
==================================  =================================

EDSR-PyTorch's configs: A = (D=20, C=6, G=32), B = (D=16, C=8, G=64), both with G0=64 and kernel 3. Here D is
``num_block``, C is ``num_layer``, G is ``growth`` and G0 is ``num_feat``. Config B (the defaults) has
22,123,395 / 22,308,035 / 22,271,107 parameters for x2 / x3 / x4.
"""
import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from .arch_util import PixelRangeMixin


class DenseLayer(nn.Module):
    """One layer of a residual dense block: 3x3 conv + ReLU, output concatenated to its input.

    Args:
        in_ch (int): Channels of the input (all earlier features of the block, concatenated).
        growth (int): Channels the layer adds (G).
    """

    def __init__(self, in_ch, growth):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, growth, 3, 1, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        """(N, in_ch, H, W) -> (N, in_ch + growth, H, W)."""
        return torch.cat((x, self.act(self.conv(x))), 1)


class RDB(nn.Module):
    """Residual dense block: ``num_layer`` dense layers, 1x1 local feature fusion, local residual.

    Args:
        num_feat (int): Channels of the block's input and output (G0).
        growth (int): Growth rate (G) of the dense layers.
        num_layer (int): Number of dense layers (C).
    """

    def __init__(self, num_feat, growth, num_layer):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(num_feat + j * growth, growth) for j in range(num_layer))
        self.lff = nn.Conv2d(num_feat + num_layer * growth, num_feat, 1, 1, 0)

    def forward(self, x):
        """(N, num_feat, H, W) -> (N, num_feat, H, W)."""
        feat = x
        for layer in self.layers:
            feat = layer(feat)
        return self.lff(feat) + x


@ARCH_REGISTRY.register()
class RDN(PixelRangeMixin, nn.Module):
    """Residual Dense Network (EDSR-PyTorch layout), for x2, x3 and x4 super-resolution.

    Data flow: ``f1 = sfe1(x)``, ``f = sfe2(f1)``, ``f_d = rdbs[d](f_{d-1})`` for every block,
    ``g = gff(cat(f_1 .. f_D)) + f1``, ``out = conv_last(upsample(g))``.

    Args:
        num_in_ch (int): Channels of the input image. Default: 3.
        num_out_ch (int): Channels of the output image. Default: 3.
        num_feat (int): Feature channels G0 between blocks. Default: 64.
        num_block (int): Number of residual dense blocks D. Default: 16.
        num_layer (int): Dense layers C per block. Default: 8.
        growth (int): Growth rate G of the dense layers; also the channels of the upsampler's output. Default: 64.
        upscale (int): Upsampling factor, 2, 3 or 4. Default: 4.
        img_range (float): Factor from the [0, 1] input to the network's internal pixel scale. Default: 255.
        rgb_mean (sequence[float] | None): Per-channel mean in [0, 1], subtracted (times ``img_range``) on entry
            and added back on exit; must have ``num_in_ch`` entries and ``num_in_ch == num_out_ch``. Default:
            None (no mean shift, as in EDSR-PyTorch's RDN).

    Shapes:
        Input (N, num_in_ch, H, W) in [0, 1]; output (N, num_out_ch, H * upscale, W * upscale) in [0, 1] scale.
    """

    def __init__(self,
                 num_in_ch=3,
                 num_out_ch=3,
                 num_feat=64,
                 num_block=16,
                 num_layer=8,
                 growth=64,
                 upscale=4,
                 img_range=255.,
                 rgb_mean=None):
        super().__init__()
        self.setup_pixel_range(upscale, img_range, rgb_mean, num_in_ch, num_out_ch)

        # shallow feature extraction
        self.sfe1 = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.sfe2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        # residual dense blocks
        self.rdbs = nn.ModuleList(RDB(num_feat, growth, num_layer) for _ in range(num_block))
        # global feature fusion
        self.gff = nn.Sequential(
            nn.Conv2d(num_block * num_feat, num_feat, 1, 1, 0),
            nn.Conv2d(num_feat, num_feat, 3, 1, 1),
        )
        # upsampler (no activation, as in EDSR-PyTorch's RDN)
        if upscale == 4:
            self.upsample = nn.Sequential(
                nn.Conv2d(num_feat, growth * 4, 3, 1, 1),
                nn.PixelShuffle(2),
                nn.Conv2d(growth, growth * 4, 3, 1, 1),
                nn.PixelShuffle(2),
            )
        else:
            self.upsample = nn.Sequential(
                nn.Conv2d(num_feat, growth * upscale * upscale, 3, 1, 1),
                nn.PixelShuffle(upscale),
            )
        self.conv_last = nn.Conv2d(growth, num_out_ch, 3, 1, 1)

    def forward(self, x):
        """(N, num_in_ch, H, W) in [0, 1] -> (N, num_out_ch, H * upscale, W * upscale)."""
        x = self.to_pixel_range(x)

        f1 = self.sfe1(x)
        feat = self.sfe2(f1)
        block_outs = []
        for block in self.rdbs:
            feat = block(feat)
            block_outs.append(feat)
        feat = self.gff(torch.cat(block_outs, 1)) + f1

        out = self.conv_last(self.upsample(feat))
        return self.from_pixel_range(out)
