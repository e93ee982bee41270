"""Record the inputs ``X_i`` of the quantized layers during a training forward pass and, in ``feature`` mode, mark
them for the sign gate (METHOD.md 4.4).

One forward pre-hook per quantized layer; it acts only inside :meth:`FeatureRecorder.recording`:

* ``param`` / ``cosine`` / ``naive`` modes: every ``X_i`` (in float32 under autocast) is kept for the
  regulariser's loss, with the ``MismatchLoss`` target ``q(X_i)`` when the regulariser needs one (what the layer
  effectively sees, offsets included, held constant);
* ``feature`` mode: ``X_i`` is marked on a :class:`~odm_basicsr.odm.cooperation.FeatureGate` with the regulariser's
  closed-form gradient (multiplied by the loss scale of a float16 gradient scaler, computed in float32 and returned
  in ``X_i``'s dtype); ``X_i`` is kept only on logged steps, where the regulariser's value is logged.

Plain PyTorch: no BasicSR import.
"""
from contextlib import contextmanager
from functools import partial

import torch

from odm_basicsr.odm.cooperation import FeatureGate
from odm_basicsr.quant.layers import float32_under_autocast


class FeatureRecorder:
    """The quantized layers' inputs of one training forward pass.

    Args:
        layers (list[tuple[str, nn.Module]]): The quantized layers (``quantized_layers(net)``).
        regulariser (nn.Module | None): The feature regulariser (``FeatureVarianceLoss`` / ``MismatchLoss``);
            None records nothing (``cooperation: off``).
        mode (str): The cooperation mode.

    Attributes:
        gate (FeatureGate): The ``feature``-mode gate; ``gate.stats`` holds the per-layer counts behind ``coop``.
        records (list[tuple[str, Tensor, Tensor | None]]): ``(layer name, X_i, target)`` of the current pass.
        loss_scale (float): The gradient scaler's scale during the current pass.
    """

    def __init__(self, layers, regulariser, mode):
        self.regulariser, self.mode = regulariser, mode
        self.gate = FeatureGate(gate=True)
        self.records, self.active, self.log_step, self.loss_scale = [], False, False, 1.0
        self._handles = [m.register_forward_pre_hook(partial(self._hook, name)) for name, m in layers]

    @property
    def needs_targets(self):
        return getattr(self.regulariser, 'requires_targets', False)

    @contextmanager
    def recording(self, log_step=False, loss_scale=1.0):
        """Record inside the block (one forward pass); ``log_step``: this step's values are logged."""
        self.records, self.log_step, self.loss_scale = [], log_step, loss_scale
        self.active = self.regulariser is not None
        try:
            yield self
        finally:
            self.active = False

    def _hook(self, name, module, args):
        if not self.active:
            return None
        x = float32_under_autocast(args[0])  # the regulariser and its gradient in float32
        # MismatchLoss's target: what the operation sees, in x's units (offsets included), held constant
        target = module.effective_input(x).detach() if self.needs_targets else None
        if self.mode != 'feature' or self.log_step:  # feature mode needs them only to log the regulariser
            self.records.append((name, x, target))
        if self.mode == 'feature':
            grad_fn = partial(self.regulariser.feature_grad, target=target)
            if self.loss_scale != 1.0:  # g_r arrives multiplied by the loss scale: so must g_v
                grad_fn = partial(_scaled, grad_fn, self.loss_scale)
            # the hook sits on the layer input itself: it sees the total reconstruction gradient at X_i,
            # through this layer and through every skip or concat that also reads X_i
            self.gate.add(args[0], partial(_cast_like, grad_fn), name, record=self.log_step)
        return None

    def regulariser_loss(self):
        """The regulariser's value on the recorded inputs (differentiable)."""
        targets = [t for _, _, t in self.records] if self.needs_targets else None
        return self.regulariser([x for _, x, _ in self.records], targets)

    def finish(self):
        """Forget the pass (call after its backward pass); the gate's per-layer counts are kept."""
        self.gate.reset()
        self.records = []

    def coop_counts(self):
        """The latest per-layer gate counts (``gate_stats``), by layer name, for layers that recorded any."""
        return {name: rec[-1] for name, rec in self.gate.stats.items() if rec}

    def clear_counts(self):
        for rec in self.gate.stats.values():
            rec.clear()

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []


def _scaled(grad_fn, scale, x):
    return grad_fn(x) * scale


def _cast_like(grad_fn, x):
    """``grad_fn`` of ``x`` in float32 (the regulariser's precision), returned in ``x``'s dtype."""
    return grad_fn(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x).to(x.dtype)
