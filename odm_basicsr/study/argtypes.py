"""``argparse`` types and checks of the study command lines (a bad value is a usage error, exit status 2).

The checks (:func:`given_together`, :func:`pretrained_network`, :func:`train_images`, :func:`check_benchmarks`) run
on the parsed arguments, before anything trains, and report through ``parser.error``.
"""
import argparse
import math
import os

from odm_basicsr.tool_cli import ToolError, one_line

from .data import hr_images


def _checked(text, kind, ok, wanted, shown=None):
    """``kind(text)`` if ``ok`` accepts it; else ArgumentTypeError ``'<wanted>, got <text>'``."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{wanted[0]}, got {text!r}') from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f'{wanted[-1]}, got {shown(text, value) if shown else value}')
    return value


def positive_int(text):
    """An integer >= 1."""
    return _checked(text, int, lambda v: v >= 1, ('expected a positive integer',))


def non_negative_int(text):
    """An integer >= 0."""
    return _checked(text, int, lambda v: v >= 0, ('expected an integer >= 0',))


def bit_width(text):
    """A bit width of a quantized stage: an integer in 2..8."""
    return _checked(text, int, lambda v: 2 <= v <= 8, ('a bit width is an integer in 2..8',))


def positive_float(text):
    """A finite number > 0 (e.g. a loss weight)."""
    return _checked(text, float, lambda v: math.isfinite(v) and v > 0,
                    ('expected a positive number', 'expected a positive finite number'), lambda t, v: repr(t))


# ------------------------------------------------------------------------------------------ checks of parsed values
def given_together(parser, flags, values):
    """Usage error unless the two ``flags`` (e.g. ``('--a', '--b')``) are both given or both left out."""
    if (values[0] is None) != (values[1] is None):
        parser.error(f'{flags[0]} and {flags[1]} go together')


def pretrained_network(parser, opt_path, checkpoint, what=''):
    """``(network_g, scale, entry)`` of a pretrained FP network: its option file and checkpoint must exist and be
    readable; ``entry`` is ``params_ema``, else ``params``, else None (a plain state dict). ``what`` prefixes the
    messages (e.g. ``'rlfn: '``)."""
    from odm_basicsr.checkpoint import CheckpointError, read_state
    from odm_basicsr.network_options import read_network_options

    for path in (opt_path, checkpoint):
        if not os.path.isfile(path):
            parser.error(f'{what}file not found: {path}')
    try:
        net_opt, scale = read_network_options(opt_path)
        key = read_state(checkpoint, 'params_ema')[0]
    except (ToolError, CheckpointError) as e:
        parser.error(f'{what}{one_line(e)}')
    return net_opt, scale, key


def train_images(parser, data, sets):
    """The HR image paths of ``<data>/train/<set>`` for each of ``sets`` (``--train-sets``)."""
    paths = []
    for name in sets:
        folder = os.path.join(data, 'train', name)
        if not os.path.isdir(folder):
            parser.error(f'--train-sets: folder not found: {folder}')
        try:
            paths += hr_images(folder)
        except ValueError as e:
            parser.error(f'--train-sets: {e}')
    return paths


def check_benchmarks(parser, data, sets, scale):
    """Usage error unless ``<data>/benchmark/<set>`` has ``HR`` and ``LRbicx<scale>`` for each of ``sets``."""
    for name in sets:
        for sub in ('HR', f'LRbicx{scale}'):
            if not os.path.isdir(os.path.join(data, 'benchmark', name, sub)):
                parser.error(f'--data: missing {os.path.join(data, "benchmark", name, sub)}')
