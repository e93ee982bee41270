"""Sizes of a cost count: the SR output size, the LR input it comes from, and the error a bad one is."""
import re

from odm_basicsr.tool_cli import ToolError

DEFAULT_OUTPUT_SIZE = (1280, 720)  # width, height


class CostError(ToolError, ValueError):
    """A bad option file, size or scale; ``odm-cost`` prints it on one line and exits with status 2."""


def parse_size(text):
    """``'1280x720'`` (width x height) -> ``(1280, 720)``."""
    m = re.fullmatch(r'\s*(\d+)\s*[xX\u00d7]\s*(\d+)\s*', str(text))
    if m is None or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise CostError(f'bad output size {text!r}: give it as WIDTHxHEIGHT with positive integers, e.g. 1280x720')
    return int(m.group(1)), int(m.group(2))


def lr_size(output_size, scale):
    """LR ``(width, height)`` whose SR output at ``scale`` is ``output_size``; CostError if not divisible."""
    w, h = output_size
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise CostError(f'scale must be a positive integer, got {scale!r}')
    if w % scale or h % scale:
        raise CostError(f'output size {w}x{h} is not divisible by the scale {scale} '
                        f'({w}/{scale} = {w / scale:g}, {h}/{scale} = {h / scale:g})')
    return w // scale, h // scale

