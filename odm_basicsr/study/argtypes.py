"""``argparse`` types of the study command lines (a bad value is a usage error, exit status 2)."""
import argparse
import math


def positive_int(text):
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {value}')
    return value


def bit_width(text):
    """A bit width of a quantized stage: an integer in 2..8."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'a bit width is an integer in 2..8, got {text!r}') from None
    if not 2 <= value <= 8:
        raise argparse.ArgumentTypeError(f'a bit width is an integer in 2..8, got {value}')
    return value


def positive_float(text):
    """A finite number > 0 (e.g. a loss weight)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a positive number, got {text!r}') from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f'expected a positive finite number, got {text!r}')
    return value
