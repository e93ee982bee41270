"""Calibrate the activation ranges of a quantized network from data (METHOD.md section 3).

Two modes:

- ``fp`` (default): every range comes from one forward pass of the **full-precision** network: weights and
  activations unquantized, as METHOD.md prescribes. Running the network with quantized weights but pass-through
  activations (a network that never exists in training) lets the weight error compound from layer to layer with
  nothing to clip it: on a trained RLFN at W2 the ranges grew to 1e4 and then NaN.
- ``sequential``: layer after layer in forward order, each range from the input that the already-quantized
  (weights and activations) earlier layers give it. One partial forward pass per layer and batch. Output
  quantizers (``out_quant``) are set last, in one forward pass of the network with every input quantized.

After either mode :func:`check_ranges` refuses a non-finite or empty range with a message naming the layer.
"""
from contextlib import contextmanager

import torch

from .quantizers import ActQuantizer, WeightQuantizer

CALIBRATION_MODES = ('fp', 'sequential')


class CalibrationError(ValueError):
    """A calibrated activation range is not finite or not ordered."""


def act_quantizers(model):
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


def weight_quantizers(model):
    return [m for m in model.modules() if isinstance(m, WeightQuantizer)]


def check_mode(mode):
    if mode not in CALIBRATION_MODES:
        raise ValueError(f'calibration mode must be one of {list(CALIBRATION_MODES)}, got {mode!r}')
    return mode


@contextmanager
def weights_unquantized(model):
    """Inside the block every weight quantizer passes its weight through (FP weights)."""
    quantizers = weight_quantizers(model)
    previous = [q.enabled for q in quantizers]
    for q in quantizers:
        q.enabled = False
    try:
        yield model
    finally:
        for q, p in zip(quantizers, previous):
            q.enabled = p


@contextmanager
def calibration(model):
    """FP calibration as a context: inside the block the network runs in full precision (weight quantizers and
    activation quantizers pass through) and every activation quantizer records its input's range statistic; on
    exit each range is set to the mean over the recorded batches (and over ranks, under ``torch.distributed``).
    Forward passes inside the block run without gradients. Call :func:`check_ranges` afterwards.

    Example:
        >>> with calibration(net):
        ...     for lq in batches:
        ...         net(lq)
    """
    quantizers = act_quantizers(model)
    for q in quantizers:
        q.start_calibration()
    try:
        with torch.no_grad(), weights_unquantized(model):
            yield model
    finally:
        for q in quantizers:
            q.finish_calibration()


class _StopForward(Exception):
    pass


def _record_and_stop(layer, args):
    x = args[0] if layer.offset is None else layer.offset.normalize(args[0], layer.channel_dim)
    layer.act_quant(x)  # calibrating: records the range statistic
    raise _StopForward


def _layers_in_call_order(model, first_batch):
    """Quantized layers that own an activation quantizer, in the order of their first call in a forward pass."""
    owners = {id(m.act_quant): (name, m) for name, m in model.named_modules()
              if isinstance(getattr(m, 'act_quant', None), ActQuantizer)}
    order, handles = [], []

    def hook(module, args):
        key = id(module.act_quant)
        if key not in {id(m.act_quant) for _, m in order}:
            order.append(owners[key])

    for _, m in owners.values():
        handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad(), weights_unquantized(model), passthrough(model):
            model(first_batch)
    finally:
        for h in handles:
            h.remove()
    return order


@contextmanager
def passthrough(model):
    """Inside the block every activation quantizer passes its input through; ranges stay as they are."""
    quantizers = act_quantizers(model)
    for q in quantizers:
        q.start_calibration()
    try:
        yield
    finally:
        for q in quantizers:
            q.calibrating = False
            q._calib_stats = []


def calibrate(model, batches, mode='fp'):
    """Set every activation range of ``model`` from ``batches`` and check the result.

    Args:
        model (nn.Module): Network with quantized layers; its train/eval mode is kept.
        batches (list[Tensor]): Network inputs (e.g. LQ training patches), on the model's device.
        mode (str): ``'fp'`` or ``'sequential'`` (see the module docstring). Default: 'fp'.

    Raises:
        CalibrationError: A range is not finite or not ordered (see :func:`check_ranges`).
    """
    check_mode(mode)
    if not batches:
        raise ValueError('calibration needs at least one batch')
    if mode == 'fp':
        with calibration(model):
            for x in batches:
                model(x)
        check_ranges(model, mode)
        return
    outputs = [m.out_quant for _, m in model.named_modules() if isinstance(getattr(m, 'out_quant', None), ActQuantizer)]
    order = _layers_in_call_order(model, batches[0])
    for q in outputs:  # pass through while the inputs are calibrated
        q.start_calibration()
    try:
        for _, layer in order:
            # The earlier layers are calibrated and quantize (weights and activations); this layer records the
            # input they give it and the forward pass stops there, so the later, uncalibrated layers never run.
            handle = layer.register_forward_pre_hook(_record_and_stop)
            layer.act_quant.start_calibration()
            try:
                with torch.no_grad():
                    for x in batches:
                        try:
                            model(x)
                        except _StopForward:
                            pass
            finally:
                handle.remove()
                layer.act_quant.finish_calibration()
        for q in outputs:  # forget what they saw so far: their ranges come from the quantized network
            q.start_calibration()
        if outputs:
            with torch.no_grad():
                for x in batches:
                    model(x)
    finally:
        for q in outputs:
            q.finish_calibration()
    check_ranges(model, mode)


def check_ranges(model, mode='fp'):
    """Raise :class:`CalibrationError` if any activation range of ``model`` is non-finite or not ordered.

    The message names the layer, its statistic and bit width, the range, and the likely cause.
    """
    owners = {id(m.act_quant): name for name, m in model.named_modules()
              if isinstance(getattr(m, 'act_quant', None), ActQuantizer)}
    owners.update({id(m.out_quant): f'{name} (output)' for name, m in model.named_modules()
                   if isinstance(getattr(m, 'out_quant', None), ActQuantizer)})
    for q in act_quantizers(model):
        if not bool(q.initialized):
            continue
        lower, upper = float(q.lower.detach()), float(q.upper.detach())
        if torch.isfinite(torch.tensor([lower, upper])).all() and lower < upper:
            continue
        name = owners.get(id(q), '<unnamed>')
        cause = ('the FP network itself produces non-finite values on the calibration batches: check the '
                 'checkpoint (the right network and weights?) and the input range (0-1 images for BasicSR archs)')
        if mode == 'sequential':
            cause = ('the earlier quantized layers blow up this input; "train.calibration.mode: fp" calibrates '
                     'on the FP network, or ' + cause)
        raise CalibrationError(f'calibration ({mode}) gave layer {name!r} the range [{lower:.6g}, {upper:.6g}] '
                               f'(a_bits={q.bits}, statistic {q.init!r}): not a finite, ordered range. '
                               f'Likely cause: {cause}.')


def all_initialized(model):
    """True when every activation quantizer of ``model`` has a range (from calibration or from data)."""
    return all(bool(q.initialized) for q in act_quantizers(model))
