#!/usr/bin/env python
"""Convert full-precision EDSR-PyTorch / DAQ / DDTB checkpoints to BasicSR state dicts for odm-basicsr.

Usage::

    python scripts/convert_edsr_pytorch.py edsr_baseline_x4-6b446fab.pt pretrained/EDSR_x4_fp.pth --check
    python scripts/convert_edsr_pytorch.py rdn_x4.pt pretrained/RDN_x4_fp.pth --arch RDN --check
    python scripts/convert_edsr_pytorch.py srresnet_x4.pt pretrained/SRResNet_x4_fp.pth --arch SRResNet --check

The output is ``{'params': state_dict}``, loadable with ``path.pretrain_network_g`` and ``strict_load_g: true``
into ``network_g: {type: Quantized, arch: {...}}`` (the quantizer entries the FP file lacks are expected). The
script prints the ``arch`` options that fit the converted weights.

Source layouts (``--arch auto`` recognises them from the keys):

* ``EDSR``: EDSR-PyTorch's ``src/model/edsr.py`` (``sub_mean``, ``head.0``, ``body.{i}.body.0|2``,
  ``body.{n}``, ``tail.0.{k}``, ``tail.1``, ``add_mean``) -> BasicSR ``EDSR`` (``conv_first``,
  ``body.{i}.conv1|conv2``, ``conv_after_body``, ``upsample.{k}``, ``conv_last``). The mean shifts become
  ``rgb_mean``; ``rgb_std`` other than 1 is rejected (BasicSR's EDSR has none). ``res_scale`` is not stored in
  the weights: ``--res-scale`` (default 1, or 0.1 for the 32-block 256-channel EDSR, as EDSR-PyTorch trains it).
* ``RDN``: EDSR-PyTorch / DAQ / DDTB ``rdn.py`` (``SFENet1``, ``RDBs.{i}.convs.{j}.conv.0``, ``GFF``,
  ``UPNet``) -> ``odm_basicsr`` ``RDN`` (mapping in ``odm_basicsr/archs/rdn_arch.py``).
* ``SRResNet``: DAQ's ``srresnet.py`` (``head``, ``body.{i}.conv1|bn1|conv2|bn2``, ``body.{n}``,
  ``body.{n+1}``, ``tail.0.{k}``, ``tail.1``; its unused ``sub_mean``/``add_mean`` are dropped, its shared ReLU
  becomes per-block PReLU slopes of 0, which is exactly ReLU) or DDTB's ``bnsrresnet_org.py`` (``conv_input``,
  ``residual.{i}.conv1|in1|relu|conv2|in2``, ``conv_mid``, ``bn_mid``, ``upscale.{k}``, ``conv_output``) ->
  ``odm_basicsr`` ``SRResNet`` (mapping in ``odm_basicsr/archs/srresnet_bn_arch.py``).

All three feed images in [0, ``rgb_range``] (EDSR-PyTorch's ``--rgb_range 255``); the converted networks take
[0, 1] and use ``img_range: rgb_range`` inside, so they compute the same function.

``--check`` builds the source-layout network (a minimal copy of the original module structure,
``odm_basicsr/convert/reference.py``) and ours, loads both and compares their outputs on a random image. Every
source key must be used or dropped explicitly (``--drop REGEX``, e.g. quantizer entries of a quantized checkpoint);
anything else is an error. The conversion itself is ``odm_basicsr.convert``; this file is its command line.

Where the originals are: EDSR-baseline x2/x3/x4 (``edsr_baseline_x{2,3,4}-*.pt``) at
https://cv.snu.ac.kr/research/EDSR/models/ (URLs in EDSR-PyTorch's ``src/model/edsr.py``); DAQ's FP models
(EDSR-baseline, RDN, SRResNet) in the Google Drive folder linked from https://github.com/Cheeun/DAQ-pytorch;
DDTB's FP models in the Google Drive folder linked from https://github.com/zysxmu/DDTB.
"""
import argparse
import os
import sys

from odm_basicsr.checkpoint import atomic_save
from odm_basicsr.convert import ARCHS, ConversionError, check, convert, load_source


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('input', help='EDSR-PyTorch / DAQ / DDTB checkpoint (.pt)')
    parser.add_argument('output', help='BasicSR checkpoint to write (.pth), {"params": state_dict}')
    parser.add_argument('--arch', choices=('auto',) + ARCHS, default='auto',
                        help='expected architecture (default: recognised from the keys)')
    parser.add_argument('--rgb-range', type=float, default=255.,
                        help='the source\'s --rgb_range (default 255); becomes img_range')
    parser.add_argument('--res-scale', type=float, default=None,
                        help='EDSR residual scaling (default 1; 0.1 for the 32-block 256-channel EDSR)')
    parser.add_argument('--drop', action='append', default=[], metavar='REGEX',
                        help='drop source keys matching REGEX (repeatable), e.g. quantizer entries')
    parser.add_argument('--check', action='store_true',
                        help='compare the outputs of the source-layout network and ours on a random image')
    parser.add_argument('--check-size', type=int, default=16, help='--check input size in pixels (default 16)')
    parser.add_argument('--tol', type=float, default=1e-4, help='--check tolerance on the [0, 1] scale')
    parser.add_argument('--trust', action='store_true',
                        help='load the input with weights_only=False (only for files from a trusted source)')
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        source = load_source(args.input, trust=args.trust)
        conv = convert(source, arch=args.arch, rgb_range=args.rgb_range, res_scale=args.res_scale,
                       drop=args.drop)
        print(f'{args.input}: {conv.arch} ({conv.layout} layout), {len(conv.state_dict)} entries, '
              f'{sum(v.numel() for k, v in conv.state_dict.items() if v.is_floating_point()):,} values')
        for note in conv.notes:
            print(f'  note: {note}')
        if conv.dropped:
            print(f'  dropped {len(conv.dropped)} source entries: {", ".join(conv.dropped[:6])}'
                  f'{", ..." if len(conv.dropped) > 6 else ""}')
        if args.check:
            diff = check(source, conv, args.rgb_range, size=args.check_size)
            status = 'ok' if diff <= args.tol else 'FAILED'
            print(f'  check: max |ours - source| = {diff:.3g} on the [0, 1] scale (tolerance {args.tol:g}): '
                  f'{status}')
            if diff > args.tol:
                return 1
    except ConversionError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 1
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    atomic_save({'params': conv.state_dict}, args.output)
    print(f'wrote {args.output}\nnetwork_g:\n  type: Quantized\n  arch: {conv.network_yaml()}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
