"""Distribution offsets (METHOD.md 4.3): statistics, mismatch scores, selection, forms, folding, checkpoints."""
import copy
import math

import pytest
import torch
from odm_helpers import run_on_gloo_ranks
from torch import nn

from odm_basicsr.quant import (
    ChannelStats,
    DistributionOffset,
    QConv2d,
    QLinear,
    add_offsets,
    attach_offsets,
    calibration,
    channel_statistics,
    collect_channel_stats,
    ensure_offsets_from_state,
    ensure_offsets_like,
    fold_offsets,
    mismatch_scores,
    offset_report,
    quantizer_state_keys,
    select_offset_layers,
    swap_layers,
)


def _mismatched(shape, channel_dim, means, stds, seed=0, dtype=torch.float32):
    """Random normal feature whose channel ``c`` (along ``channel_dim``) has mean ``means[c]``, std ``stds[c]``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    view = [1] * len(shape)
    view[channel_dim] = -1
    m = torch.tensor(means, dtype=torch.float64).reshape(view)
    s = torch.tensor(stds, dtype=torch.float64).reshape(view)
    return (x * s + m).to(dtype)


def _single(layer_fp, w_bits=4, a_bits=4):
    """A one-layer network whose only layer (named '0') is quantized."""
    net = nn.Sequential(layer_fp)
    return swap_layers(net, ['0'], w_bits, a_bits)


def _calibrate(net, xs):
    with calibration(net):
        for x in xs:
            net(x)


def _stats(net, xs):
    with calibration(net), channel_statistics(net) as stats:
        for x in xs:
            net(x)
    return stats


# ---------------------------------------------------------------------------------------------------------------
# ChannelStats
# ---------------------------------------------------------------------------------------------------------------

def test_channel_stats_4d_in_chunks_matches_torch():
    x = _mismatched((7, 5, 6, 9), 1, [0.0, 3.0, -2.0, 40.0, 0.5], [1.0, 0.1, 2.0, 5.0, 0.0])
    s = ChannelStats()
    for chunk in x.split([3, 1, 3]):
        s.update(chunk, channel_dim=1)
    assert s.num_channels == 5 and int(s.count) == 7 * 6 * 9
    ref = x.double()
    assert torch.allclose(s.mean(), ref.mean(dim=(0, 2, 3)), atol=1e-10)
    assert torch.allclose(s.std(), ref.std(dim=(0, 2, 3), unbiased=False), atol=1e-8)
    assert s.std()[4].item() == pytest.approx(0.0, abs=1e-6)  # a constant channel
    assert s.mean().dtype == torch.float64


def test_channel_stats_3d_tokens_last_dim():
    x = _mismatched((3, 20, 4), -1, [1.0, -1.0, 10.0, 0.0], [0.5, 1.0, 3.0, 2.0], seed=1)
    s = ChannelStats(4)
    for chunk in x.split(7, dim=1):  # chunks along the token dimension
        s.update(chunk, channel_dim=-1)
    assert torch.allclose(s.mean(), x.double().mean(dim=(0, 1)), atol=1e-10)
    assert torch.allclose(s.std(), x.double().std(dim=(0, 1), unbiased=False), atol=1e-8)
    with pytest.raises(ValueError, match='channels'):
        s.update(torch.zeros(2, 3), channel_dim=-1)
    with pytest.raises(ValueError, match='no data'):
        ChannelStats(3).mean()
    assert s.all_reduce_() is s  # no process group: a no-op


def test_channel_statistics_records_inputs_without_changing_outputs():
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                       nn.Conv2d(4, 2, 1))
    net = swap_layers(copy.deepcopy(fp), ['2', '4'], 4, 4)
    x = torch.randn(2, 3, 8, 8)
    _calibrate(net, [x])
    y0 = net(x)
    with channel_statistics(net) as stats:
        y1 = net(x)
        assert not y1.requires_grad  # no_grad inside
    assert torch.equal(y0, y1)  # recording neither quantizes nor changes anything
    assert list(stats) == ['2', '4']
    feat = torch.relu(fp[0](x))
    assert torch.allclose(stats['2'].mean(), feat.double().mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.equal(net(x), y0)  # hooks removed
    assert not net[2]._forward_pre_hooks
    # the collecting helper, with an iterable and with a callable
    s2 = collect_channel_stats(net, [x, x])
    assert int(s2['4'].count) == 2 * 2 * 8 * 8
    s3 = collect_channel_stats(net, lambda m: m(x), layers=['4'])
    assert list(s3) == ['4'] and int(s3['4'].count) == 2 * 8 * 8
    with pytest.raises(ValueError, match='not quantized layers'):
        collect_channel_stats(net, [x], layers=['0'])


def _stats_on_rank(rank):
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) * (rank + 1)  # (B, C, L), rank-dependent
    s = ChannelStats(3).update(x, 1).all_reduce_()
    return {'mean': s.mean(), 'std': s.std(), 'count': s.count}


@pytest.mark.slow
def test_channel_stats_all_reduce_two_ranks(tmp_path):
    results = run_on_gloo_ranks(_stats_on_rank, tmp_path)
    base = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4)
    both = torch.cat([base, 2 * base])  # what one process would have seen
    assert len(results) == 2
    for res in results:
        assert int(res['count']) == 2 * 2 * 4
        assert torch.allclose(res['mean'], both.mean(dim=(0, 2)), atol=1e-10)
        assert torch.allclose(res['std'], both.std(dim=(0, 2), unbiased=False), atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# Mismatch scores and selection
# ---------------------------------------------------------------------------------------------------------------

def test_mismatch_scores_exact_small_case():
    # channel 0: values {-1, 1} (mu 0, sigma 1); channel 1: {1, 7} (mu 4, sigma 3)
    x = torch.tensor([[[[-1.0, 1.0]], [[1.0, 7.0]]]])  # (1, 2, 1, 2)
    scores = mismatch_scores({'a': ChannelStats().update(x, 1)})
    # shift = std([0, 4]) / mean([1, 3]) = 2 / 2; scale = std([1, 3]) / 2 = 1 / 2
    assert scores['a']['shift'] == pytest.approx(1.0, abs=1e-12)
    assert scores['a']['scale'] == pytest.approx(0.5, abs=1e-12)


def test_mismatch_scores_shift_vs_scale_and_degenerate():
    shape = (4, 6, 16, 16)
    shifted = _mismatched(shape, 1, [-6.0, -3.0, 0.0, 2.0, 4.0, 8.0], [1.0] * 6)
    scaled = _mismatched(shape, 1, [0.0] * 6, [0.1, 0.3, 1.0, 2.0, 4.0, 8.0])
    matched = _mismatched(shape, 1, [0.0] * 6, [1.0] * 6)
    s = mismatch_scores({n: ChannelStats().update(x, 1) for n, x in
                         (('shifted', shifted), ('scaled', scaled), ('matched', matched))})
    assert s['shifted']['shift'] > 4.0 and s['shifted']['scale'] < 0.05
    assert s['scaled']['scale'] > 0.8 and s['scaled']['shift'] < 0.1
    assert s['matched']['shift'] < 0.05 and s['matched']['scale'] < 0.05
    # constant channels: no division by zero
    const = torch.ones(2, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    d = mismatch_scores({'c': ChannelStats().update(const, 1), 'z': ChannelStats().update(torch.zeros(2, 3, 4), 1)})
    assert math.isfinite(d['c']['shift']) and d['c']['shift'] > 1e6 and d['c']['scale'] == 0.0
    assert d['z'] == {'shift': 0.0, 'scale': 0.0}
    with pytest.raises(ValueError, match="layer 'e'"):
        mismatch_scores({'e': ChannelStats(3)})


SCORES = {
    'a': {'shift': 0.1, 'scale': 0.2},
    'b': {'shift': 0.9, 'scale': 0.3},
    'c': {'shift': 0.2, 'scale': 0.7},
    'd': {'shift': 0.05, 'scale': 0.01},
    'e': {'shift': 0.4, 'scale': 0.4},
}


def test_select_topk_threshold_and_kind():
    assert select_offset_layers(SCORES) == {'b': 'shift', 'c': 'scale'}  # ceil(0.25 * 5) = 2
    assert select_offset_layers(SCORES, fraction=0.5) == {'b': 'shift', 'c': 'scale', 'e': 'shift'}  # ceil(2.5)
    assert select_offset_layers(SCORES, fraction=0.0) == {}
    assert list(select_offset_layers(SCORES, fraction=1.0)) == ['a', 'b', 'c', 'd', 'e']  # scores order
    assert select_offset_layers(SCORES, 'threshold', threshold=0.4) == {'b': 'shift', 'c': 'scale', 'e': 'shift'}
    assert select_offset_layers(SCORES, 'threshold', threshold=0.95) == {}
    assert select_offset_layers(SCORES, kind='shift') == {'b': 'shift', 'c': 'shift'}  # same layers, forced kind
    assert select_offset_layers(SCORES, 'threshold', threshold=0.2, kind='scale') == {
        'a': 'scale', 'b': 'scale', 'c': 'scale', 'e': 'scale'}
    thirty = {f'l{i}': {'shift': float(i), 'scale': 0.0} for i in range(30)}
    assert len(select_offset_layers(thirty, fraction=0.1)) == 3  # not 4 from 0.1 * 30 = 3.0000000000000004
    assert set(select_offset_layers(thirty, fraction=0.1)) == {'l27', 'l28', 'l29'}


@pytest.mark.parametrize('kwargs, option', [
    (dict(select='top'), 'select'),
    (dict(fraction=1.5), 'fraction'),
    (dict(fraction=True), 'fraction'),
    (dict(fraction='0.25'), 'fraction'),
    (dict(select='threshold'), 'threshold'),
    (dict(select='threshold', threshold=-1), 'threshold'),
    (dict(kind='both'), 'kind'),
])
def test_select_rejects_bad_options(kwargs, option):
    with pytest.raises(ValueError, match=option):
        select_offset_layers(SCORES, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Initialisation, quantization error, gradients
# ---------------------------------------------------------------------------------------------------------------

def _three_layer_fp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1), nn.Flatten(2), nn.Linear(64, 5))


def test_offset_init_keeps_fp_output():
    fp = _three_layer_fp()
    net = swap_layers(copy.deepcopy(fp), ['2', '4', '6'], w_bits=32, a_bits=32)
    x = torch.rand(2, 3, 8, 8) * 10
    stats = _stats(net, [x])
    y0 = net(x)
    created = attach_offsets(net, {'2': 'shift', '4': 'scale', '6': 'scale'}, stats)
    assert set(created) == {'2', '4', '6'}
    assert not torch.allclose(net[4].offset.rho, torch.ones(6))  # initialised, not identity
    assert torch.allclose(net[2].offset.delta.double(), stats['2'].mean().float().double(), atol=1e-6)
    rho = net[4].offset.rho.double()
    assert rho.mean().item() == pytest.approx(1.0, abs=1e-5)  # relative scale
    y1 = net(x)
    assert torch.allclose(y1, y0, rtol=1e-5, atol=1e-5)
    assert torch.allclose(y1, fp(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kind', ['shift', 'scale'])
@pytest.mark.parametrize('w_bits, factor', [(32, 0.3), (4, 0.9)])
def test_offset_reduces_quantization_error_on_mismatched_input(kind, w_bits, factor):
    """A4 with FP weights isolates the activation error (drops > 3x); at W4A4 the weight error, the same with and
    without offset, dilutes the gain."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    if kind == 'shift':
        means, stds = [-8.0, -5.0, -2.0, 0.0, 1.0, 3.0, 6.0, 9.0], [1.0] * 8
    else:
        means, stds = [0.0] * 8, [0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0]
    xs = [_mismatched((4, 8, 12, 12), 1, means, stds, seed=s) for s in range(3)]
    test_x = _mismatched((4, 8, 12, 12), 1, means, stds, seed=10)
    ref = conv(test_x).detach()

    plain = _single(copy.deepcopy(conv), w_bits=w_bits, a_bits=4)
    _calibrate(plain, xs)
    err_plain = ((plain(test_x) - ref) ** 2).mean().item()

    net = _single(copy.deepcopy(conv), w_bits=w_bits, a_bits=4)
    stats = _stats(net, xs)
    scores = mismatch_scores(stats)
    selection = select_offset_layers(scores, fraction=1.0)
    assert selection == {'0': kind}  # 'auto' picks the kind of the constructed mismatch
    attach_offsets(net, selection, stats)
    assert not bool(net[0].act_quant.initialized)  # range reset: it must be set from the normalised input
    _calibrate(net, xs)
    err_offset = ((net(test_x) - ref) ** 2).mean().item()
    assert err_offset < factor * err_plain, (err_offset, err_plain)


