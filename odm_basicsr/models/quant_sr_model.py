"""QuantSRModel: BasicSR's SRModel for networks with quantizers (``network_g.type: Quantized``).

What a quantized network needs from the model, and plain BasicSR does not do (so it lives here, in a plugin class,
not in a patch of BasicSR):

* **checkpoints are quantizer-aware**: an FP checkpoint loads into the quantized network (its quantizer and offset
  entries are expected to be missing and are initialised from data); any other missing, unexpected or mis-shaped
  key is an error naming the file and the keys; offsets a checkpoint carries are recreated before loading;
* **no NaN / Inf state is written or loaded**: a network, training state, pretrained network or resume state holding
  one is refused with :class:`~odm_basicsr.guards.NonFiniteError` (the file already there stays as it was);
* **the EMA copy follows the quantizers**: offsets attached after the EMA network was built appear in it, a quantizer
  initialised after that starts its average at its current value, and the Python mirrors of the quantizer and
  offset flags follow the copied buffers.

``ODMModel`` builds on it. BasicSR 1.4.2's own bugs (EMA ignores buffers, non-atomic saves, resume on CPU, exact
resume...) are fixed for every model in :mod:`odm_basicsr.compat`.
"""
import torch
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY

from odm_basicsr.checkpoint import load_weights
from odm_basicsr.guards import check_finite
from odm_basicsr.quant import ActQuantizer
from odm_basicsr.quant.offsets import DistributionOffset, ensure_offsets_like
from odm_basicsr.quant.output_quantizers import ensure_output_quantizers_like

_KEPT = 'nothing was written (a file already there is left as it was)'


@MODEL_REGISTRY.register()
class QuantSRModel(SRModel):
    """``SRModel`` with quantizer-aware checkpoints, NaN / Inf guards on every saved or loaded state, and an EMA
    network that follows quantizer and offset state (see the module docstring). Same options as ``SRModel``."""

    def load_network(self, net, load_path, strict=True, param_key='params'):
        """Load ``param_key`` of ``load_path`` into ``net``: quantizer entries an FP checkpoint lacks are expected;
        with ``strict`` any other missing, unexpected or differently shaped key is an error; NaN / Inf refused."""
        logger = get_root_logger()
        net = self.get_bare_model(net)
        loaded = load_weights(net, load_path, param_key, fallback=None if param_key is None else 'params',
                              strict=strict, finite='refusing to load it',
                              hint='Is it a checkpoint of another network? Set path.strict_load_g: false to load '
                                   'the matching part only.')
        key, fit = loaded.key, loaded.fit
        if key != param_key and key is not None:
            logger.info(f'Loading: {param_key} does not exist in {load_path}, use {key}.')
        for k, (own, theirs) in fit.shapes.items():
            logger.warning(f'Size different, ignore [{k}]: net {own}; ckpt {theirs}')
        if fit.missing or fit.unexpected:
            logger.warning(f'Loading {load_path} non-strictly: {len(fit.missing)} keys missing, '
                           f'{len(fit.unexpected)} unexpected: {(fit.missing + fit.unexpected)[:8]}')
        if fit.quantizer_missing:
            logger.info(f'{len(fit.quantizer_missing)} quantizer entries are not in {load_path} (an FP checkpoint): '
                        'the quantizers will be initialised from data.')
        logger.info(f'Loaded {type(net).__name__} from {load_path} [{key}].')

    def check_before_writing(self, state, path, what):
        """Refuse (nothing written) a network or training state holding a NaN / Inf value."""
        check_finite(state, f'not writing {path}: {what}', _KEPT)

    def resume_training(self, resume_state):
        """BasicSR's resume, refusing a training state that holds a NaN / Inf value."""
        path = (self.opt.get('path') or {}).get('resume_state') or 'the resume state'
        check_finite(resume_state, f'training state {path}', 'refusing to resume from it')
        super().resume_training(resume_state)

    def model_ema(self, decay=0.999):
        """The EMA of :mod:`odm_basicsr.compat` (parameters averaged, buffers copied), extended to quantizer state:
        offsets and output quantizers mirrored, quantizers initialised after the EMA copy start their average at
        their current value."""
        net_g = self.get_bare_model(self.net_g)
        source = dict(net_g.named_modules())
        fresh = [f'{name}.offset.' for name in ensure_offsets_like(self.net_g_ema, net_g)]
        fresh += [f'{name}.out_quant.' for name in ensure_output_quantizers_like(self.net_g_ema, net_g)]
        quantizers = [(name, q) for name, q in self.net_g_ema.named_modules() if isinstance(q, ActQuantizer)]
        # Python mirrors of the flags: no host sync per quantizer per EMA step
        fresh += [f'{name}.' for name, q in quantizers if not q.is_initialized and source[name].is_initialized]
        super().model_ema(decay)
        params = dict(net_g.named_parameters())
        with torch.no_grad():
            for k, p in self.net_g_ema.named_parameters():
                if k.startswith(tuple(fresh)):
                    p.copy_(params[k])
        for name, q in quantizers:  # the buffers were copied: their mirrors follow
            q.set_initialized(source[name].is_initialized)
        for name, offset in self.net_g_ema.named_modules():
            if isinstance(offset, DistributionOffset):
                offset.set_folded(source[name].is_folded)

