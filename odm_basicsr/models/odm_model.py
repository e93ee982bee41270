"""ODMModel: quantization-aware SR training with the ODM regularisers (METHOD.md sections 2 and 4).

Orchestration only: the options are declared and checked in :data:`odm_basicsr.option_schema.ODM_TRAIN`, the
calibration before training is :mod:`odm_basicsr.models.odm_calibration`, the quantized layers' inputs are recorded
by :class:`odm_basicsr.odm.feature_recorder.FeatureRecorder`, the cooperation rules are
:mod:`odm_basicsr.odm.cooperation`, and the per-layer log is :mod:`odm_basicsr.models.layer_log`.
"""
from collections import OrderedDict
from copy import deepcopy

import torch
from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.models.base_model import BaseModel
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY

from odm_basicsr.archs.arch_util import pad_to_window
from odm_basicsr.models.layer_log import LayerLog
from odm_basicsr.models.odm_calibration import calibrate_for_training
from odm_basicsr.models.quant_sr_model import QuantSRModel
from odm_basicsr.odm.cooperation import all_reduce_mean_, coop_agree, cosine_combine, gate_param_grads, gate_stats
from odm_basicsr.odm.feature_recorder import FeatureRecorder
from odm_basicsr.option_schema import ODM_TRAIN
from odm_basicsr.quant import quantized_layers, quantizer_state_keys
from odm_basicsr.utils.schema import OptionError

AMP_DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16}