def test_gradients_reach_delta_and_rho():
    fp = _three_layer_fp()
    net = swap_layers(copy.deepcopy(fp), ['2', '4', '6'], w_bits=4, a_bits=4)
    x = torch.rand(2, 3, 8, 8) * 10
    stats = _stats(net, [x])
    attach_offsets(net, {'2': 'shift', '4': 'scale', '6': 'shift'}, stats)
    _calibrate(net, [x])
    net(x).square().mean().backward()
    for name, p in (('2', net[2].offset.delta), ('4', net[4].offset.rho), ('6', net[6].offset.delta)):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_add_offsets_end_to_end_and_report():
    fp = _three_layer_fp()
    net = swap_layers(copy.deepcopy(fp), ['2', '4', '6'], w_bits=4, a_bits=4)
    x = torch.rand(2, 3, 8, 8) * 10
    stats = _stats(net, [x])
    selection, scores = add_offsets(net, stats, select='topk', fraction=0.5)
    assert len(selection) == 2 and set(scores) == {'2', '4', '6'}
    report = offset_report(net)
    assert [r['layer'] for r in report] == [n for n in ('2', '4', '6') if n in selection]
    for r in report:
        layer = net[int(r['layer'])]
        assert r['kind'] == selection[r['layer']] and r['params'] == r['channels'] == 6 and not r['folded']
        assert r['fp_ops_per_input_element'] == (2 if r['kind'] == 'shift' else 1)
        assert r['fp_ops_per_call'] == (layer.weight.numel() if r['kind'] == 'scale' else 0)
    _calibrate(net, [x])
    fold_offsets(net)
    assert all(r['folded'] and r['fp_ops_per_input_element'] == 1 and r['fp_ops_per_call'] == 0
               for r in offset_report(net))
    with pytest.raises(ValueError, match='already has an offset'):
        attach_offsets(net, {n: 'shift' for n in selection}, stats)
    with pytest.raises(ValueError, match='not a quantized layer'):
        attach_offsets(net, {'0': 'shift'}, stats)


