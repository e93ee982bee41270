"""No host synchronisation in the training forward/backward pass on a step that does not log (issue 10, item 6).

A host sync is any read of a device tensor's value on the host (``.item()``, ``bool(t)``, ``float(t)``,
``if t:``); on a GPU each one stalls the CPU until the device has caught up. PyTorch routes all of them through
one op, ``aten::_local_scalar_dense``, which a ``TorchDispatchMode`` sees on the CPU too; these tests count it.

The step is built by hand, as ``ODMModel`` builds it (a calibrated quantized EDSR, a forward pre-hook on every
quantized layer that marks its input in a :class:`~odm_basicsr.odm.cooperation.FeatureGate` with the regulariser's
closed-form ``feature_grad``, one backward pass of the reconstruction loss), so that the test does not depend on
the model class. The activation quantizer's "initialised" flag is read from a Python mirror of its buffer; the
mirror tests below check that it follows every writer (``set_range``, ``load_state_dict``, ``attach_offsets``,
the EMA copy).
"""
import copy
import pickle
import re
import traceback
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from odm_basicsr.odm.cooperation import FeatureGate, cosine_combine, gate_param_grads
from odm_basicsr.quant import ActQuantizer, QConv2d, attach_offsets, calibrate, channel_statistics, quantized_layers

REPO = Path(__file__).resolve().parents[1]
TINY_EDSR = {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 2, 'upscale': 2}


class HostSyncs(TorchDispatchMode):
    """Count ``aten::_local_scalar_dense`` calls (and keep where they came from, for the failure message)."""

    def __init__(self):
        super().__init__()
        self.where = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            frames = [f for f in traceback.extract_stack()[:-1] if 'odm_basicsr' in f.filename or 'test_' in f.filename]
            self.where.append(' <- '.join(f'{Path(f.filename).name}:{f.lineno}' for f in reversed(frames[-4:])))
        return func(*args, **(kwargs or {}))

    def report(self):
        return '\n'.join(sorted(set(self.where)))


def test_the_counter_sees_item_and_bool():
    t = torch.ones(2)
    with HostSyncs() as syncs:
        t.sum().item()
        bool(t[0])
        if t[1]:
            pass
        float(t.max())
    assert len(syncs.where) == 4


def _network(**options):
    from basicsr.utils.registry import ARCH_REGISTRY

    import odm_basicsr.archs  # noqa: F401  (registers the archs)

    torch.manual_seed(0)
    return ARCH_REGISTRY.get('Quantized')(arch=dict(TINY_EDSR), w_bits=4, a_bits=4, **options)


def _losses():
    from odm_basicsr.losses.variance_loss import FeatureVarianceLoss, MismatchLoss

    return {'variance': FeatureVarianceLoss(1e-4), 'mismatch': MismatchLoss(1e-5)}


def _mark_inputs(net, gate, loss, record):
    """ODMModel's forward pre-hook in feature mode: mark each quantized layer's input with the loss's gradient."""
    def hook(module, args, name):
        x = args[0]
        target = module.effective_input(x).detach() if loss.requires_targets else None
        gate.add(x, partial(loss.feature_grad, target=target), name, record=record)

    return [m.register_forward_pre_hook(partial(hook, name=name)) for name, m in quantized_layers(net)]


CONFIGS = {
    'default': {},
    'offsets, aligned grid, output quantizers, clip correction, per-channel MSE weights': {
        'act_grid': 'aligned', 'output_quant': ['body.*'], 'clip_correction': True,
        'weight_granularity': 'channel', 'weight_range': 'mse', 'offsets': {'select': 'topk', 'fraction': 1.0}},
}


