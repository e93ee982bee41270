"""``argparse`` types of the study command lines (a bad value is a usage error, exit status 2)."""
import argparse
import math


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


def bit_width(text):
    """A bit width of a quantized stage: an integer in 2..8."""
    return _checked(text, int, lambda v: 2 <= v <= 8, ('a bit width is an integer in 2..8',))


def positive_float(text):
    """A finite number > 0 (e.g. a loss weight)."""
    return _checked(text, float, lambda v: math.isfinite(v) and v > 0,
                    ('expected a positive number', 'expected a positive finite number'), lambda t, v: repr(t))
