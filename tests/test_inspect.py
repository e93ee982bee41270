"""``odm-inspect``: per-layer statistics checked against references computed here from hooks and numpy."""
import json
import os
from copy import deepcopy

import cv2
import numpy as np
import pytest
import torch
import yaml
from odm_helpers import TINY_EDSR

from odm_basicsr.inspect_layers import Subsample, main

SCALE = TINY_EDSR['upscale']
BITS = 4
HAND_SET = 'body.0.conv2'  # activation range set by hand
SHIFTED = 'body.1.conv1'  # carries a shift offset
ORDER = ['body.0.conv1', 'body.0.conv2', 'body.1.conv1', 'body.1.conv2']


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _write_images(folder, sizes=((12, 10), (9, 14), (11, 11))):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(yy / 2.0 + c) * np.cos(xx / 3.0 - c) for c in range(3)], -1) * 0.4 + 0.5
        img = np.clip(base + rng.normal(0, 0.08, base.shape), 0, 1)
        cv2.imwrite(os.path.join(folder, f'im{i}.png'), (img * 255).round().astype(np.uint8))
    return folder


def _inputs(folder):
    """RGB [0, 1] (1, 3, H, W) tensors, read here with cv2 (not through the tool)."""
    out = []
    for f in sorted(os.listdir(folder)):
        bgr = cv2.imread(os.path.join(folder, f), cv2.IMREAD_COLOR)
        out.append(torch.from_numpy(bgr[:, :, ::-1].astype(np.float32) / 255.0).permute(2, 0, 1)[None].contiguous())
    return out


def _write_opt(path, net_opt):
    with open(path, 'w') as f:
        yaml.safe_dump({'name': 'inspect_test', 'scale': SCALE, 'network_g': net_opt}, f)
    return str(path)


def _build(net_opt, seed=0):
    from basicsr.archs import build_network

    torch.manual_seed(seed)
    return build_network(deepcopy(net_opt)).eval()


def _fp_inputs(state, inputs, names):
    """Each named layer's input per image, from hooks on a plain BasicSR EDSR holding the FP weights of ``state``."""
    from basicsr.archs.edsr_arch import EDSR

    fp = EDSR(**{k: v for k, v in TINY_EDSR.items() if k != 'type'}).eval()
    fp.load_state_dict({k: v for k, v in state.items() if k in fp.state_dict()}, strict=True)
    seen = {n: [] for n in names}
    modules = dict(fp.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach().clone()))
               for n in names]
    with torch.no_grad():
        for x in inputs:
            fp(x)
    for h in handles:
        h.remove()
    return {n: [t.double().numpy() for t in v] for n, v in seen.items()}


def _np_fake_quant(x, lo, hi, bits):
    step = (hi - lo) / (2**bits - 1)
    return np.round((np.clip(x, lo, hi) - lo) / step) * step + lo


def _np_fake_quant_aligned(x, lo, hi, bits):
    """The zero-aligned activation grid (``act_grid: aligned``, the default): same step, ``low = round(lo / step)``;
    numpy rounds half to even, as torch does."""
    step = (hi - lo) / (2**bits - 1)
    low = np.round(lo / step)
    return np.clip(np.round(x / step), low, low + 2**bits - 1) * step


def _sqnr(x, xq):
    return 10 * np.log10(np.sum(x**2) / np.sum((x - xq) ** 2))


def _run(argv, capsys):
    main(argv)
    return capsys.readouterr().out