@MODEL_REGISTRY.register()
class ODMModel(QuantSRModel):
    """QuantSRModel with calibration, separate quantizer learning rate and the gradient-cooperative regulariser.

    Its ``train`` options (``cooperation``, ``reg_opt``, ``quant_lr_mult``, ``calibration``, ``log_layer_freq``,
    ``amp``, ``max_nonfinite_steps``) are declared in :data:`odm_basicsr.option_schema.ODM_TRAIN`, which
    ``odm-train`` checks before any folder is made; the validated values, defaults filled in, are
    ``self.train_options``. Distribution offsets are options of the ``Quantized`` arch (``network_g.offsets``); this
    model attaches them during calibration.

    Logged: ``l_pix``; ``l_reg`` (the regulariser; ``l_var`` before the rename); ``coop``, the share of the
    regulariser's gradient that is applied (L1), in every mode; ``agree`` (sign-gate modes); ``cos`` and
    ``cos_weight`` = ``(cos + 1) / 2`` (``cosine``, where ``coop`` equals ``cos_weight``).
    """

    option_schema = ODM_TRAIN  # odm_basicsr.utils.option_check validates the train section with it

    def __init__(self, opt):  # noqa: D107  (SRModel's, with calibration before the DDP wrap)
        BaseModel.__init__(self, opt)
        net = build_network(opt['network_g']).to(self.device)
        load_path = self.opt['path'].get('pretrain_network_g')
        if load_path is not None:
            param_key = self.opt['path'].get('param_key_g', 'params')
            self.load_network(net, load_path, self.opt['path'].get('strict_load_g', True), param_key)
        self.layers = quantized_layers(net)
        if not self.layers:
            raise OptionError('ODMModel needs quantized layers: use network_g.type: Quantized')
        if self.is_train:
            notices = []
            self.train_options = ODM_TRAIN.validate(self.opt['train'], where='train', notices=notices)
            logger = get_root_logger()
            for notice in notices:  # once per run: here, where the run's log file exists
                logger.warning(notice)
            # offsets add parameters: before DDP wraps the network
            calibrate_for_training(net, self.opt, self.device, logger, **self.train_options['calibration'])
        self.net_g = self.model_to_device(net)
        self.print_network(self.net_g)
        if self.is_train:
            self.init_training_settings()

    # ------------------------------------------------------------------ training settings
    def init_training_settings(self):
        train = self.train_options
        self.cooperation = train['cooperation']
        self.cri_reg = build_loss(train['reg_opt']).to(self.device) if self.cooperation != 'off' else None
        self.log_layer_freq = train['log_layer_freq']
        amp = train['amp']
        if amp is True:
            amp = 'float16' if self.device.type == 'cuda' else 'bfloat16'
        self.amp_dtype = AMP_DTYPES.get(amp) if amp else None
        # bfloat16 has float32's exponent range: only float16 gradients need loss scaling
        self.grad_scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.print_freq = (self.opt.get('logger') or {}).get('print_freq', 100)
        self.max_nonfinite_steps = train['max_nonfinite_steps']
        self.nonfinite_steps, self._nonfinite_run = 0, []
        self.layers = quantized_layers(self.get_bare_model(self.net_g))
        self.recorder = FeatureRecorder(self.layers, self.cri_reg, self.cooperation)
        self.layer_log = LayerLog(self.opt, self.layers)
        super().init_training_settings()

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
            groups.append({'params': quant, 'lr': lr * self.train_options['quant_lr_mult'], 'weight_decay': 0.0})
        self.optimizer_g = self.get_optimizer(optim_type, groups, lr, **optim_opt)
        self.optimizers.append(self.optimizer_g)

    def training_state(self, epoch, current_iter):
        """The training state, plus the float16 gradient scaler's state (``train.amp: float16``)."""
        state = super().training_state(epoch, current_iter)
        if self.grad_scaler.is_enabled():
            state['grad_scaler'] = self.grad_scaler.state_dict()
        return state

    def resume_training(self, resume_state):
        super().resume_training(resume_state)
        if self.grad_scaler.is_enabled() and 'grad_scaler' in resume_state:
            self.grad_scaler.load_state_dict(resume_state['grad_scaler'])

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
        loss_scale = self.grad_scaler.get_scale() if self.grad_scaler.is_enabled() else 1.0
        log_step = current_iter % self.print_freq == 0 or current_iter % self.log_layer_freq == 0 or current_iter == 1
        with self.recorder.recording(log_step, loss_scale), torch.autocast(
                self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            self.output = self.net_g(self.lq)
        self.output = self.output.float()
        loss_dict = OrderedDict()
        l_pix = self.cri_pix(self.output, self.gt)
        loss_dict['l_pix'] = l_pix
        mode = self.cooperation
        l_reg = None
        try:
            clip_grads = self._reconstruction_only_clip_grads(l_pix)
            if mode == 'off':
                self._backward(l_pix)
            elif mode == 'feature':  # the regulariser acts in the gate; its value and coop only on logged steps
                if log_step:
                    with torch.no_grad():
                        l_reg = self.recorder.regulariser_loss()
                self._backward(l_pix)
                counts = list(self.recorder.coop_counts().values())
                if log_step and counts:
                    loss_dict['coop'], loss_dict['agree'] = coop_agree(torch.stack(counts).sum(0))
            else:
                l_reg = self.recorder.regulariser_loss()
                if mode == 'naive':
                    self._backward(l_pix + l_reg)
                    loss_dict['coop'] = torch.ones(())
                else:
                    self._cooperate_params(l_pix, l_reg, loss_dict)
            if l_reg is not None:
                loss_dict['l_reg'] = l_reg.detach()
        finally:
            self.recorder.finish()
        for p, g in clip_grads:  # the 2024 clip factors learn from the reconstruction loss only
            p.grad = g
        if self._step_is_finite(l_pix if l_reg is None or mode == 'feature' else l_pix + l_reg, current_iter):
            self.grad_scaler.step(self.optimizer_g)  # unscales; skips the step if a float16 gradient overflowed
            self.grad_scaler.update()
            if self.ema_decay > 0:
                self.model_ema(decay=self.ema_decay)
        else:
            self.optimizer_g.zero_grad(set_to_none=True)
        self.log_dict = self.reduce_loss_dict(loss_dict)
        if current_iter % self.log_layer_freq == 0:
            self.layer_log(get_root_logger(), current_iter, self.recorder.coop_counts())
        self.recorder.clear_counts()

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
        self.recorder.gate.enabled = False
        try:
            grads = torch.autograd.grad(self.grad_scaler.scale(l_pix), gammas, retain_graph=True, allow_unused=True)
        finally:
            self.recorder.gate.enabled = True
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

    def _cooperate_params(self, l_pix, l_reg, loss_dict):
        """``param`` / ``cosine``: two gradients per parameter, averaged over ranks before they are compared."""
        params = [p for g in self.optimizer_g.param_groups for p in g['params'] if p.requires_grad]
        grads_v = list(torch.autograd.grad(self.grad_scaler.scale(l_reg), params, retain_graph=True,
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
            loss_dict['coop'] = weight  # w * g_v is applied: its L1 share is w
            loss_dict['cos'], loss_dict['cos_weight'] = cosine, weight
        for p, g in zip(params, combined):
            p.grad = g
