"""Residual Local Feature Network (RLFN), full precision.

Kong, Li, Zhang, Jiang, Wang, Tang, Zhang, Qi, Zhu, Luo, Zhang, Timofte, "Residual Local Feature Network for
Efficient Super-Resolution", CVPR 2022 workshops (https://arxiv.org/abs/2205.07514): the winner of the NTIRE 2022
efficient-SR challenge (main track). Written from the paper and checked against the challenge's own code,
``ofsoundof/NTIRE2022_ESR: models/team04_rlfn.py`` (class ``RLFN_cut``, the pruned "cut" variant with 46 feature
channels, 48 inside each block and 4 blocks), whose checkpoint ``model_zoo/team04_rlfn.pth`` loads here with
``strict=True`` and no key renaming (module names are the original's).

Data flow (LReLU: LeakyReLU with slope 0.05):

* ``f = fea_conv(x)`` (3x3);
* each block ``B{i}`` (RLFB): ``r = LReLU(c3_r(LReLU(c2_r(LReLU(c1_r(h)))))) + h`` (three 3x3 convs, the local
  residual added *before* the 1x1 ``c5``), then ``esa(c5(r))``;
* ``esa`` (enhanced spatial attention): ``a = conv1(y)`` (1x1 to ``esa_feat``); ``b = conv3(maxpool(conv2(a)))``
  with ``conv2`` 3x3 stride 2 without padding and a 7x7 max-pool with stride 3; ``b`` is resized bilinearly
  (``align_corners=False``) back to the block's size; ``y * sigmoid(conv4(b + conv_f(a)))``;
* ``out = pixel_shuffle(upsampler.0(LR_conv(B_n(...B_1(f))) + f))`` (one 3x3 conv to
  ``num_out_ch * upscale ** 2`` channels, then a single PixelShuffle(upscale)).

Only the interface differs from the original: inputs and outputs are in [0, 1] (BasicSR convention) and are
multiplied by ``img_range`` on entry and divided by it on exit, so that the features live on the 0-255 scale the
network was trained on (the challenge feeds it ``data_range = 255``). There is no mean shift.

Small inputs: the original needs at least 15x15 input pixels (the strided ``conv2`` must leave at least 7x7 for
the 7x7 pooling window). Here the pooling window is clipped to the map where the map is smaller than 7 (one
window over the whole map along that axis, i.e. the max of what is there), so 3x3 to 14x14 inputs also run;
from 15x15 on, the result is exactly the original's. Below 3x3 the strided ``conv2`` has no output (ValueError).

Parameter counts of the defaults (46 / 48 / 4 blocks / ESA 16): 302,278 (x2), 308,503 (x3), 317,218 (x4, the
published network, 78 state-dict tensors). The quantization preset (``layer_presets.py``) selects the three
3x3 convs of every block (``B*.c1_r``, ``B*.c2_r``, ``B*.c3_r``).
"""
import torch
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from .arch_util import PixelRangeMixin

NEG_SLOPE = 0.05
POOL_KERNEL, POOL_STRIDE = 7, 3


