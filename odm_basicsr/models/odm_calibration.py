"""ODMModel's calibration before training: batches from the training set, distribution offsets, activation ranges.

:func:`calibrate_for_training` runs once, before the first step (and before DDP wraps the network, since offsets add
parameters); a network whose quantizers are calibrated already (a resumed run, a calibrated checkpoint) is left
as it is. The work itself is the quantization core's (``odm_basicsr.quant``): channel statistics of the FP network
and ``add_offsets`` (score, select, attach) when ``network_g.offsets`` is set, then ``calibrate`` (``fp`` or
``sequential``). A range that comes out non-finite or empty is an :class:`OptionError` (exit status 2 from
``odm-train``) naming the layer.
"""
from copy import deepcopy

import torch
from torch.utils.data import DataLoader

from odm_basicsr.quant import (
    CalibrationError,
    add_auto_output_quantizers,
    add_offsets,
    all_initialized,
    calibrate,
    calibration,
    channel_statistics,
    offset_report,
    quantized_layers,
)
from odm_basicsr.utils.schema import OptionError


def training_batches(opt, device, n):
    """``n`` LQ batches of the training set ``opt['datasets']['train']`` (shuffled with ``manual_seed + rank``, no
    loader workers), on ``device``; the set is cycled when it has fewer batches."""
    from basicsr.data import build_dataset

    dataset_opt = deepcopy(opt['datasets']['train'])
    dataset = build_dataset(dataset_opt)
    if len(dataset) == 0:
        raise ValueError('ODM calibration: the training dataset is empty')
    generator = torch.Generator().manual_seed(int(opt.get('manual_seed') or 0) + opt.get('rank', 0))
    loader = DataLoader(dataset, batch_size=dataset_opt.get('batch_size_per_gpu', 1), shuffle=True, num_workers=0,
                        generator=generator, drop_last=False)
    batches = []
    while len(batches) < n:
        for data in loader:
            batches.append(data['lq'].to(device))
            if len(batches) == n:
                break
    return batches


@torch.no_grad()
def calibrate_for_training(net, opt, device, logger, batches=8, mode='fp'):
    """Attach the distribution offsets ``net.quant_config['offsets']`` asks for and set every activation range.

    Args:
        net (nn.Module): The quantized network (not wrapped); its train/eval mode is kept.
        opt (dict): The options (``datasets.train``, ``manual_seed``, ``rank``).
        device (torch.device): Where the batches go.
        logger (logging.Logger): Receives the mismatch scores, the offsets and a summary.
        batches (int): Training batches to use (``train.calibration.batches``). Default: 8.
        mode (str): ``'fp'`` or ``'sequential'`` (``train.calibration.mode``). Default: 'fp'.

    Raises:
        OptionError: A calibrated range is not finite or not ordered.
    """
    if all_initialized(net):
        logger.info('ODM calibration skipped: the loaded network carries calibrated quantizers.')
        return
    lq = training_batches(opt, device, batches)
    was_training = net.training
    net.eval()
    offsets = (getattr(net, 'quant_config', None) or {}).get('offsets')
    if offsets:
        with calibration(net), channel_statistics(net) as stats:  # the FP network's channel statistics
            for x in lq:
                net(x)
        selection, scores = add_offsets(net, stats, **offsets)
        logger.info('Distribution mismatch (shift / scale) and offsets:\n' + '\n'.join(
            f'  {name:40s} {s["shift"]:.3f} / {s["scale"]:.3f}  {selection.get(name, "-")}'
            for name, s in scores.items()))
        for row in offset_report(net):
            logger.info(f'  offset {row}')
        added = add_auto_output_quantizers(net)  # the offsets' float input side: see the function
        if added:
            logger.info(f'output_quant auto: output quantizers for the layers that now feed an offset: {added}')
    try:
        calibrate(net, lq, mode)
    except CalibrationError as e:
        raise OptionError(str(e)) from e
    net.train(was_training)
    logger.info(f'ODM calibration ({mode}): activation ranges of {len(quantized_layers(net))} layers from '
                f'{batches} batches.')
