"""Default quantized-layer sets per architecture (METHOD.md section 3).

The convention (DAQ's, the ODM author's earlier work): quantize the input activation and the weight of every
convolution inside the residual body; keep the head, the conv after the body, the upsampler, the last conv,
mean shifts, skip connections and residual additions in full precision.

Besides an architecture's ``default`` set, ``layers: all`` selects every Conv2d/Linear except the first and the
last one (a harder setting), and any list of patterns selects by module name.
"""

LAYER_PRESETS = {
    # BasicSR EDSR: body = Sequential of ResidualBlockNoBN(conv1, relu, conv2)
    'EDSR': ['body.*.conv1', 'body.*.conv2'],
    # odm_basicsr RDN: the 3x3 convs of the dense layers inside each RDB (the 1x1 local fusion stays FP)
    'RDN': ['rdbs.*.layers.*.conv'],
    # odm_basicsr SRResNet (with BN, the DAQ/DDTB variant): the two convs of each residual block
    'SRResNet': ['body.*.conv1', 'body.*.conv2'],
    # BasicSR MSRResNet (no BN): the two convs of each residual block
    'MSRResNet': ['body.*.conv1', 'body.*.conv2'],
    # BasicSR RCAN: the two 3x3 convs of every RCAB; channel attention (1x1 convs on pooled features) stays FP
    'RCAN': ['body.*.residual_group.*.rcab.0', 'body.*.residual_group.*.rcab.2'],
    # BasicSR RRDBNet: the five convs of every dense block inside every RRDB
    'RRDBNet': ['body.*.rdb*.conv*'],
    # BasicSR SwinIR: the linear layers of every transformer block (qkv, attention projection, MLP).
    # FP: patch embedding, the attention matmuls and softmax, LayerNorms, the conv closing each RSTB,
    # conv_first, conv_after_body and the upsampler.
    'SwinIR': ['layers.*.residual_group.blocks.*.attn.qkv', 'layers.*.residual_group.blocks.*.attn.proj',
               'layers.*.residual_group.blocks.*.mlp.fc1', 'layers.*.residual_group.blocks.*.mlp.fc2'],
    # odm_basicsr RLFN: the three 3x3 convs of every block, its residual body (76% of the weights, 81% of the MACs).
    # FP: each block's 1x1 c5 and its ESA unit (a small attention branch whose sigmoid gate multiplies the
    # features, like RCAN's channel attention above), fea_conv (head), LR_conv (the conv after the body, before
    # the global skip) and the upsampler.
    'RLFN': ['B*.c1_r', 'B*.c2_r', 'B*.c3_r'],
}

LAYER_SET_NAMES = ('default', 'all')


def all_but_first_last(candidates):
    """Every candidate layer except the first and the last (in registration order)."""
    return list(candidates[1:-1])
