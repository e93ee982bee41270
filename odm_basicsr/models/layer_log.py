"""ODMModel's per-layer log (``train.log_layer_freq``): each quantized layer's activation range and ``coop``, to the
text log and to tensorboard (``layers/<name>/lower``, ``upper``, ``coop``).

BasicSR's own tensorboard writer lives inside its ``train_pipeline`` and is reached only through the message
logger, which prints every value it gets on the console line, at ``print_freq`` only; per-layer values (three per
layer) would flood that line. So the layer scalars go through a second writer in the same run folder
(``tb_logger/<name>``, made by BasicSR's ``init_tb_logger``), rank 0 only, when the run has tensorboard on.
"""
import os

from odm_basicsr.odm.cooperation import coop_agree


class LayerLog:
    """Log the quantized layers of one run.

    Args:
        opt (dict): The run's options (``logger.use_tb_logger``, ``name``, ``root_path``, ``rank``).
        layers (list[tuple[str, nn.Module]]): The quantized layers.
    """

    def __init__(self, opt, layers):
        self.opt, self.layers, self._writer = opt, layers, None

    def writer(self):
        """The tensorboard writer, made on first use; None when tensorboard is off (or not rank 0, or debug)."""
        logger_opt = self.opt.get('logger') or {}
        if (self._writer is None and self.opt.get('rank', 0) == 0 and logger_opt.get('use_tb_logger')
                and 'debug' not in self.opt['name'] and 'root_path' in self.opt):
            from basicsr.utils.logger import init_tb_logger
            self._writer = init_tb_logger(os.path.join(self.opt['root_path'], 'tb_logger', self.opt['name']))
        return self._writer

    def __call__(self, logger, current_iter, coop_counts):
        """Write one entry; ``coop_counts``: per layer name, the gate counts of the last backward pass."""
        tb = self.writer()
        lines = []
        for name, m in self.layers:
            q = m.act_quant
            rng = f'[{q.lower.item():8.3f}, {q.upper.item():8.3f}]' if q is not None else 'FP'
            coop = float(coop_agree(coop_counts[name])[0]) if name in coop_counts else None
            lines.append(f'  {name:40s} range {rng}  coop {"-" if coop is None else f"{coop:.3f}"}')
            if tb is not None:
                if q is not None:
                    tb.add_scalar(f'layers/{name}/lower', q.lower.item(), current_iter)
                    tb.add_scalar(f'layers/{name}/upper', q.upper.item(), current_iter)
                if coop is not None:
                    tb.add_scalar(f'layers/{name}/coop', coop, current_iter)
        if tb is not None:
            tb.flush()
        logger.info(f'Iter {current_iter}: per-layer activation ranges and cooperation ratio\n' + '\n'.join(lines))