def _calibrated(config):
    options = dict(CONFIGS[config])
    offsets = options.pop('offsets', None)
    net = _network(**options)
    batches = [torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    if offsets:  # as ODMModel.calibrate: statistics, offsets (half shift, half scale), then the ranges
        from odm_basicsr.quant import calibration
        with calibration(net), channel_statistics(net) as stats:
            for b in batches:
                net(b)
        names = [n for n, _ in quantized_layers(net)]
        attach_offsets(net, {n: ('shift', 'scale')[i % 2] for i, n in enumerate(names)}, stats)
    calibrate(net, batches, 'fp')
    net.train()
    return net, batches[0]


@pytest.mark.parametrize('config', list(CONFIGS))
@pytest.mark.parametrize('loss_name', ['variance', 'mismatch'])
def test_feature_mode_step_has_no_host_sync(config, loss_name):
    net, lq = _calibrated(config)
    gt = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(5))
    loss = _losses()[loss_name]
    gate = FeatureGate(gate=True)
    hooks = _mark_inputs(net, gate, loss, record=False)  # a step that does not log
    try:
        with HostSyncs() as syncs:
            out = net(lq)
            l_pix = (out - gt).abs().mean()
            l_pix.backward()
    finally:
        gate.reset()
        for h in hooks:
            h.remove()
    assert not syncs.where, f'{len(syncs.where)} host syncs in the training step:\n{syncs.report()}'
    # the step did what a step does: gradients everywhere, the gate saw every quantized layer's input
    assert all(p.grad is not None for n, p in net.named_parameters() if 'weight' in n and p.requires_grad)
    assert not gate.stats


def test_logged_step_counts_without_host_sync_too():
    """On a logged step the gate records its counts as tensors; turning them into numbers is the logger's job."""
    net, lq = _calibrated('default')
    gate = FeatureGate(gate=True)
    hooks = _mark_inputs(net, gate, _losses()['variance'], record=True)
    try:
        with HostSyncs() as syncs:
            net(lq).abs().mean().backward()
    finally:
        gate.reset()
        for h in hooks:
            h.remove()
    assert not syncs.where, syncs.report()
    assert len(gate.stats) == len(quantized_layers(net))


@pytest.mark.parametrize('loss_name', ['variance', 'mismatch'])
def test_param_and_cosine_combination_have_no_host_sync(loss_name):
    """``param`` / ``cosine`` modes: the regulariser's forward, two gradients, and their combination."""
    net, lq = _calibrated('default')
    loss = _losses()[loss_name]
    features, targets = [], []

    def hook(module, args):
        features.append(args[0])
        targets.append(module.effective_input(args[0]).detach())

    hooks = [m.register_forward_pre_hook(hook) for _, m in quantized_layers(net)]
    params = [p for p in net.parameters() if p.requires_grad]
    try:
        with HostSyncs() as syncs:
            out = net(lq)
            l_pix = out.abs().mean()
            l_var = loss(features, targets if loss.requires_targets else None)
            grads_v = torch.autograd.grad(l_var, params, retain_graph=True, allow_unused=True)
            grads_r = torch.autograd.grad(l_pix, params, allow_unused=True)
            gate_param_grads(list(grads_r), list(grads_v))
            cosine_combine(list(grads_r), list(grads_v))
    finally:
        for h in hooks:
            h.remove()
    assert not syncs.where, syncs.report()


def _ema_host():
    """A QuantSRModel with only its two networks: its ``model_ema`` (on top of BasicSR's, as fixed by compat)."""
    import odm_basicsr.plugin  # noqa: F401  (applies the BasicSR fixes)
    from odm_basicsr.models.quant_sr_model import QuantSRModel

    net, lq = _calibrated(next(k for k in CONFIGS if 'offsets' in k))
    ema = _network(**{k: v for k, v in CONFIGS[next(k for k in CONFIGS if 'offsets' in k)].items() if k != 'offsets'})
    host = QuantSRModel.__new__(QuantSRModel)  # the EMA step alone: no options, no optimizer
    host.net_g, host.net_g_ema = net, ema
    return host.model_ema, net, ema


def test_ema_step_has_no_host_sync_and_the_ema_flags_follow():
    model_ema, net, ema = _ema_host()
    assert not any(q.is_initialized for q in ema.modules() if isinstance(q, ActQuantizer))
    model_ema(decay=0)  # the first copy (BasicSR's init): offsets created, ranges copied
    for (name, q), (_, q_ema) in zip(_act_quantizers(net), _act_quantizers(ema)):
        assert q_ema.is_initialized and bool(q_ema.initialized), name
        assert torch.equal(q_ema.upper, q.upper), name
    with HostSyncs() as syncs:
        model_ema(decay=0.999)
    assert not syncs.where, syncs.report()


def _act_quantizers(net):
    return [(n, m) for n, m in net.named_modules() if isinstance(m, ActQuantizer)]


