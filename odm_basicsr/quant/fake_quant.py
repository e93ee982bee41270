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


def aligned_grid(lower, upper, bits, include_zero=False):
    """Step and lowest integer code of the zero-aligned grid that replaces the range ``[lower, upper]``.

    The grid is ``step * (low + j)``, ``j = 0 .. 2**bits - 1``, with ``step = (upper - lower) / (2**bits - 1)`` and
    ``low = round(lower / step)``: the range moved by less than half a step so that 0 lies on the (extended) grid.
    That is what an integer kernel needs: the value a code stands for is ``step * (code - zero_point)`` with an
    integer zero point, and zero padding and ReLU's zeros are exact. ``round`` passes gradients straight through,
    so learnable bounds train as on the free grid.

    Args:
        lower (Tensor): Lower bound, 0-d (float32).
        upper (Tensor): Upper bound, 0-d, > ``lower``.
        bits (int): 2 to 8.
        include_zero (bool): Widen the range to contain 0 first (``low <= 0 <= low + 2**bits - 1``): an 8-bit grid
            stored as uint8 needs its zero point among its own codes. Default: False.

    Returns:
        tuple[Tensor, Tensor]: ``step`` (> 0) and ``low`` (an integer value held in a float tensor), both 0-d.
    """
    if include_zero:
        lower = torch.clamp(lower, max=0.0)
        upper = torch.clamp(upper, min=0.0)
    step = (upper - lower) / (2**bits - 1)
    return step, round_ste(lower / step)


def fake_quantize_aligned(x, lower, upper, bits, include_zero=False):
    """Fake quantization on the zero-aligned grid of :func:`aligned_grid`: ``step * clip(round(x / step), low,
    low + 2**bits - 1)``.

    This is exactly what ONNX ``QuantizeLinear`` (round half to even, integer zero point) followed by a clip of the
    codes and ``DequantizeLinear`` compute, so a network trained with it runs unchanged as integer kernels.
    Gradients: 1 for ``x`` inside the range, LSQ-style for the bounds (through ``step`` and the clipped codes).

    Args:
        x (Tensor): Any shape.
        lower, upper (Tensor): 0-d bounds, ``upper > lower``.
        bits (int): 2 to 8.
        include_zero (bool): See :func:`aligned_grid`. Default: False.

    Returns:
        Tensor: Same shape and dtype as ``x``, with at most ``2**bits`` distinct values.
    """
    step, low = aligned_grid(lower, upper, bits, include_zero)
    step, low = step.to(x.dtype), low.to(x.dtype)
    return clip_to_range(round_ste(x / step), low, low + (2**bits - 1)) * step
