"""SRResNet with batch normalisation, full precision (the SRResNet of the SR-quantization papers).

Ledig et al., "Photo-Realistic Single Image Super-Resolution Using a Generative Adversarial Network", CVPR 2017
(https://arxiv.org/abs/1609.04802), in the form used by DAQ / DDTB / AdaBM. Checked against
``Cheeun/DAQ-pytorch: src/model/srresnet.py`` + ``src/model/common_srresnet.py``,
``zysxmu/DDTB: model/bnsrresnet_org.py`` and ``Cheeun/AdaBM: src/model/srresnet.py`` + ``src/model/common.py``:

* head: 9x9 conv (no bias) + PReLU (one shared slope);
* body: ``num_block`` residual blocks conv3x3-BN-PReLU-conv3x3-BN + identity (all convs without bias);
* after the body: conv3x3 (no bias) + BN, then a long skip from the head's output;
* upsampler: per x2 stage conv3x3 to 4 * num_feat (no bias) + PixelShuffle(2) + PReLU; for x3 one stage
  conv3x3 to 9 * num_feat + PixelShuffle(3) + PReLU (AdaBM's ``Upsampler``);
* last: 9x9 conv to the output channels (no bias);
* convolutions initialised as N(0, 2 / (k * k * out_channels)) (He normal, fan-out), BN as weight 1, bias 0.

Input scale: all three code bases feed images in [0, 255] (EDSR-PyTorch's ``--rgb_range 255``, the default of
both DAQ's and DDTB's ``option.py``) and apply no mean shift: DAQ's ``SRResNet`` builds ``sub_mean``/``add_mean``
but never calls them in ``forward``, DDTB's and AdaBM's have none. Hence the defaults here: ``img_range=255.``
(inputs in [0, 1] are multiplied by 255 on entry, outputs divided on exit) and ``rgb_mean=None``.

Differences between the references, and the choice made here:

* Block activation: DDTB and AdaBM use one PReLU per block (this module); DAQ passes a single shared
  ``nn.ReLU`` to every block. A DAQ checkpoint therefore loads here (``strict=False``) without the 16 PReLU
  slopes, and the activation differs (set each ``body.{i}.act.weight`` to 0 to reproduce ReLU exactly).
* Upscale: DAQ's ``Upsampler`` forces x4 whatever the scale; DDTB implements x2 and x4; AdaBM x2^n and x3. This
  module supports x2, x3, x4.

State-dict key mapping, EDSR-PyTorch style (DAQ / AdaBM, ``n = num_block``) -> this module:

===================================================  =============================================
DAQ / AdaBM                                          ``odm_basicsr`` (``SRResNet``)
===================================================  =============================================
``head.0`` / ``head.1``                              ``head.0`` / ``head.1``
``body.{i}.conv1|bn1|act|conv2|bn2`` (i < n)         ``body.{i}.conv1|bn1|act|conv2|bn2``
``body.{n}`` (conv) / ``body.{n+1}`` (BN)            ``body_tail.0`` / ``body_tail.1``
``tail.0.{k}`` (upsampler)                           ``upsample.{k}``
``tail.1``                                           ``conv_last``
===================================================  =============================================

DDTB (``bnsrresnet_org.py``): ``conv_input`` -> ``head.0``, ``relu`` -> ``head.1``, ``residual.{i}.conv1|in1|relu|
conv2|in2`` -> ``body.{i}.conv1|bn1|act|conv2|bn2``, ``conv_mid`` / ``bn_mid`` -> ``body_tail.0`` / ``body_tail.1``,
``upscale.{k}`` -> ``upsample.{k}``, ``conv_output`` -> ``conv_last``.

Parameter counts with the defaults (num_feat=64, num_block=16): 1,546,771 (x4), 1,583,634 (x3), 1,399,314 (x2).
"""
from basicsr.archs.arch_util import default_init_weights, make_layer
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from .arch_util import PixelRangeMixin


class ResidualBlockBN(nn.Module):
    """Residual block conv3x3-BN-PReLU-conv3x3-BN + identity, convolutions without bias.

    Args:
        num_feat (int): Channels of input, hidden and output features. Default: 64.
    """

    def __init__(self, num_feat=64):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_feat)
        self.act = nn.PReLU()
        self.conv2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(num_feat)

    def forward(self, x):
        """(N, num_feat, H, W) -> (N, num_feat, H, W)."""
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return out + x


@ARCH_REGISTRY.register()
class SRResNet(PixelRangeMixin, nn.Module):
    """SRResNet with batch normalisation (DAQ / DDTB / AdaBM layout), for x2, x3 and x4 super-resolution.

    Data flow: ``h = head(x)``, ``out = conv_last(upsample(body_tail(body(h)) + h))``.

    Not BasicSR's ``MSRResNet`` (which has no BN, LeakyReLU and a bilinear global skip).

    Args:
        num_in_ch (int): Channels of the input image. Default: 3.
        num_out_ch (int): Channels of the output image. Default: 3.
        num_feat (int): Feature channels. Default: 64.
        num_block (int): Number of residual blocks. Default: 16.
        upscale (int): Upsampling factor, 2, 3 or 4. Default: 4.
        img_range (float): Factor from the [0, 1] input to the network's internal pixel scale. Default: 255.
            (DAQ/DDTB's ``rgb_range``).
        rgb_mean (sequence[float] | None): Per-channel mean in [0, 1], subtracted (times ``img_range``) on entry
            and added back on exit; must have ``num_in_ch`` entries and ``num_in_ch == num_out_ch``. Default:
            None (no mean shift, as in DAQ's and DDTB's forward passes).

    Shapes:
        Input (N, num_in_ch, H, W) in [0, 1]; output (N, num_out_ch, H * upscale, W * upscale) in [0, 1] scale.
    """

    def __init__(self, num_in_ch=3, num_out_ch=3, num_feat=64, num_block=16, upscale=4, img_range=255.,
                 rgb_mean=None):
        super().__init__()
        self.setup_pixel_range(upscale, img_range, rgb_mean, num_in_ch, num_out_ch)

        self.head = nn.Sequential(nn.Conv2d(num_in_ch, num_feat, 9, 1, 4, bias=False), nn.PReLU())
        self.body = make_layer(ResidualBlockBN, num_block, num_feat=num_feat)
        self.body_tail = nn.Sequential(nn.Conv2d(num_feat, num_feat, 3, 1, 1, bias=False), nn.BatchNorm2d(num_feat))

        stages = [2, 2] if upscale == 4 else [upscale]
        upsample = []
        for r in stages:
            upsample += [nn.Conv2d(num_feat, num_feat * r * r, 3, 1, 1, bias=False), nn.PixelShuffle(r), nn.PReLU()]
        self.upsample = nn.Sequential(*upsample)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 9, 1, 4, bias=False)

        # N(0, 2 / (k * k * out_channels)) for every conv, as in DAQ / DDTB / AdaBM; BN weight 1, bias 0
        default_init_weights(self, mode='fan_out', nonlinearity='relu')

    def forward(self, x):
        """(N, num_in_ch, H, W) in [0, 1] -> (N, num_out_ch, H * upscale, W * upscale)."""
        x = self.to_pixel_range(x)

        feat = self.head(x)
        out = self.body_tail(self.body(feat)) + feat
        out = self.conv_last(self.upsample(out))

        return self.from_pixel_range(out)