# ------------------------------------------------------------------------------------ the mirror follows its buffer
def _both(q):
    return q.is_initialized, bool(q.initialized)


def test_mirror_follows_set_range_first_batch_and_set_initialized():
    q = ActQuantizer(4, init='minmax')
    assert _both(q) == (False, False)
    q.set_range(-1.0, 2.0)
    assert _both(q) == (True, True)
    q.set_initialized(False)
    assert _both(q) == (False, False)
    x = torch.linspace(-3, 5, 100)
    q(x)  # the first batch sets the range again
    assert _both(q) == (True, True) and (q.lower.item(), q.upper.item()) == pytest.approx((-3.0, 5.0))
    q(x * 10)  # and only the first
    assert q.upper.item() == pytest.approx(5.0)


def test_mirror_follows_load_state_dict_both_ways():
    src = QConv2d(3, 4, 3, padding=1)
    src.act_quant.set_range(0.0, 3.0)
    dst = QConv2d(3, 4, 3, padding=1)
    dst.load_state_dict(src.state_dict())
    assert _both(dst.act_quant) == (True, True)
    assert torch.equal(dst(torch.ones(1, 3, 4, 4)), src(torch.ones(1, 3, 4, 4)))
    dst.load_state_dict(QConv2d(3, 4, 3, padding=1).state_dict())  # an uncalibrated state: the range is unset
    assert _both(dst.act_quant) == (False, False)
    dst.load_state_dict(src.state_dict(), assign=True)
    assert _both(dst.act_quant) == (True, True)
    partial_state = {k: v for k, v in src.state_dict().items() if 'initialized' not in k}
    fresh = QConv2d(3, 4, 3, padding=1)
    fresh.load_state_dict(partial_state, strict=False)  # no key: buffer and mirror stay as they were
    assert _both(fresh.act_quant) == (False, False)


def test_mirror_follows_attach_offsets_reset_and_survives_copies():
    net, lq = _calibrated('default')
    assert all(_both(q) == (True, True) for _, q in _act_quantizers(net))
    with channel_statistics(net) as stats:
        net(lq)
    first = quantized_layers(net)[0][0]
    attach_offsets(net, {first: 'shift'}, stats)  # resets that layer's range
    q = dict(quantized_layers(net))[first].act_quant
    assert _both(q) == (False, False)
    clone = copy.deepcopy(net)
    assert _both(dict(quantized_layers(clone))[first].act_quant) == (False, False)
    net(lq)  # set from the normalised input by the first batch
    assert _both(q) == (True, True)
    assert _both(dict(quantized_layers(clone))[first].act_quant) == (False, False)


def test_module_pickled_before_the_mirror_existed_loads_with_it():
    q = ActQuantizer(4)
    q.set_range(0.0, 1.0)
    del q.__dict__['_initialized']  # what a whole-module pickle of an older version holds
    restored = pickle.loads(pickle.dumps(q))
    assert _both(restored) == (True, True)


def test_nothing_writes_the_buffer_behind_the_mirrors_back():
    """Every writer goes through ``set_initialized`` / ``set_range`` / ``set_folded`` (or load_state_dict)."""
    pattern = re.compile(r'\.(initialized|folded)\s*(\.(fill_|copy_|zero_|data)\b|\[|=[^=])')
    allowed = {'odm_basicsr/quant/quantizers.py', 'odm_basicsr/quant/offsets/distribution_offset.py'}
    found = []
    for path in sorted(list((REPO / 'odm_basicsr').rglob('*.py')) + list((REPO / 'scripts').rglob('*.py'))):
        rel = str(path.relative_to(REPO))
        for i, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1):
            if pattern.search(line) and not (rel in allowed and 'self.' in line):
                found.append(f'{rel}:{i}: {line.strip()}')
    assert not found, 'write the flag through its method, not the buffer:\n' + '\n'.join(found)


def test_a_stale_mirror_would_be_caught():
    """The guard above matters: a buffer written directly leaves the mirror behind (forward trusts the mirror)."""
    q = ActQuantizer(4)
    q.set_range(0.0, 1.0)
    q.initialized.fill_(False)
    assert _both(q) == (True, False)
    layer = nn.Module()
    layer.q = q
    layer.load_state_dict(layer.state_dict())  # reloading makes them agree again
    assert _both(q) == (False, False)