# ---------------------------------------------------------------------------------------------------------------
# Folding
# ---------------------------------------------------------------------------------------------------------------

def _offset_net(fp_layer, kind, x, w_bits=4, a_bits=4):
    net = _single(fp_layer, w_bits, a_bits)
    stats = _stats(net, [x])
    attach_offsets(net, {'0': kind}, stats)
    _calibrate(net, [x])
    return net


def test_fold_conv_scale_is_exact():
    torch.manual_seed(0)
    x = _mismatched((2, 6, 10, 10), 1, [1.0] * 6, [0.2, 0.5, 1.0, 2.0, 4.0, 6.0])
    net = _offset_net(nn.Conv2d(6, 5, 3, padding=1), 'scale', x)
    y = net(x)
    folded = copy.deepcopy(net)
    w_before = folded[0].weight.detach().clone()
    assert fold_offsets(folded) == ['0'] and fold_offsets(folded) == []  # idempotent
    rho = net[0].offset.rho.detach()
    assert torch.allclose(folded[0].weight, w_before * rho.view(1, -1, 1, 1))
    assert folded[0].offset.is_folded and bool(folded[0].offset.folded)
    assert torch.allclose(folded(x), y, atol=1e-5, rtol=0)
    assert torch.equal(folded(x), y)  # the same product as the unfolded layer: bit-identical


