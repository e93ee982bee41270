"""Calibrate activation ranges of a quantized network from data."""
from contextlib import contextmanager

import torch

from .quantizers import ActQuantizer


def act_quantizers(model):
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


@contextmanager
def calibration(model):
    """Inside the block every activation quantizer passes its input through unquantized and records range
    statistics; on exit each range is set to the mean over the recorded batches (and over ranks, under
    ``torch.distributed``). Forward passes inside the block run without gradients.

    Example:
        >>> with calibration(net):
        ...     for lq in batches:
        ...         net(lq)
    """
    quantizers = act_quantizers(model)
    for q in quantizers:
        q.start_calibration()
    try:
        with torch.no_grad():
            yield model
    finally:
        for q in quantizers:
            q.finish_calibration()


def all_initialized(model):
    """True when every activation quantizer of ``model`` has a range (from calibration or from data)."""
    return all(bool(q.initialized) for q in act_quantizers(model))
