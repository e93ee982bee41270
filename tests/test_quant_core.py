"""Quantizer math: levels, clipping, STE gradients, range learning, calibration, layers, layer selection."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from odm_basicsr.quant import (
    ActQuantizer,
    QConv2d,
    QLinear,
    WeightQuantizer,
    calibration,
    check_bits,
    fake_quantize,
    percentile,
    quantizer_state_keys,
    select_layers,
    swap_layers,
)


@pytest.mark.parametrize('bits', [2, 3, 4, 8])
def test_fake_quantize_levels_and_range(bits):
    x = torch.linspace(-3, 5, 10001)
    q = fake_quantize(x, torch.tensor(-1.0), torch.tensor(2.0), bits)
    levels = torch.unique(q)
    assert len(levels) == 2**bits  # a dense input uses every level
    assert levels.min().item() == pytest.approx(-1.0) and levels.max().item() == pytest.approx(2.0)
    step = 3.0 / (2**bits - 1)
    assert torch.allclose(levels[1:] - levels[:-1], torch.full((2**bits - 1,), step), atol=1e-5)
    inside = (x >= -1) & (x <= 2)
    assert (q[inside] - x[inside]).abs().max().item() <= step / 2 + 1e-6  # nearest level
    assert torch.all(q[x < -1] == -1.0) and torch.all(q[x > 2] == 2.0)  # clipped


def test_fake_quantize_ste_gradients():
    x = torch.tensor([-5.0, -0.3, 0.26, 0.9, 7.0], requires_grad=True)
    lower = torch.tensor(-1.0, requires_grad=True)
    upper = torch.tensor(1.0, requires_grad=True)
    q = fake_quantize(x, lower, upper, 2)
    q.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # identity inside, zero where clipped
    # The clipped elements give the bound gradient 1 each; inside elements add the LSQ rounding-error term.
    step = 2.0 / 3
    inner = torch.tensor([-0.3, 0.26, 0.9])
    r = torch.round((inner + 1) / step)
    lsq_upper = ((r - (inner + 1) / step) / 3).sum().item()
    lsq_lower = (-(r - (inner + 1) / step) / 3).sum().item()
    assert upper.grad.item() == pytest.approx(1.0 + lsq_upper, abs=1e-5)
    assert lower.grad.item() == pytest.approx(1.0 + lsq_lower, abs=1e-5)


@pytest.mark.parametrize('bad', [0, 1, 9, 16, 33, '4', 4.0, True, None])
def test_check_bits_rejects(bad):
    with pytest.raises(ValueError, match='w_bits'):
        check_bits(bad, 'w_bits')


@pytest.mark.parametrize('good', [2, 3, 4, 5, 6, 7, 8, 32])
def test_check_bits_accepts(good):
    assert check_bits(good) == good


def test_percentile_matches_numpy_nearest_rank():
    import numpy as np
    x = torch.randn(100003, generator=torch.Generator().manual_seed(0))
    for q in (1, 50, 99, 99.9):
        expected = np.percentile(x.numpy(), q, method='inverted_cdf')
        assert percentile(x, q).item() == pytest.approx(float(expected), abs=1e-6)


def test_act_quantizer_initialises_from_first_batch():
    torch.manual_seed(0)
    q = ActQuantizer(4, init='percentile', init_percentile=99)
    x = torch.randn(4, 8, 16, 16) * 10
    assert not q.initialized
    y = q(x)
    assert q.initialized
    assert q.lower.item() == pytest.approx(percentile(x, 1).item(), rel=1e-5)
    assert q.upper.item() == pytest.approx(percentile(x, 99).item(), rel=1e-5)
    assert len(torch.unique(y)) <= 16
    # the second batch does not move the range
    q(x * 3)
    assert q.upper.item() == pytest.approx(percentile(x, 99).item(), rel=1e-5)
    mm = ActQuantizer(4, init='minmax')
    mm(x)
    assert (mm.lower.item(), mm.upper.item()) == pytest.approx((x.min().item(), x.max().item()), rel=1e-5)


def test_calibration_averages_batches_and_passes_fp_through():
    net = nn.Sequential(QConv2d(3, 4, 3, padding=1, w_bits=4, a_bits=4, act_options={'init': 'percentile'}))
    batches = [torch.rand(2, 3, 8, 8) * s for s in (1.0, 3.0)]
    with calibration(net):
        for b in batches:
            out = net(b)
            q = net[0]
            # during calibration the network is FP: neither the activation nor the weight is quantized
            expected = torch.nn.functional.conv2d(b, q.weight, q.bias, padding=1)
            assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(net(batches[0]), expected, atol=1e-3)  # quantized again afterwards
    act = net[0].act_quant
    mean_upper = sum(percentile(b, 99) for b in batches).item() / 2
    assert act.initialized and act.upper.item() == pytest.approx(mean_upper, rel=1e-5)


def _train_bounds(quantizer, x, steps, lr):
    opt = torch.optim.Adam(quantizer.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        ((quantizer(x) - x) ** 2).mean().backward()
        opt.step()


@pytest.mark.parametrize('lower,upper,expected', [
    (0.0, 0.0, (0.0, 1.0)),  # zero on every batch: the unit range
    (-3e-7, 5e-7, (0.0, 1.0)),
    (2.0, 2.0, (2.0, 2.002)),  # a constant: a width of 1e-3 of it
    (-1.0, 3.0, (-1.0, 3.0)),
])
def test_act_range_of_zero_and_constant_inputs(lower, upper, expected):
    q = ActQuantizer(4, init='minmax')
    q.set_range(lower, upper)
    assert q.is_initialized
    assert [float(b) for b in q.bounds()] == pytest.approx(expected, rel=1e-6)


def test_act_range_learns_at_useful_rate_on_0_255_features():
    """EDSR features live on 0-255: a bound must move by tens, not by lr per step."""
    torch.manual_seed(0)
    x = torch.rand(4, 8, 16, 16) * 70  # the true range is [0, 70]
    q = ActQuantizer(4)
    q.set_range(0.0, 35.0)  # a badly clipped start
    _train_bounds(q, x, steps=500, lr=1e-3)
    # Adam moves an unscaled bound by at most lr per step: 0.5 in 500 steps. Scaled, it moves tens.
    assert q.upper.item() - 35.0 > 10.0
    # and the quantization error dropped accordingly
    q2 = ActQuantizer(4)
    q2.set_range(0.0, 35.0)
    assert ((q(x) - x) ** 2).mean() < 0.3 * ((q2(x) - x) ** 2).mean()


def test_weight_quantizer_layer_and_channel():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3)
    # per-bit-width defaults (chosen by the RLFN calibration study, README)
    assert [WeightQuantizer(b).range_method for b in (2, 3, 4, 5, 6, 8)] == ['mse'] + ['percentile'] * 3 + ['mse'] * 2
    assert [ActQuantizer(b).init for b in (2, 3, 4, 5, 6, 8)] == ['mse'] * 2 + ['percentile'] * 2 + ['minmax'] * 2
    assert WeightQuantizer(2, clip_correction=True).range_method == 'percentile'
    assert WeightQuantizer(2, range_method='maxabs').range_method == 'maxabs'
    wq = WeightQuantizer(3, range_method='maxabs')(w)
    assert len(torch.unique(wq)) <= 8
    assert wq.abs().max().item() == pytest.approx(w.abs().max().item(), rel=1e-6)  # max-abs range
    w[0] *= 100  # one loud channel: per channel keeps the quiet ones resolved
    wc = WeightQuantizer(3, granularity='channel', range_method='maxabs')(w)
    for c in range(6):
        assert len(torch.unique(wc[c])) <= 8
        assert wc[c].abs().max().item() == pytest.approx(w[c].abs().max().item(), rel=1e-6)
    wl = WeightQuantizer(3, granularity='layer', range_method='maxabs')(w)
    err_c, err_l = (wc[1:] - w[1:]).abs().mean(), (wl[1:] - w[1:]).abs().mean()
    assert err_c < 0.2 * err_l
    # mse: a smaller quantization error than max-abs on the quiet channels' weights, per channel
    wm = WeightQuantizer(3, granularity='channel', range_method='mse')(w)
    assert ((wm - w) ** 2).sum() < ((wc - w) ** 2).sum()
    wp = WeightQuantizer(4, range_method='percentile', percentile=90)(w)
    assert wp.abs().max().item() == pytest.approx(percentile(w.abs(), 90).item(), rel=1e-5)


def test_weight_clip_correction_learns_gamma():
    w = torch.randn(8, 8)
    q = WeightQuantizer(2, clip_correction=True)
    assert q.gamma.item() == 1.0
    ((q(w) - w) ** 2).mean().backward()
    assert q.gamma.grad is not None and q.gamma.grad.item() != 0.0


@pytest.mark.parametrize('bad', [dict(init='mean'), dict(init_percentile=20), dict(bits=0)])
def test_act_quantizer_rejects_bad_options(bad):
    with pytest.raises(ValueError):
        ActQuantizer(**{'bits': 4, **bad})


def test_qconv2d_from_float_keeps_keys_and_computes_quantized_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 5, 3, padding=1)
    q = QConv2d.from_float(conv, w_bits=4, a_bits=4)
    assert q.weight is conv.weight and q.bias is conv.bias
    assert {'weight', 'bias'} <= set(q.state_dict())
    assert set(q.state_dict()) - {'weight', 'bias'} == {
        'act_quant.lower_raw', 'act_quant.upper_raw', 'act_quant.range_scale', 'act_quant.initialized'}
    x = torch.randn(2, 4, 8, 8)
    y = q(x)
    xq = q.act_quant(x)
    expected = nn.functional.conv2d(xq, q.weight_quant(conv.weight), conv.bias, padding=1)
    assert torch.allclose(y, expected, atol=1e-6)
    fp = QConv2d.from_float(conv, w_bits=32, a_bits=32)
    assert fp.act_quant is None and fp.weight_quant is None
    assert torch.equal(fp(x), conv(x))


def test_qlinear_quantizes_last_dim_tokens():
    lin = nn.Linear(6, 3)
    q = QLinear.from_float(lin, w_bits=2, a_bits=3)
    x = torch.randn(2, 10, 6)
    y = q(x)
    assert y.shape == (2, 10, 3)
    assert len(torch.unique(q.act_quant(x))) <= 8
    assert len(torch.unique(q.quantized_weight())) <= 4


@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16])
def test_dtype_agnostic(dtype):
    conv = nn.Conv2d(3, 3, 3, padding=1).to(dtype)
    q = QConv2d.from_float(conv, 4, 4)
    y = q(torch.randn(1, 3, 8, 8, dtype=dtype))
    assert y.dtype == dtype and torch.isfinite(y.float()).all()


def test_half_inputs_become_float32_only_under_autocast():
    from odm_basicsr.quant.layers import float32_under_autocast
    x = torch.randn(2, 3, dtype=torch.bfloat16)
    assert float32_under_autocast(x) is x  # a bfloat16 network without autocast keeps its dtype
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = float32_under_autocast(x)
        assert y.dtype == torch.float32 and torch.equal(y, x.float())
        f = torch.randn(2)
        assert float32_under_autocast(f) is f


def _toy():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1)),
                         nn.Linear(4, 2))


def test_select_layers_glob_regex_exclude():
    net = _toy()
    assert select_layers(net, ['1.*']) == ['1.0', '1.2']
    assert select_layers(net, ['re:1\\.\\d']) == ['1.0', '1.2']
    assert select_layers(net, ['*'], exclude=['0']) == ['1.0', '1.2', '2']


def test_select_layers_error_lists_candidates():
    with pytest.raises(ValueError) as e:
        select_layers(_toy(), ['body.*.conv1'])
    assert "'body.*.conv1' matches no" in str(e.value) and 'Candidate layers (4): 0, 1.0, 1.2, 2' in str(e.value)


def test_swap_layers_and_quantizer_state_keys():
    net = swap_layers(_toy(), ['1.0', '2'], 4, 4)
    assert isinstance(net[1][0], QConv2d) and isinstance(net[2], QLinear) and type(net[0]) is nn.Conv2d
    keys = quantizer_state_keys(net)
    assert '1.0.act_quant.upper_raw' in keys and '2.act_quant.initialized' in keys and '1.0.weight' not in keys


def test_core_imports_without_basicsr(tmp_path):
    """The quantization core is plain PyTorch: a copy of it imports and runs with no BasicSR around."""
    src = Path(__file__).resolve().parents[1] / 'odm_basicsr' / 'quant'
    shutil.copytree(src, tmp_path / 'qcore', ignore=shutil.ignore_patterns('__pycache__'))
    code = ('import sys, torch, qcore; n = qcore.QConv2d(3, 3, 3, w_bits=2, a_bits=2); n(torch.rand(1, 3, 4, 4)); '
            'assert "basicsr" not in sys.modules and "odm_basicsr" not in sys.modules; print("standalone-ok")')
    out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'standalone-ok' in out.stdout