class ESA(nn.Module):
    """Enhanced spatial attention: a coarse, large-receptive-field sigmoid gate on the block's features.

    Args:
        num_feat (int): Channels of the gated features (input and output).
        esa_feat (int): Channels inside the unit.

    Shapes:
        (N, num_feat, H, W) -> (N, num_feat, H, W), H and W at least 3.
    """

    def __init__(self, num_feat, esa_feat):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, esa_feat, 1)
        self.conv_f = nn.Conv2d(esa_feat, esa_feat, 1)
        self.conv2 = nn.Conv2d(esa_feat, esa_feat, 3, stride=2, padding=0)
        self.conv3 = nn.Conv2d(esa_feat, esa_feat, 3, padding=1)
        self.conv4 = nn.Conv2d(esa_feat, num_feat, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        if h < 3 or w < 3:
            raise ValueError(f'RLFN needs inputs of at least 3x3 pixels (its attention unit downsamples with a '
                             f'3x3 stride-2 conv without padding), got {h}x{w}.')
        reduced = self.conv1(x)
        coarse = self.conv2(reduced)
        kernel = (min(POOL_KERNEL, coarse.shape[-2]), min(POOL_KERNEL, coarse.shape[-1]))  # see the module doc
        coarse = self.conv3(F.max_pool2d(coarse, kernel_size=kernel, stride=POOL_STRIDE))
        coarse = F.interpolate(coarse, size=(h, w), mode='bilinear', align_corners=False)
        return x * torch.sigmoid(self.conv4(coarse + self.conv_f(reduced)))


class RLFB(nn.Module):
    """Residual local feature block: three 3x3 conv + LReLU, local residual, 1x1 conv, ESA.

    Args:
        num_feat (int): Channels of the block's input and output.
        mid_feat (int): Channels between the three 3x3 convs.
        esa_feat (int): Channels inside the ESA unit.

    Shapes:
        (N, num_feat, H, W) -> (N, num_feat, H, W).
    """

    def __init__(self, num_feat, mid_feat, esa_feat):
        super().__init__()
        self.c1_r = nn.Conv2d(num_feat, mid_feat, 3, 1, 1)
        self.c2_r = nn.Conv2d(mid_feat, mid_feat, 3, 1, 1)
        self.c3_r = nn.Conv2d(mid_feat, num_feat, 3, 1, 1)
        self.c5 = nn.Conv2d(num_feat, num_feat, 1)
        self.esa = ESA(num_feat, esa_feat)
        self.act = nn.LeakyReLU(NEG_SLOPE)  # not in place: feature hooks (ODM) may hold the conv outputs

    def forward(self, x):
        out = self.act(self.c1_r(x))
        out = self.act(self.c2_r(out))
        out = self.act(self.c3_r(out)) + x
        return self.esa(self.c5(out))


@ARCH_REGISTRY.register()
class RLFN(PixelRangeMixin, nn.Module):
    """Residual Local Feature Network (NTIRE 2022 ``RLFN_cut`` layout), for x2, x3 and x4 super-resolution.

    Args:
        num_in_ch (int): Channels of the input image. Default: 3.
        num_out_ch (int): Channels of the output image. Default: 3.
        num_feat (int): Feature channels between blocks. Default: 46.
        mid_feat (int): Channels inside each block, between its three 3x3 convs. Default: 48.
        num_block (int): Number of blocks, named ``B1`` .. ``B{num_block}``. Default: 4.
        esa_feat (int): Channels inside each block's ESA unit. Default: 16.
        upscale (int): Upsampling factor, 2, 3 or 4. Default: 4.
        img_range (float): Factor from the [0, 1] input to the network's internal pixel scale (the published
            weights expect 255). Default: 255.

    Shapes:
        Input (N, num_in_ch, H, W) in [0, 1], H and W at least 3 (at least 15 to match the original exactly,
        see the module docstring); output (N, num_out_ch, H * upscale, W * upscale) on the same [0, 1] scale
        (not clamped).
    """

    def __init__(self,
                 num_in_ch=3,
                 num_out_ch=3,
                 num_feat=46,
                 mid_feat=48,
                 num_block=4,
                 esa_feat=16,
                 upscale=4,
                 img_range=255.):
        super().__init__()
        self.setup_pixel_range(upscale, img_range, None, num_in_ch, num_out_ch)
        if num_block < 1:
            raise ValueError(f'RLFN needs at least one block, got num_block={num_block!r}.')

        self.fea_conv = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.block_names = [f'B{i + 1}' for i in range(num_block)]
        for name in self.block_names:
            self.add_module(name, RLFB(num_feat, mid_feat, esa_feat))
        self.LR_conv = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.upsampler = nn.Sequential(
            nn.Conv2d(num_feat, num_out_ch * upscale * upscale, 3, 1, 1),
            nn.PixelShuffle(upscale),
        )

    def forward(self, x):
        """(N, num_in_ch, H, W) in [0, 1] -> (N, num_out_ch, H * upscale, W * upscale)."""
        x = self.to_pixel_range(x)

        feat = self.fea_conv(x)
        out = feat
        for name in self.block_names:
            out = getattr(self, name)(out)
        out = self.LR_conv(out) + feat

        return self.from_pixel_range(self.upsampler(out))