@pytest.fixture
def quantized_case(tmp_path):
    """A calibrated tiny quantized EDSR (maxabs weight ranges) with a shift offset on SHIFTED and a hand-set
    activation range on HAND_SET, saved as an odm-train checkpoint would be (``params`` only here)."""
    from odm_basicsr.quant import attach_offsets, calibrate, calibration, collect_channel_stats, quantized_layers

    data = _write_images(str(tmp_path / 'lr'))
    inputs = _inputs(data)
    q_opt = {'type': 'Quantized', 'arch': dict(TINY_EDSR), 'w_bits': BITS, 'a_bits': BITS, 'weight_range': 'maxabs'}
    net = _build(q_opt)
    with calibration(net):
        stats = collect_channel_stats(net, inputs, layers=[SHIFTED])
    attach_offsets(net, {SHIFTED: 'shift'}, stats)
    calibrate(net, inputs, mode='fp')
    fp_in = _fp_inputs(net.state_dict(), inputs, [HAND_SET])[HAND_SET]
    allv = np.concatenate([x.ravel() for x in fp_in])
    layer = dict(quantized_layers(net))[HAND_SET]
    layer.act_quant.set_range(float(np.percentile(allv, 10)), float(np.percentile(allv, 80)))
    ckpt = str(tmp_path / 'q_edsr.pth')
    torch.save({'params': net.state_dict()}, ckpt)
    return {'net': net, 'data': data, 'inputs': inputs, 'opt': _write_opt(tmp_path / 'q.yml', q_opt), 'ckpt': ckpt,
            'tmp': tmp_path}


def test_quantized_checkpoint_against_hook_and_numpy_references(quantized_case, capsys):
    from odm_basicsr.quant import quantized_layers

    c = quantized_case
    out = str(c['tmp'] / 'out')
    stdout = _run(['-opt', c['opt'], '--checkpoint', c['ckpt'], '--data', c['data'], '--out', out], capsys)
    for f in ('layers.md', 'layers.json', 'layers.png'):
        assert os.path.isfile(os.path.join(out, f))
    with open(os.path.join(out, 'layers.json')) as f:
        report = json.load(f)
    rows = {r['layer']: r for r in report['layers']}
    assert [r['layer'] for r in report['layers']] == ORDER  # forward order
    assert report['settings']['calibrated_here'] is False and report['settings']['param_key'] == 'params'
    assert report['settings']['percentiles_exact'] is True
    assert '| 1 | body.0.conv2 | W4A4 |' in stdout and '| 2 | body.1.conv1 | W4A4 | shift |' in stdout

    layers = dict(quantized_layers(c['net']))
    state = c['net'].state_dict()
    fp_in = _fp_inputs(state, c['inputs'], ORDER)
    # ranges are reported as stored, never recalibrated by the tool
    for name in ORDER:
        q = layers[name].act_quant
        assert rows[name]['lower'] == pytest.approx(float(q.lower.detach()), rel=1e-6, abs=1e-9)
        assert rows[name]['upper'] == pytest.approx(float(q.upper.detach()), rel=1e-6, abs=1e-9)

    # hand-set layer: clipped fraction, input SQNR, percentiles, variance, mismatch scores
    lo, hi = float(layers[HAND_SET].act_quant.lower.detach()), float(layers[HAND_SET].act_quant.upper.detach())
    xs = fp_in[HAND_SET]
    allv = np.concatenate([x.ravel() for x in xs])
    r = rows[HAND_SET]
    assert r['clipped'] == pytest.approx(np.mean((allv < lo) | (allv > hi)), abs=1e-12)
    assert r['clipped_low'] == pytest.approx(np.mean(allv < lo), abs=1e-12)
    assert r['clipped_high'] == pytest.approx(np.mean(allv > hi), abs=1e-12)
    assert 0.15 < r['clipped'] < 0.35  # the 10th..80th percentile range (ReLU zeros: p10 may be 0, unclipped)
    assert r['input_sqnr_db'] == pytest.approx(_sqnr(allv, _np_fake_quant_aligned(allv, lo, hi, BITS)), abs=0.01)
    assert r['min'] == pytest.approx(allv.min(), rel=1e-6) and r['max'] == pytest.approx(allv.max(), rel=1e-6)
    for p in (1.0, 50.0, 99.0):
        assert r['percentiles'][f'p{p:g}'] == pytest.approx(np.percentile(allv, p), rel=1e-5, abs=1e-5)
    per_channel = np.concatenate([x[0].reshape(x.shape[1], -1) for x in xs], axis=1)  # (C, all pixels)
    assert r['variance'] == pytest.approx(per_channel.var(axis=1).mean(), rel=1e-6)
    per_image = np.mean([x[0].reshape(x.shape[1], -1).var(axis=1).mean() for x in xs])
    assert r['variance_per_image_mean'] == pytest.approx(per_image, rel=1e-5)
    mu, sigma = per_channel.mean(axis=1), per_channel.std(axis=1)
    assert r['mismatch_shift'] == pytest.approx(mu.std() / sigma.mean(), rel=1e-6)
    assert r['mismatch_scale'] == pytest.approx(sigma.std() / sigma.mean(), rel=1e-6)

    # weight SQNR by hand: symmetric maxabs range [-u, u] on 2**BITS levels
    w = state[f'{HAND_SET}.weight'].double().numpy()
    u = np.abs(w).max()
    assert r['weight_sqnr_db'] == pytest.approx(_sqnr(w, _np_fake_quant(w, -u, u, BITS)), abs=1e-3)

    # shift-offset layer: the quantizer sees x - delta; clipping counted there, SQNR of q(x - delta) + delta
    delta = layers[SHIFTED].offset.delta.detach().double().numpy()
    lo, hi = float(layers[SHIFTED].act_quant.lower.detach()), float(layers[SHIFTED].act_quant.upper.detach())
    xs = np.concatenate([x.ravel() for x in fp_in[SHIFTED]])
    qin = np.concatenate([(x - delta.reshape(1, -1, 1, 1)).ravel() for x in fp_in[SHIFTED]])
    r = rows[SHIFTED]
    assert r['offset'] == 'shift'
    assert r['clipped'] == pytest.approx(np.mean((qin < lo) | (qin > hi)), abs=1e-12)
    assert r['input_sqnr_db'] == pytest.approx(_sqnr(xs, _np_fake_quant_aligned(qin, lo, hi, BITS) + (xs - qin)),
                                               abs=0.01)
    assert r['quantizer_input']['min'] == pytest.approx(qin.min(), rel=1e-5, abs=1e-5)