@pytest.mark.parametrize('bias', [True, False])
def test_fold_conv_shift_exact_on_interior_only(bias):
    torch.manual_seed(0)
    x = _mismatched((2, 6, 10, 10), 1, [-4.0, -1.0, 0.0, 2.0, 5.0, 9.0], [1.0] * 6)
    net = _offset_net(nn.Conv2d(6, 5, 3, padding=1, bias=bias), 'shift', x)
    y = net(x)
    folded = copy.deepcopy(net)
    fold_offsets(folded)
    assert folded[0].bias is not None  # created when missing
    yf = folded(x)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    assert torch.allclose(yf[inner], y[inner], atol=1e-5, rtol=0)
    border = torch.ones_like(y, dtype=torch.bool)
    border[inner] = False
    assert (yf[border] - y[border]).abs().max() > 1e-2  # zero padding: the border differs


def test_fold_conv_shift_exact_with_replicate_padding():
    torch.manual_seed(0)
    x = _mismatched((2, 4, 8, 8), 1, [-3.0, 0.0, 2.0, 6.0], [1.0] * 4)
    net = _offset_net(nn.Conv2d(4, 3, 3, padding=1, padding_mode='replicate'), 'shift', x)
    folded = copy.deepcopy(net)
    fold_offsets(folded)
    assert torch.allclose(folded(x), net(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize('kind', ['shift', 'scale'])
@pytest.mark.parametrize('bias', [True, False])
def test_fold_linear_exact(kind, bias):
    torch.manual_seed(0)
    x = _mismatched((2, 7, 5), -1, [-3.0, 0.0, 1.0, 4.0, 8.0], [0.3, 1.0, 2.0, 0.5, 3.0])
    net = _offset_net(nn.Linear(5, 4, bias=bias), kind, x)
    assert isinstance(net[0], QLinear)
    y = net(x)
    folded = copy.deepcopy(net)
    fold_offsets(folded)
    assert torch.allclose(folded(x), y, atol=1e-5, rtol=0)


def test_grouped_conv_rejected():
    conv = QConv2d(4, 4, 3, padding=1, groups=2)
    net = nn.Sequential(conv)
    stats = {'0': ChannelStats().update(torch.randn(2, 4, 5, 5), 1)}
    with pytest.raises(ValueError, match='groups'):
        attach_offsets(net, {'0': 'scale'}, stats)
    with pytest.raises(ValueError, match='groups'):
        ensure_offsets_from_state(net, {'0.offset.rho': torch.ones(4)})


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints, EMA copies, devices and dtypes
# ---------------------------------------------------------------------------------------------------------------

def test_state_dict_round_trip_with_ensure_offsets_from_state():
    fp = _three_layer_fp()
    net = swap_layers(copy.deepcopy(fp), ['2', '4', '6'], w_bits=4, a_bits=4)
    x = torch.rand(2, 3, 8, 8) * 10
    attach_offsets(net, {'2': 'shift', '4': 'scale'}, _stats(net, [x]))
    _calibrate(net, [x])
    keys = quantizer_state_keys(net)
    assert {'2.offset.delta', '2.offset.folded', '4.offset.rho', '4.offset.folded'} <= set(keys)
    state = net.state_dict()

    fresh = swap_layers(_three_layer_fp(seed=1), ['2', '4', '6'], w_bits=4, a_bits=4)
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(state, strict=True)
    assert ensure_offsets_from_state(fresh, state) == ['2', '4']
    assert ensure_offsets_from_state(fresh, state) == []  # already there
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh(x), net(x))

    with pytest.raises(ValueError, match='has a shift offset'):
        ensure_offsets_from_state(fresh, {'2.offset.rho': torch.ones(6)})
    with pytest.raises(ValueError, match='not a quantized layer'):
        ensure_offsets_from_state(fresh, {'module.2.offset.delta': torch.ones(6)})


def test_folded_checkpoint_reloads_folded():
    torch.manual_seed(0)
    x = _mismatched((2, 6, 10, 10), 1, [-4.0, -1.0, 0.0, 2.0, 5.0, 9.0], [1.0] * 6)
    net = _offset_net(nn.Conv2d(6, 5, 3, padding=1, bias=False), 'shift', x)
    fold_offsets(net)
    state = net.state_dict()
    assert '0.bias' in state and bool(state['0.offset.folded'])
    fresh = _single(nn.Conv2d(6, 5, 3, padding=1, bias=False))
    ensure_offsets_from_state(fresh, state)
    assert fresh[0].bias is not None  # folding created a bias: so does loading
    fresh.load_state_dict(state, strict=True)
    assert fresh[0].offset.is_folded
    assert torch.equal(fresh(x), net(x))


def test_ensure_offsets_like_mirrors_for_ema():
    fp = _three_layer_fp()
    net = swap_layers(copy.deepcopy(fp), ['2', '4', '6'], w_bits=4, a_bits=4)
    ema = swap_layers(copy.deepcopy(fp), ['2', '4', '6'], w_bits=4, a_bits=4)
    x = torch.rand(2, 3, 8, 8) * 10
    attach_offsets(net, {'2': 'shift', '6': 'scale'}, _stats(net, [x]))
    assert ensure_offsets_like(ema, net) == ['2', '6']
    assert ensure_offsets_like(ema, net) == []
    assert dict(ema.named_parameters()).keys() == dict(net.named_parameters()).keys()
    assert torch.equal(ema[2].offset.delta, net[2].offset.delta)
    assert ema[2].offset.delta is not net[2].offset.delta
    other = swap_layers(copy.deepcopy(fp), ['2', '4', '6'], w_bits=4, a_bits=4)
    attach_offsets(other, {'2': 'scale'}, _stats(other, [x]))
    with pytest.raises(ValueError, match='shift'):
        ensure_offsets_like(other, net)


def test_float64_and_device_agnostic():
    devices = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    for device in devices:
        fp = _three_layer_fp().to(device=device, dtype=torch.float64)
        net = swap_layers(fp, ['2', '4', '6'], w_bits=4, a_bits=4)
        x = (torch.rand(2, 3, 8, 8) * 10).to(device=device, dtype=torch.float64)
        stats = _stats(net, [x])
        attach_offsets(net, {'2': 'shift', '4': 'scale', '6': 'shift'}, stats)
        for n in (2, 4, 6):
            p = net[n].offset.param
            assert p.dtype == torch.float64 and p.device == net[n].weight.device
        _calibrate(net, [x])
        y = net(x)
        assert y.dtype == torch.float64 and torch.isfinite(y).all()
        xl = _mismatched((2, 7, 5), -1, [-3.0, 0.0, 1.0, 4.0, 8.0], [1.0] * 5, dtype=torch.float64).to(device)
        lin = _offset_net(nn.Linear(5, 4).to(device=device, dtype=torch.float64), 'shift', xl)
        yl = lin(xl)
        fold_offsets(lin)
        assert lin[0].bias.dtype == torch.float64
        assert torch.allclose(lin(xl), yl, atol=1e-10, rtol=0)


def test_distribution_offset_validation_and_identity_defaults():
    with pytest.raises(ValueError, match='kind'):
        DistributionOffset(4, 'both')
    with pytest.raises(ValueError, match='num_channels'):
        DistributionOffset(0, 'shift')
    off = DistributionOffset(3, 'scale')
    assert set(off.state_dict()) == {'rho', 'folded'} and torch.equal(off.rho, torch.ones(3))
    assert set(DistributionOffset(3, 'shift').state_dict()) == {'delta', 'folded'}
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(off.normalize(x, 1), x)
    with pytest.raises(ValueError, match='channels'):
        off.normalize(torch.randn(2, 4, 4, 4), 1)
    with torch.no_grad():
        off.rho.fill_(-1.0)  # training drove rho below zero: the forward clamps it
    assert torch.isfinite(off.normalize(x, 1)).all()
