"""Uniform fake quantization with a straight-through estimator (METHOD.md section 3).

Plain PyTorch: nothing in ``odm_basicsr.quant`` imports BasicSR.
"""
import torch

FP_BITS = 32
VALID_BITS = (2, 3, 4, 5, 6, 7, 8, FP_BITS)


def check_bits(bits, name='bits'):
    """Return ``bits`` as an int, or raise a ValueError that names the option.

    Args:
        bits (int): Bit width: 2 to 8, or 32 meaning "not quantized".
        name (str): Option name used in the error message. Default: 'bits'.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise ValueError(f'{name} must be one of 2..8 or 32 (= full precision), got {bits!r}')
    return bits


class _RoundSTE(torch.autograd.Function):
    """round() whose backward pass is the identity."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


def round_ste(x):
    """Round to the nearest integer; gradient passes straight through."""
    return _RoundSTE.apply(x)


def clip_to_range(x, lower, upper):
    """Clip ``x`` to ``[lower, upper]``.

    The gradient reaches ``x`` inside the range and the bound that clipped it outside (PACT/LSQ style), so
    learnable bounds see the error of the values they cut off.
    """
    return torch.where(x < lower, lower, torch.where(x > upper, upper, x))


def fake_quantize(x, lower, upper, bits):
    """Quantize ``x`` onto ``2**bits`` uniform levels spanning ``[lower, upper]`` and dequantize it again.

    ``s = (upper - lower) / (2**bits - 1)``, ``q(x) = s * round((clip(x, lower, upper) - lower) / s) + lower``.
    Rounding uses the straight-through estimator, so ``x`` gets gradient 1 inside the range and the bounds get
    the LSQ-style gradient of the rounding error.

    Args:
        x (Tensor): Any shape.
        lower (Tensor): Lower bound, broadcastable to ``x``.
        upper (Tensor): Upper bound, broadcastable to ``x``; must be > ``lower``.
        bits (int): 2 to 8.

    Returns:
        Tensor: Same shape and dtype as ``x``, with at most ``2**bits`` distinct values per range.
    """
    lower = lower.to(x.dtype)
    upper = upper.to(x.dtype)
    step = (upper - lower) / (2**bits - 1)
    return round_ste((clip_to_range(x, lower, upper) - lower) / step) * step + lower
