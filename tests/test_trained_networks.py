"""Calibration and QAT on trained networks: FP calibration, range checks, every preset at W2A2, the real RLFN.

The RLFN tests use the published checkpoint ``../shared/data/pretrained/RLFN_cut_x4_ntire22.pth`` and skip where
the shared folder is absent.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from basicsr.archs import build_network
from basicsr.utils.matlab_functions import imresize
from odm_helpers import TINY

from odm_basicsr import evaluate as ev
from odm_basicsr.checkpoint import load_checkpoint, select_state_dict
from odm_basicsr.quant import CalibrationError, calibrate, quantized_layers
from odm_basicsr.quant.calibration import check_ranges

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared' / 'data'
CKPT = SHARED / 'pretrained' / 'RLFN_cut_x4_ntire22.pth'
needs_rlfn = pytest.mark.skipif(not (CKPT.is_file() and (SHARED / 'benchmark' / 'Set5').is_dir()
                                     and (SHARED / 'train' / 'BSD200').is_dir()),
                                reason=f'{CKPT} or the shared benchmark/train images are absent (they sit beside '
                                'the project on team machines; see ../shared/data)')


def _ranges(net):
    return [(name, float(m.act_quant.lower.detach()), float(m.act_quant.upper.detach()))
            for name, m in quantized_layers(net) if m.act_quant is not None]


# --------------------------------------------------------------------------------------------------- FP calibration
def _chain():
    """conv0 (FP) -> ReLU -> conv1 (W2A8) -> ReLU -> conv2 (W2A8); returns the quantized net and an FP copy."""
    import copy

    from odm_basicsr.quant import swap_layers
    torch.manual_seed(3)
    fp = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
                             torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1))
    net = copy.deepcopy(fp)
    swap_layers(net, ['2', '4'], 2, 8, {'init': 'minmax'}, {'range_method': 'maxabs'})
    return net, fp


def test_fp_calibration_sees_the_fp_network():
    net, fp = _chain()
    x = torch.rand(2, 3, 10, 10)
    with torch.no_grad():
        h1 = fp[1](fp[0](x))
        h2 = fp[3](fp[2](h1))
    calibrate(net, [x], mode='fp')
    (_, l1, u1), (_, l2, u2) = _ranges(net)
    assert (l1, u1) == pytest.approx((float(h1.min()), float(h1.max())), rel=1e-6, abs=1e-7)
    assert (l2, u2) == pytest.approx((float(h2.min()), float(h2.max())), rel=1e-6, abs=1e-7)
    assert all(m.weight_quant.enabled for _, m in quantized_layers(net))  # enabled again afterwards


def test_sequential_calibration_uses_quantized_earlier_layers():
    from odm_basicsr.quant import fake_quantize
    net, fp = _chain()
    x = torch.rand(2, 3, 10, 10)
    calibrate(net, [x], mode='sequential')
    (_, l1, u1), (_, l2, u2) = _ranges(net)
    with torch.no_grad():
        h1 = fp[1](fp[0](x))
        # by hand: layer 1 quantizes its input on [l1, u1] with 8 bits and its weight on 4 levels of max |W|
        w = fp[2].weight
        u = w.abs().max()
        w_q = torch.round((w.clamp(-u, u) + u) / (2 * u / 3)) * (2 * u / 3) - u
        h2 = torch.relu(torch.nn.functional.conv2d(fake_quantize(h1, torch.tensor(l1), torch.tensor(u1), 8), w_q,
                                                   fp[2].bias, padding=1))
    assert (l1, u1) == pytest.approx((float(h1.min()), float(h1.max())), rel=1e-6, abs=1e-7)
    assert (l2, u2) == pytest.approx((float(h2.min()), float(h2.max())), rel=1e-5, abs=1e-6)
    with torch.no_grad():
        assert abs(u2 - float(fp[3](fp[2](h1)).max())) > 1e-3  # and that differs from the FP input's range


def test_sequential_differs_from_fp_where_quantization_changes_the_input():
    torch.manual_seed(0)
    net = build_network({'type': 'Quantized', 'arch': {'type': 'EDSR', **TINY['EDSR'](2)}, 'w_bits': 2, 'a_bits': 2,
                         'layers': 'all'})
    x = [torch.rand(2, 3, 12, 12)]
    calibrate(net, x, 'fp')
    fp = _ranges(net)
    calibrate(net, x, 'sequential')
    seq = _ranges(net)
    assert fp[0][1:] == pytest.approx(seq[0][1:], rel=1e-5)  # the first quantized layer's input is FP in both modes
    assert any(abs(a[2] - b[2]) > 1e-3 * abs(a[2]) for a, b in zip(fp[1:], seq[1:]))
    # calibration leaves the weight quantizers enabled
    assert all(m.weight_quant.enabled for _, m in quantized_layers(net))


def test_non_finite_range_is_refused_with_the_layer_named():
    net = build_network({'type': 'Quantized', 'arch': {'type': 'EDSR', **TINY['EDSR'](2)}, 'w_bits': 4, 'a_bits': 4})
    x = torch.rand(1, 3, 8, 8)
    x[0, 0, 0, 0] = float('nan')
    with pytest.raises(CalibrationError, match=r"layer 'body\.0\.conv1' the range \[.*nan\] \(a_bits=4, "
                       r"statistic 'percentile'\).*FP network itself produces non-finite values"):
        calibrate(net, [x])
    with pytest.raises(ValueError, match='mode must be one of'):
        calibrate(net, [x], mode='quantized')


def test_mse_range_beats_minmax_and_percentile_on_a_heavy_tail():
    from odm_basicsr.quant import fake_quantize, mse_range, mse_symmetric_range, percentile
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=g).relu(), torch.tensor([60.0])])  # ReLU output with an outlier
    lower, upper = mse_range(x, 2)
    assert float(lower) == 0.0  # a ReLU output keeps lower = 0 exactly

    def err(lo, hi):
        return float((fake_quantize(x, torch.tensor(float(lo)), torch.tensor(float(hi)), 2) - x).square().sum())

    assert err(lower, upper) < err(x.min(), x.max())
    assert err(lower, upper) < err(percentile(x, 1), percentile(x, 99))
    # brute force over a fine grid: the search is within 2 % of the best error
    best = min(err(0, u) for u in np.linspace(0.05, 6, 600))
    assert err(lower, upper) <= 1.02 * best
    w = torch.randn(4, 100, generator=g)
    u = mse_symmetric_range(w, 3)
    assert u.shape == (4,) and (u <= w.abs().amax(1)).all() and (u > 0.3 * w.abs().amax(1)).all()


# --------------------------------------------------------------------------------------- every preset at W2A2
@pytest.mark.parametrize('layers', ['default', 'all'])
@pytest.mark.parametrize('arch', sorted(TINY))
def test_every_preset_calibrates_finite_at_w2a2(arch, layers):
    torch.manual_seed(0)
    scale = 2
    kwargs = TINY[arch](scale)
    net = build_network({'type': 'Quantized', 'arch': {'type': arch, **kwargs}, 'w_bits': 2, 'a_bits': 2,
                         'layers': layers})
    net.eval()
    batches = [torch.rand(2, 3, 16, 16) for _ in range(2)]
    calibrate(net, batches)
    for name, lower, upper in _ranges(net):
        assert np.isfinite([lower, upper]).all() and lower < upper, name
    with torch.no_grad():
        out = net(batches[0])
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------ the real RLFN
def _rlfn_batches(n=4, batch=8, lr_patch=32, seed=0):
    import cv2
    rng = np.random.default_rng(seed)
    paths = sorted((SHARED / 'train' / 'BSD200').glob('*.png'))
    out = []
    for _ in range(n):
        patches = []
        for _ in range(batch):
            img = cv2.imread(str(paths[rng.integers(len(paths))]), cv2.IMREAD_COLOR)[:, :, ::-1] / 255.0
            y, x = rng.integers(img.shape[0] - 4 * lr_patch), rng.integers(img.shape[1] - 4 * lr_patch)
            lr = imresize(img[y:y + 4 * lr_patch, x:x + 4 * lr_patch], 0.25)
            patches.append(torch.from_numpy(np.clip(np.round(lr * 255), 0, 255).transpose(2, 0, 1) / 255).float())
        out.append(torch.stack(patches))
    return out


def _rlfn(bits, layers='default'):
    state = select_state_dict(load_checkpoint(str(CKPT)), source=str(CKPT))[1]
    net = build_network({'type': 'Quantized', 'arch': {'type': 'RLFN', 'upscale': 4}, 'w_bits': bits,
                         'a_bits': bits, 'layers': layers})
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert not unexpected and all('quant' in k for k in missing)
    return net.eval()


def _set5_psnr(net):
    pairs = ev.list_pairs(str(SHARED / 'benchmark'), 'Set5', 4)
    rows = ev.evaluate_set(net, pairs, 4, torch.device('cpu'))
    return sum(r[1] for r in rows) / len(rows)


@needs_rlfn
def test_rlfn_w8a8_calibration_alone_is_within_0p2_db_of_fp():
    net = _rlfn(8)
    calibrate(net, _rlfn_batches())
    assert _set5_psnr(net) > 32.0983 - 0.2  # the published FP Set5 PSNR (pretrained/README.md)


@needs_rlfn
@pytest.mark.parametrize('bits, mode, layers', [(4, 'fp', 'all'), (2, 'fp', 'all'), (2, 'sequential', 'default')])
def test_rlfn_low_bit_calibration_is_finite(bits, mode, layers):
    net = _rlfn(bits, layers)
    batches = _rlfn_batches(n=1, batch=4, lr_patch=24)
    calibrate(net, batches, mode)
    ranges = _ranges(net)
    # all: every conv but fea_conv and upsampler.0 (ESA convs included); default: the 3x3 convs of the 4 blocks
    assert len(ranges) == (37 if layers == 'all' else 12)
    assert all(np.isfinite([lo, hi]).all() and lo < hi for _, lo, hi in ranges)
    if mode == 'fp':  # the FP network's layer inputs stay at the scale of a few hundred (0-255 features)
        assert max(hi for _, _, hi in ranges) < 2000
    with torch.no_grad():
        assert torch.isfinite(net(batches[0])).all()
    check_ranges(net)


@needs_rlfn
def test_rlfn_short_w2a2_qat_on_all_layers_stays_finite():
    from odm_helpers import odm_opt

    from odm_basicsr.models.odm_model import ODMModel
    opt = odm_opt('off', lr=1e-4)
    opt['scale'] = 4
    opt['datasets']['train'].update(scale=4, gt_size=64, batch_size_per_gpu=4)
    opt['network_g'] = {'type': 'Quantized', 'arch': {'type': 'RLFN', 'upscale': 4}, 'w_bits': 2, 'a_bits': 2,
                        'layers': 'all'}
    opt['path'].update(pretrain_network_g=str(CKPT), param_key_g=None)
    model = ODMModel(opt)
    batches = _rlfn_batches(n=6, batch=4, lr_patch=16, seed=1)
    gts = [torch.nn.functional.interpolate(b, scale_factor=4, mode='bicubic') for b in batches]
    losses = []
    for it, (lq, gt) in enumerate(zip(batches, gts), start=1):
        model.feed_data({'lq': lq, 'gt': gt.clamp(0, 1)})
        model.optimize_parameters(it)
        losses.append(float(model.log_dict['l_pix']))
    assert np.isfinite(losses).all() and model.nonfinite_steps == 0
    assert all(torch.isfinite(p).all() for p in model.net_g.parameters())
