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

from odm_basicsr.archs.arch_util import pad_to_window
from odm_basicsr.odm.cooperation import (
    COOPERATION_MODES,
    FeatureGate,
    all_reduce_mean_,
    coop_agree,
    cosine_combine,
    gate_param_grads,
    gate_stats,
)
from odm_basicsr.quant import all_initialized, calibrate, calibration, quantized_layers, quantizer_state_keys
from odm_basicsr.quant.calibration import CALIBRATION_MODES, CalibrationError
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
    'calibration': {'batches': 8, 'mode': 'fp'},
    'log_layer_freq': 500,
    'amp': False,
    'max_nonfinite_steps': 10,
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
    * ``cooperation`` [feature]: ``feature`` | ``param`` | ``cosine`` | ``naive`` | ``off`` (METHOD.md 4.2); YAML's
      ``false`` (what an unquoted ``off`` reads as) means ``off``.
    * ``quant_lr_mult`` [1.0]: learning rate of activation ranges, clip factors and offsets, times ``optim_g.lr``;
      their weight decay is 0.
    * ``calibration.batches`` [8]: training batches used once, before training, to set activation ranges (and
      the channel statistics that distribution offsets need). Skipped when the loaded network is calibrated
      already (resume, or a quantized checkpoint).
    * ``calibration.mode`` [fp]: ``fp`` (ranges from the full-precision network) or ``sequential`` (layer by
      layer, from the input the already-quantized earlier layers give); see ``odm_basicsr.quant.calibration``.
    * ``max_nonfinite_steps`` [10]: a step whose loss or gradient is not finite is skipped (no update); this
      many in a row stop the run with :class:`~odm_basicsr.guards.TrainingDivergedError`. float16 steps that
      the gradient scaler skips do not count.
    * ``log_layer_freq`` [500]: every N iterations, log per-layer ranges and cooperation ratios.
    * ``amp`` [false]: mixed precision for the training forward pass: ``float16``, ``bfloat16``, or ``true``
      (float16 on CUDA, bfloat16 on CPU). float16 uses a gradient scaler (its state is saved with the training
      state). Fake quantization and the regulariser run in float32; validation runs in float32.

    Distribution offsets are options of the ``Quantized`` arch (``network_g.offsets``); this model attaches them
    during calibration.
    """

    extra_option_keys = {'train': ('var_opt', 'cooperation', 'quant_lr_mult', 'calibration', 'log_layer_freq',
                                   'amp', 'max_nonfinite_steps')}

    @classmethod
    def check_options(cls, opt, is_train=True):
        """Validate the ODM options; raises OptionError naming the key."""
        train = opt.get('train') or {}
        if not is_train:
            return
        mode = cooperation_mode(train)
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
        if not isinstance(calib, dict) or set(calib) - {'batches', 'mode'}:
            raise _option_error(f'option "train.calibration" accepts only "batches" and "mode", got {calib!r}')
        if calib.get('mode', 'fp') not in CALIBRATION_MODES:
            raise _option_error(f'option "train.calibration.mode": {calib["mode"]!r} is not one of '
                                f'{list(CALIBRATION_MODES)}')
        batches = calib.get('batches', DEFAULTS['calibration']['batches'])
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
            raise _option_error(f'option "train.calibration.batches" must be an integer >= 1, got {batches!r}')
        freq = train.get('log_layer_freq', DEFAULTS['log_layer_freq'])
        if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
            raise _option_error(f'option "train.log_layer_freq" must be an integer >= 1, got {freq!r}')
        amp = train.get('amp', DEFAULTS['amp'])
        if not (isinstance(amp, bool) or amp is None or amp in AMP_DTYPES):
            raise _option_error(f'option "train.amp" must be true, false, float16 or bfloat16, got {amp!r}')
        limit = train.get('max_nonfinite_steps', DEFAULTS['max_nonfinite_steps'])
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise _option_error(f'option "train.max_nonfinite_steps" must be an integer >= 1, got {limit!r}')

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
        calib_opt = {**DEFAULTS['calibration'], **(self.opt['train'].get('calibration') or {})}
        n, mode = calib_opt['batches'], calib_opt['mode']
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
        try:
            calibrate(net, batches, mode)
        except CalibrationError as e:
            raise _option_error(str(e)) from e
        net.train(was_training)
        logger.info(f'ODM calibration ({mode}): activation ranges of {len(quantized_layers(net))} layers from '
                    f'{n} batches.')

    # ------------------------------------------------------------------ training settings
    def init_training_settings(self):
        train_opt = self.opt['train']
        self.cooperation = cooperation_mode(train_opt)
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
        self._features, self._recording = [], False
        self._gate = FeatureGate(gate=True)
        self._coop_records = self._gate.stats
        self.max_nonfinite_steps = train_opt.get('max_nonfinite_steps', DEFAULTS['max_nonfinite_steps'])
        self.nonfinite_steps, self._nonfinite_run = 0, []
        bare = self.get_bare_model(self.net_g)
        self.layers = quantized_layers(bare)
        self._hooks = [m.register_forward_pre_hook(self._make_hook(name)) for name, m in self.layers]
        super().init_training_settings()

    def _make_hook(self, name):
        def hook(module, args):
            if not self._recording:
                return None
            x = float32_under_autocast(args[0])  # the regulariser and its gradient in float32
            # MismatchLoss's target: what the operation sees, in x's units (offsets included), held constant
            target = module.effective_input(x).detach() if self._needs_targets else None
            if self.cooperation != 'feature' or self._log_this_step:  # feature mode needs them only to log l_var
                self._features.append((name, x, target))
            if self.cooperation == 'feature':
                grad_fn = partial(self.cri_var.feature_grad, target=target)
                if self._loss_scale != 1.0:  # g_r arrives multiplied by the loss scale: so must g_v
                    grad_fn = partial(_scaled, grad_fn, self._loss_scale)
                # the hook sits on the layer input itself: it sees the total reconstruction gradient at X_i,
                # through this layer and through every skip or concat that also reads X_i
                self._gate.add(args[0], partial(_cast_like, grad_fn), name, record=self._log_this_step)
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
        self.lq = pad_to_window(lq, window)
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
        l_var = None
        try:
            clip_grads = self._reconstruction_only_clip_grads(l_pix)
            if mode == 'off':
                self._backward(l_pix)
            else:
                feats = [x for _, x, _ in self._features]
                targets = [t for _, _, t in self._features] if self._needs_targets else None
                if mode == 'feature':  # l_var and coop are only needed for logging: computed on logged steps
                    if self._log_this_step:
                        with torch.no_grad():
                            l_var = self.cri_var([f.detach() for f in feats], targets)
                    self._backward(l_pix)
                    records = [rec[-1] for rec in self._coop_records.values() if rec]
                    if self._log_this_step and records:
                        loss_dict['coop'], loss_dict['agree'] = coop_agree(torch.stack(records).sum(0))
                else:
                    l_var = self.cri_var(feats, targets)
                    if mode == 'naive':
                        self._backward(l_pix + l_var)
                        loss_dict['coop'] = torch.ones(())
                    else:
                        self._cooperate_params(l_pix, l_var, loss_dict)
                if l_var is not None:
                    loss_dict['l_var'] = l_var.detach()
        finally:
            self._gate.reset()
            self._features = []
        for p, g in clip_grads:  # the 2024 clip factors learn from the reconstruction loss only
            p.grad = g
        if self._step_is_finite(l_pix if l_var is None or mode == 'feature' else l_pix + l_var, current_iter):
            self.grad_scaler.step(self.optimizer_g)  # unscales; skips the step if a float16 gradient overflowed
            self.grad_scaler.update()
            if self.ema_decay > 0:
                self.model_ema(decay=self.ema_decay)
        else:
            self.optimizer_g.zero_grad(set_to_none=True)
        self.log_dict = self.reduce_loss_dict(loss_dict)
        if current_iter % self.log_layer_freq == 0:
            self._log_layers(current_iter)
        for rec in self._coop_records.values():
            rec.clear()

    def _clip_factors(self):
        return [m.weight_quant.gamma for _, m in self.layers
                if m.weight_quant is not None and m.weight_quant.clip_correction and m.weight_quant.gamma.requires_grad]

    def _reconstruction_only_clip_grads(self, l_pix):
        """``feature`` and ``naive`` modes mix the regulariser into every gradient upstream of a quantized input;
        METHOD.md 6 trains the clip factors by the reconstruction loss alone, so theirs is taken from a separate
        (hook-free) gradient of ``l_pix``. ``param`` / ``cosine`` drop their regulariser gradient directly."""
        gammas = self._clip_factors()
        if not gammas or self.cooperation not in ('feature', 'naive'):
            return []
        self._gate.enabled = False
        try:
            grads = torch.autograd.grad(self.grad_scaler.scale(l_pix), gammas, retain_graph=True, allow_unused=True)
        finally:
            self._gate.enabled = True
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(gammas, grads)]
        all_reduce_mean_(grads)
        return list(zip(gammas, grads))

    def _step_is_finite(self, loss, current_iter):
        """False (and counted, logged, and after ``max_nonfinite_steps`` in a row fatal) when the loss or, without
        a float16 gradient scaler (whose skipped steps are its own business), a gradient is not finite."""
        checks = [loss.detach().float().reshape(1)]
        if not self.grad_scaler.is_enabled():
            grads = [p.grad for g in self.optimizer_g.param_groups for p in g['params'] if p.grad is not None]
            if grads:
                checks.append(torch.stack(torch._foreach_norm(grads)).float().sum().reshape(1))
        if bool(torch.isfinite(torch.cat(checks)).all()):  # one host sync per step
            self._nonfinite_run = []
            return True
        self.nonfinite_steps += 1
        self._nonfinite_run.append(current_iter)
        get_root_logger().warning(
            f'Iter {current_iter}: non-finite loss or gradient, step skipped (no update); {len(self._nonfinite_run)} '
            f'in a row, {self.nonfinite_steps} in this run; the limit is train.max_nonfinite_steps = '
            f'{self.max_nonfinite_steps}.')
        if len(self._nonfinite_run) >= self.max_nonfinite_steps:
            from odm_basicsr.guards import TrainingDivergedError, last_checkpoint
            models_dir = (self.opt.get('path') or {}).get('models')
            last = last_checkpoint(models_dir) if models_dir else None
            raise TrainingDivergedError(
                f'training diverged at iteration {current_iter}: {len(self._nonfinite_run)} steps in a row '
                f'(iterations {self._nonfinite_run[0]} to {current_iter}) had a non-finite loss or gradient '
                f'(train.max_nonfinite_steps = {self.max_nonfinite_steps}); none of them updated the network. '
                f'Last good checkpoint: {last or "none saved in this run"}. Try a lower learning rate or '
                f'quant_lr_mult, check the calibrated ranges, and resume from that checkpoint.')
        return False

    def _cooperate_params(self, l_pix, l_var, loss_dict):
        """``param`` / ``cosine``: two gradients per parameter, averaged over ranks before they are compared."""
        params = [p for g in self.optimizer_g.param_groups for p in g['params'] if p.requires_grad]
        grads_v = list(torch.autograd.grad(self.grad_scaler.scale(l_var), params, retain_graph=True,
                                           allow_unused=True))
        # the 2024 version trains the weight clipping factors by the reconstruction loss only
        clip_factors = {id(p) for p in self._clip_factors()}
        grads_v = [None if id(p) in clip_factors else g for p, g in zip(params, grads_v)]
        all_reduce_mean_([g for g in grads_v if g is not None])
        self._backward(l_pix)  # DDP averages this one; both gradients carry the same loss scale
        grads_r = [p.grad for p in params]
        if self.cooperation == 'param':
            combined, agree = gate_param_grads(grads_r, grads_v)
            stats = [gate_stats(torch.zeros_like(v) if r is None else r, v) for r, v in zip(grads_r, grads_v)
                     if v is not None]
            if stats:
                loss_dict['coop'] = coop_agree(torch.stack(stats).sum(0))[0]
            loss_dict['agree'] = agree
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
            coop = f'{float(coop_agree(rec[-1])[0]):.3f}' if rec else '-'
            lines.append(f'  {name:40s} range {rng}  coop {coop}')
            if tb is not None:
                if q is not None:
                    tb.add_scalar(f'layers/{name}/lower', q.lower.item(), current_iter)
                    tb.add_scalar(f'layers/{name}/upper', q.upper.item(), current_iter)
                if rec:
                    tb.add_scalar(f'layers/{name}/coop', float(coop_agree(rec[-1])[0]), current_iter)
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


def _cast_like(grad_fn, x):
    """``grad_fn`` of ``x`` in float32 (the regulariser's precision), returned in ``x``'s dtype."""
    return grad_fn(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x).to(x.dtype)


def cooperation_mode(train_opt):
    """``train.cooperation``, with YAML's ``false`` (an unquoted ``off`` reads as a boolean) meaning ``off``."""
    mode = train_opt.get('cooperation', DEFAULTS['cooperation'])
    return 'off' if mode is False else mode
