"""ODMModel: quantization-aware SR training with the ODM regularisers (METHOD.md sections 2 and 4)."""
import os
from collections import OrderedDict
from copy import deepcopy
from functools import partial

import torch
from basicsr.archs import build_network
from basicsr.data import build_dataset
from basicsr.losses import build_loss
from basicsr.models.base_model import BaseModel
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.registry import LOSS_REGISTRY, MODEL_REGISTRY
from torch.utils.data import DataLoader

from odm_basicsr.odm.cooperation import (
    COOPERATION_MODES,
    all_reduce_mean_,
    cooperative_feature,
    cosine_combine,
    gate_param_grads,
)
from odm_basicsr.quant import all_initialized, calibration, quantized_layers, quantizer_state_keys
from odm_basicsr.quant.layers import float32_under_autocast
from odm_basicsr.quant.offsets import (
    attach_offsets,
    channel_statistics,
    mismatch_scores,
    offset_report,
    select_offset_layers,
)

DEFAULTS = {
    'cooperation': 'feature',
    'quant_lr_mult': 1.0,
    'calibration': {'batches': 8},
    'log_layer_freq': 500,
    'amp': False,
}
AMP_DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16}


def _option_error(message):
    from odm_basicsr.utils.option_check import OptionError
    return OptionError(message)


