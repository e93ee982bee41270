"""``odm-cost -opt X.yml [--output-size 1280x720] [--scale S] [--checkpoint C.pth] [--json] [--per-layer]``.

Builds ``network_g`` of a BasicSR option file (or of a YAML file holding only ``network_g``, or only the network
mapping itself) and prints its :func:`~odm_basicsr.cost.report.cost_report`. Errors: one line, exit status 2.
"""
import argparse
import json
import re

from odm_basicsr.network_options import build_network, in_channels, read_network_options
from odm_basicsr.tool_cli import run_cli

from .report import cost_report
from .sizes import CostError, lr_size, parse_size
from .text import format_report


def load_weights(net, path, param_key='params'):
    """Load ``param_key`` of a checkpoint into ``net`` (creating the offsets it carries); CostError if it does not
    fit. Quantizer entries may be absent (an FP checkpoint); NaN / Inf values are counted like any others."""
    from odm_basicsr.checkpoint import CheckpointError, MissingEntryError
    from odm_basicsr.checkpoint import load_weights as load

    try:
        load(net, path, param_key, fallback=None, strict=True)
    except MissingEntryError as e:
        raise CostError(f'{e}; use --param-key') from None
    except CheckpointError as e:
        raise CostError(str(e)) from None
    return net


def report_from_options(path, output_size='1280x720', scale=None, checkpoint=None, param_key='params',
                        method='auto'):
    """Build ``network_g`` of the option file ``path`` and return its :func:`cost_report`."""
    size = parse_size(output_size) if isinstance(output_size, str) else tuple(output_size)
    net_opt, scale = read_network_options(path, scale)
    lr_size(size, scale)  # a size error before the (possibly slow) build
    net = build_network(net_opt)
    if checkpoint:
        load_weights(net, checkpoint, param_key)
    return cost_report(net, size, scale, in_channels=in_channels(net_opt), method=method)


def build_parser():
    parser = argparse.ArgumentParser(
        prog='odm-cost', description='MACs, parameters, BitOPs and storage of network_g of a BasicSR option file '
        '(METHOD.md section 7).')
    parser.add_argument('-opt', required=True, help='BasicSR option file, or a YAML file with only network_g')
    parser.add_argument('--output-size', default='1280x720', help='SR output WIDTHxHEIGHT (default: 1280x720)')
    parser.add_argument('--scale', default=None, help='upscaling factor (default: the option file\'s scale, else '
                        'the arch\'s upscale/scale)')
    parser.add_argument('--checkpoint', default=None, help='load these weights first (counts the offsets a trained '
                        'ODM checkpoint carries)')
    parser.add_argument('--param-key', default='params', help='entry of the checkpoint to load (default: params)')
    parser.add_argument('--json', action='store_true', help='print one JSON object')
    parser.add_argument('--per-layer', action='store_true', help='also print one line per layer (text output)')
    return parser


def run(args):
    scale = None
    if args.scale is not None:
        if not re.fullmatch(r'\s*\d+\s*', args.scale) or int(args.scale) < 1:
            raise CostError(f'bad --scale {args.scale!r}: give a positive integer')
        scale = int(args.scale)
    report = report_from_options(args.opt, args.output_size, scale, args.checkpoint, args.param_key)
    print(json.dumps(report) if args.json else format_report(report, per_layer=args.per_layer))
    return report


def main(argv=None):
    """Entry point of ``odm-cost``."""
    return run_cli('odm-cost', build_parser(), run, argv)