def test_fp_checkpoint_is_wrapped_and_calibrated_and_figure_written(tmp_path, capsys):
    from PIL import Image

    from odm_basicsr.quant import calibrate, quantized_layers

    root = tmp_path / 'Tiny'
    _write_images(str(root / f'LRbicx{SCALE}'))
    (root / 'HR').mkdir()
    fp = _build(TINY_EDSR)
    ckpt = str(tmp_path / 'edsr_fp.pth')
    torch.save({'params': fp.state_dict()}, ckpt)
    opt = _write_opt(tmp_path / 'fp.yml', dict(TINY_EDSR))
    out = str(tmp_path / 'out')
    stdout = _run(['-opt', opt, '--checkpoint', ckpt, '--data', str(root), '--bits', '3', '--images', '2',
                   '--out', out], capsys)
    with open(os.path.join(out, 'layers.json')) as f:
        report = json.load(f)
    s = report['settings']
    assert s['calibrated_here'] is True and s['bits'] == 3 and s['layers'] == 'default'
    assert len(s['images']) == 2 and s['data'].endswith(f'LRbicx{SCALE}')
    assert [r['layer'] for r in report['layers']] == ORDER
    assert all(r['w_bits'] == 3 and r['a_bits'] == 3 for r in report['layers'])
    # reference: the same wrapper, FP-calibrated here on the same two images
    ref = _build({'type': 'Quantized', 'arch': dict(TINY_EDSR), 'w_bits': 3, 'a_bits': 3}, seed=1)
    ref.load_state_dict(fp.state_dict(), strict=False)
    calibrate(ref, _inputs(str(root / f'LRbicx{SCALE}'))[:2], mode='fp')
    rows = {r['layer']: r for r in report['layers']}
    for name, m in quantized_layers(ref):
        assert rows[name]['lower'] == pytest.approx(float(m.act_quant.lower.detach()), rel=1e-5, abs=1e-6)
        assert rows[name]['upper'] == pytest.approx(float(m.act_quant.upper.detach()), rel=1e-5, abs=1e-6)
    with open(os.path.join(out, 'layers.md')) as f:
        md = f.read()
    table = [line for line in md.splitlines() if line.startswith('|')]
    assert len(table) == 2 + len(ORDER) and table[0] in stdout
    with Image.open(os.path.join(out, 'layers.png')) as im:
        im.verify()
    with Image.open(os.path.join(out, 'layers.png')) as im:
        assert im.format == 'PNG' and 600 <= im.width <= 4000 and 500 <= im.height <= 2000
        pixels = np.asarray(im.convert('L'), dtype=np.float64)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # drawn on, not blank