@MODEL_REGISTRY.register()
class ODMModel(SRModel):
    """SRModel with calibration, separate quantizer learning rate and the gradient-cooperative regulariser.

    Extra ``train`` options (defaults in brackets):

    * ``var_opt``: the regulariser, a registered loss with ``feature_grad`` (``FeatureVarianceLoss`` or
      ``MismatchLoss``); required unless ``cooperation: off``.
    * ``cooperation`` [feature]: ``feature`` | ``param`` | ``cosine`` | ``naive`` | ``off`` (METHOD.md 4.2).
    * ``quant_lr_mult`` [1.0]: learning rate of activation ranges, clip factors and offsets, times ``optim_g.lr``;
      their weight decay is 0.
    * ``calibration.batches`` [8]: training batches used once, before training, to set activation ranges (and
      the channel statistics that distribution offsets need). Skipped when the loaded network is calibrated
      already (resume, or a quantized checkpoint).
    * ``log_layer_freq`` [500]: every N iterations, log per-layer ranges and cooperation ratios.
    * ``amp`` [false]: mixed precision for the training forward pass: ``float16``, ``bfloat16``, or ``true``
      (float16 on CUDA, bfloat16 on CPU). float16 uses a gradient scaler (its state is saved with the training
      state). Fake quantization and the regulariser run in float32; validation runs in float32.

    Distribution offsets are options of the ``Quantized`` arch (``network_g.offsets``); this model attaches them
    during calibration.
    """

    extra_option_keys = {'train': ('var_opt', 'cooperation', 'quant_lr_mult', 'calibration', 'log_layer_freq',
                                   'amp')}

    @classmethod
    def check_options(cls, opt, is_train=True):
        """Validate the ODM options; raises OptionError naming the key."""
        train = opt.get('train') or {}
        if not is_train:
            return
        mode = train.get('cooperation', DEFAULTS['cooperation'])
        if mode not in COOPERATION_MODES:
            raise _option_error(f'option "train.cooperation": {mode!r} is not one of {list(COOPERATION_MODES)}')
        var_opt = train.get('var_opt')
        if mode != 'off':
            if not isinstance(var_opt, dict):
                raise _option_error(f'option "train.var_opt" is required with cooperation: {mode} '
                                    '(e.g. {type: FeatureVarianceLoss, loss_weight: !!float 1e-4})')
            loss_cls = LOSS_REGISTRY.get(var_opt.get('type')) if var_opt.get('type') in LOSS_REGISTRY else None
            if loss_cls is None or not hasattr(loss_cls, 'feature_grad'):
                raise _option_error(f'option "train.var_opt.type": {var_opt.get("type")!r} is not a feature '
                                    'regulariser (FeatureVarianceLoss or MismatchLoss)')
        mult = train.get('quant_lr_mult', DEFAULTS['quant_lr_mult'])
        if isinstance(mult, bool) or not isinstance(mult, (int, float)) or mult <= 0:
            raise _option_error(f'option "train.quant_lr_mult" must be a positive number, got {mult!r}')
        calib = train.get('calibration', {})
        if not isinstance(calib, dict) or set(calib) - {'batches'}:
            raise _option_error(f'option "train.calibration" accepts only "batches", got {calib!r}')
        batches = calib.get('batches', DEFAULTS['calibration']['batches'])
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
            raise _option_error(f'option "train.calibration.batches" must be an integer >= 1, got {batches!r}')
        freq = train.get('log_layer_freq', DEFAULTS['log_layer_freq'])
        if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
            raise _option_error(f'option "train.log_layer_freq" must be an integer >= 1, got {freq!r}')
        amp = train.get('amp', DEFAULTS['amp'])
        if not (isinstance(amp, bool) or amp is None or amp in AMP_DTYPES):
            raise _option_error(f'option "train.amp" must be true, false, float16 or bfloat16, got {amp!r}')

    def __init__(self, opt):  # noqa: D107  (SRModel's, with calibration before the DDP wrap)
        BaseModel.__init__(self, opt)
        net = build_network(opt['network_g']).to(self.device)
        load_path = self.opt['path'].get('pretrain_network_g')
        if load_path is not None:
            param_key = self.opt['path'].get('param_key_g', 'params')
            self.load_network(net, load_path, self.opt['path'].get('strict_load_g', True), param_key)
        self.layers = quantized_layers(net)
        if not self.layers:
            raise _option_error('ODMModel needs quantized layers: use network_g.type: Quantized')
        if self.is_train:
            self.check_options(opt)
            self.calibrate(net)  # offsets add parameters: before DDP wraps the network
        self.net_g = self.model_to_device(net)
        self.print_network(self.net_g)
        if self.is_train:
            self.init_training_settings()

    # ------------------------------------------------------------------ calibration
    def _calibration_batches(self, n):
        dataset_opt = deepcopy(self.opt['datasets']['train'])
        dataset = build_dataset(dataset_opt)
        generator = torch.Generator().manual_seed(int(self.opt.get('manual_seed') or 0) + self.opt.get('rank', 0))
        loader = DataLoader(dataset, batch_size=dataset_opt.get('batch_size_per_gpu', 1), shuffle=True,
                            num_workers=0, generator=generator, drop_last=False)
        if len(dataset) == 0:
            raise ValueError('ODM calibration: the training dataset is empty')
        batches = []
        while len(batches) < n:
            for data in loader:
                batches.append(data['lq'].to(self.device))
                if len(batches) == n:
                    break
        return batches

    @torch.no_grad()
    def calibrate(self, net):
        """Set activation ranges (and attach distribution offsets) from training batches, once."""
        logger = get_root_logger()
        if all_initialized(net):
            logger.info('ODM calibration skipped: the loaded network carries calibrated quantizers.')
            return
        n = self.opt['train'].get('calibration', {}).get('batches', DEFAULTS['calibration']['batches'])
        batches = self._calibration_batches(n)
        was_training = net.training
        net.eval()
        offsets_opt = (getattr(net, 'quant_config', None) or {}).get('offsets')
        if offsets_opt:
            with calibration(net), channel_statistics(net) as stats:
                for lq in batches:
                    net(lq)
            scores = mismatch_scores(stats)
            selection = select_offset_layers(scores, **offsets_opt)
            attach_offsets(net, selection, stats)
            logger.info('Distribution mismatch (shift / scale) and offsets:\n' + '\n'.join(
                f'  {name:40s} {s["shift"]:.3f} / {s["scale"]:.3f}  {selection.get(name, "-")}'
                for name, s in scores.items()))
            for row in offset_report(net):
                logger.info(f'  offset {row}')
        with calibration(net):
            for lq in batches:
                net(lq)
        net.train(was_training)
        logger.info(f'ODM calibration: activation ranges of {len(quantized_layers(net))} layers from {n} batches.')

    # ------------------------------------------------------------------ training settings
    def init_training_settings(self):
        train_opt = self.opt['train']
        self.cooperation = train_opt.get('cooperation', DEFAULTS['cooperation'])
        self.cri_var = build_loss(train_opt['var_opt']).to(self.device) if self.cooperation != 'off' else None
        self.log_layer_freq = train_opt.get('log_layer_freq', DEFAULTS['log_layer_freq'])
        amp = train_opt.get('amp', DEFAULTS['amp'])
        if amp is True:
            amp = 'float16' if self.device.type == 'cuda' else 'bfloat16'
        self.amp_dtype = AMP_DTYPES.get(amp) if amp else None
        # bfloat16 has float32's exponent range: only float16 gradients need loss scaling
        self.grad_scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.print_freq = (self.opt.get('logger') or {}).get('print_freq', 100)
        self._log_this_step, self._loss_scale = False, 1.0
        self._features, self._coop_records, self._recording = [], {}, False
        bare = self.get_bare_model(self.net_g)
        self.layers = quantized_layers(bare)
        self._hooks = [m.register_forward_pre_hook(self._make_hook(name)) for name, m in self.layers]
        super().init_training_settings()

    def _make_hook(self, name):
        def hook(module, args):
            if not self._recording:
                return None
            x = float32_under_autocast(args[0])  # the regulariser and its gradient in float32
            target = module.quantize_input(x).detach() if self._needs_targets else None
            if self.cooperation != 'feature' or self._log_this_step:  # feature mode needs them only to log l_var
                self._features.append((name, x, target))
            if self.cooperation == 'feature':
                record = self._coop_records.setdefault(name, []) if self._log_this_step else None
                grad_fn = partial(self.cri_var.feature_grad, target=target)
                if self._loss_scale != 1.0:  # g_r arrives multiplied by the loss scale: so must g_v
                    grad_fn = partial(_scaled, grad_fn, self._loss_scale)
                return (cooperative_feature(x, grad_fn, record),) + tuple(args[1:])
            return None
        return hook

    @property
    def _needs_targets(self):
        return getattr(self.cri_var, 'requires_targets', False)

    def setup_optimizers(self):
        """Two parameter groups: network weights at ``lr``; quantizer ranges and offsets at
        ``lr * quant_lr_mult`` with weight decay 0."""
        train_opt = self.opt['train']
        optim_opt = deepcopy(train_opt['optim_g'])
        optim_type = optim_opt.pop('type')
        lr = optim_opt.pop('lr')
        bare = self.get_bare_model(self.net_g)
        quant_keys = set(quantizer_state_keys(bare))
        weights, quant = [], []
        for name, p in bare.named_parameters():
            if p.requires_grad:
                (quant if name in quant_keys else weights).append(p)
        groups = [{'params': weights}]
        if quant:
            mult = train_opt.get('quant_lr_mult', DEFAULTS['quant_lr_mult'])
            groups.append({'params': quant, 'lr': lr * mult, 'weight_decay': 0.0})
        self.optimizer_g = self.get_optimizer(optim_type, groups, lr, **optim_opt)
        self.optimizers.append(self.optimizer_g)

    def test(self):
        """SRModel's test, padding the input to a multiple of the window size for windowed archs (SwinIR)."""
        net_opt = self.opt['network_g']
        window = (net_opt.get('arch') or net_opt).get('window_size') if isinstance(net_opt, dict) else None
        _, _, h, w = self.lq.shape
        if not window or (h % window == 0 and w % window == 0):
            return super().test()
        lq, scale = self.lq, self.opt.get('scale', 1)
        pad_h, pad_w = (window - h % window) % window, (window - w % window) % window
        mode = 'reflect' if pad_h < h and pad_w < w else 'replicate'
        self.lq = torch.nn.functional.pad(lq, (0, pad_w, 0, pad_h), mode=mode)
        try:
            super().test()
        finally:
            self.lq = lq
        self.output = self.output[:, :, :h * scale, :w * scale]

    # ------------------------------------------------------------------ one step
    def _backward(self, loss):
        self.grad_scaler.scale(loss).backward()

    def optimize_parameters(self, current_iter):
        self.optimizer_g.zero_grad(set_to_none=True)
        self._loss_scale = self.grad_scaler.get_scale() if self.grad_scaler.is_enabled() else 1.0
        self._features = []
        self._log_this_step = (current_iter % self.print_freq == 0 or current_iter % self.log_layer_freq == 0
                               or current_iter == 1)
        self._recording = self.cri_var is not None
        try:
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                self.output = self.net_g(self.lq)
        finally:
            self._recording = False
        self.output = self.output.float()
        loss_dict = OrderedDict()
        l_pix = self.cri_pix(self.output, self.gt)
        loss_dict['l_pix'] = l_pix
        mode = self.cooperation
        if mode == 'off':
            self._backward(l_pix)
        else:
            feats = [x for _, x, _ in self._features]
            targets = [t for _, _, t in self._features] if self._needs_targets else None
            if mode == 'feature':  # l_var and coop are only needed for logging: computed on logged steps
                l_var = None
                if self._log_this_step:
                    with torch.no_grad():
                        l_var = self.cri_var([f.detach() for f in feats], targets)
                self._backward(l_pix)
                if self._log_this_step:
                    loss_dict['coop'] = torch.stack([rec[-1] for rec in self._coop_records.values()]).mean()
            else:
                l_var = self.cri_var(feats, targets)
                if mode == 'naive':
                    self._backward(l_pix + l_var)
                else:
                    self._cooperate_params(l_pix, l_var, loss_dict)
            if l_var is not None:
                loss_dict['l_var'] = l_var.detach()
        self.grad_scaler.step(self.optimizer_g)  # unscales; skips the step if a float16 gradient overflowed
        self.grad_scaler.update()
        self._features = []
        self.log_dict = self.reduce_loss_dict(loss_dict)
        if current_iter % self.log_layer_freq == 0:
            self._log_layers(current_iter)
        for rec in self._coop_records.values():
            rec.clear()
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)

    def _cooperate_params(self, l_pix, l_var, loss_dict):
        """``param`` / ``cosine``: two gradients per parameter, averaged over ranks before they are compared."""
        params = [p for g in self.optimizer_g.param_groups for p in g['params'] if p.requires_grad]
        grads_v = list(torch.autograd.grad(self.grad_scaler.scale(l_var), params, retain_graph=True,
                                           allow_unused=True))
        # the 2024 version trains the weight clipping factors by the reconstruction loss only
        clip_factors = {id(m.weight_quant.gamma) for _, m in self.layers
                        if m.weight_quant is not None and m.weight_quant.clip_correction}
        grads_v = [None if id(p) in clip_factors else g for p, g in zip(params, grads_v)]
        all_reduce_mean_([g for g in grads_v if g is not None])
        self._backward(l_pix)  # DDP averages this one; both gradients carry the same loss scale
        grads_r = [p.grad for p in params]
        if self.cooperation == 'param':
            combined, agree = gate_param_grads(grads_r, grads_v)
            loss_dict['coop'] = agree
        else:
            combined, weight, cosine = cosine_combine(grads_r, grads_v)
            loss_dict['coop'] = weight
            loss_dict['cos'] = cosine
        for p, g in zip(params, combined):
            p.grad = g

    def _log_layers(self, current_iter):
        """Per-layer activation ranges and cooperation ratios: to the log and to tensorboard (``layers/``)."""
        logger, tb = get_root_logger(), self._layer_tb_writer()
        lines = []
        for name, m in self.layers:
            q = m.act_quant
            rng = f'[{q.lower.item():8.3f}, {q.upper.item():8.3f}]' if q is not None else 'FP'
            rec = self._coop_records.get(name)
            coop = f'{float(rec[-1]):.3f}' if rec else '-'
            lines.append(f'  {name:40s} range {rng}  coop {coop}')
            if tb is not None:
                if q is not None:
                    tb.add_scalar(f'layers/{name}/lower', q.lower.item(), current_iter)
                    tb.add_scalar(f'layers/{name}/upper', q.upper.item(), current_iter)
                if rec:
                    tb.add_scalar(f'layers/{name}/coop', float(rec[-1]), current_iter)
        if tb is not None:
            tb.flush()
        logger.info(f'Iter {current_iter}: per-layer activation ranges and cooperation ratio\n' + '\n'.join(lines))

    def _layer_tb_writer(self):
        """A second event writer in BasicSR's ``tb_logger/<name>`` folder (rank 0, when tensorboard is on)."""
        logger_opt = self.opt.get('logger') or {}
        if (getattr(self, '_tb', None) is None and self.opt.get('rank', 0) == 0 and logger_opt.get('use_tb_logger')
                and 'debug' not in self.opt['name'] and 'root_path' in self.opt):
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=os.path.join(self.opt['root_path'], 'tb_logger', self.opt['name']))
        return getattr(self, '_tb', None)


def _scaled(grad_fn, scale, x):
    return grad_fn(x) * scale