def test_default_out_folder_is_checkpoint_stem(quantized_case, capsys, monkeypatch):
    c = quantized_case
    monkeypatch.chdir(c['tmp'])
    _run(['-opt', c['opt'], '--checkpoint', c['ckpt'], '--data', c['data'], '--images', '1'], capsys)
    assert sorted(os.listdir(c['tmp'] / 'inspect' / 'q_edsr')) == ['layers.json', 'layers.md', 'layers.png']


def test_errors_are_one_line(quantized_case, capsys):
    c, tmp = quantized_case, quantized_case['tmp']
    fp_opt = _write_opt(tmp / 'fp.yml', dict(TINY_EDSR))
    fp_ckpt = str(tmp / 'fp.pth')
    torch.save({'params': _build(TINY_EDSR).state_dict()}, fp_ckpt)
    wide = str(tmp / 'wide.pth')
    torch.save({'params': _build(dict(TINY_EDSR, num_feat=16)).state_dict()}, wide)
    uncal = str(tmp / 'uncalibrated.pth')
    torch.save({'params': _build({'type': 'Quantized', 'arch': dict(TINY_EDSR)}).state_dict()}, uncal)
    (tmp / 'empty').mkdir()
    base = ['--out', str(tmp / 'err_out')]
    cases = [
        (['-opt', str(tmp / 'nope.yml'), '--checkpoint', c['ckpt'], '--data', c['data']], 'option file not found'),
        (['-opt', c['opt'], '--checkpoint', str(tmp / 'nope.pth'), '--data', c['data']], 'checkpoint file not found'),
        (['-opt', c['opt'], '--checkpoint', c['ckpt'], '--data', str(tmp / 'nope')], 'data folder not found'),
        (['-opt', c['opt'], '--checkpoint', c['ckpt'], '--data', str(tmp / 'empty')], 'no images'),
        (['-opt', fp_opt, '--checkpoint', wide, '--data', c['data']], 'does not fit'),
        (['-opt', fp_opt, '--checkpoint', c['ckpt'], '--data', c['data']], 'a quantized checkpoint?'),
        (['-opt', c['opt'], '--checkpoint', fp_ckpt, '--data', c['data']], 'no quantizer state'),
        (['-opt', c['opt'], '--checkpoint', uncal, '--data', c['data']], 'uninitialised'),
        (['-opt', c['opt'], '--checkpoint', c['ckpt'], '--data', c['data'], '--bits', '2'], 'only apply to a plain'),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as e:
            main(argv + base)
        assert e.value.code == 2, argv
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('odm-inspect: error: ') and expected in lines[0], err
    assert not os.path.exists(tmp / 'err_out')


def test_subsample_bounded_deterministic_and_unbiased():
    def run():
        s = Subsample(1000, seed=3)
        for n in (300, 4000, 2500, 3200):
            s.add(torch.arange(n, dtype=torch.float32) / n)  # each chunk uniform on [0, 1)
        return s

    a, b = run(), run()
    assert 500 <= a.size <= 1000 and a.describe()['of'] == 10000 and not a.describe()['exact']
    assert np.array_equal(a.values(), b.values())
    assert abs(float(np.mean(a.values())) - 0.5) < 0.05
    exact = Subsample(1000)
    exact.add(torch.ones(10, 10))
    assert exact.describe()['exact'] and exact.size == 100


def test_console_script_registered():
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group='console_scripts')}
    assert scripts.get('odm-inspect') == 'odm_basicsr.inspect_layers:main'
