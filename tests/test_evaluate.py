"""``odm-eval``: checkpoints x benchmark sets, BasicSR's Y-channel PSNR / SSIM protocol."""
import csv
import os

import cv2
import numpy as np
import pytest
import torch
import yaml

from odm_basicsr.evaluate import main

SCALE = 2
EDSR = {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 1, 'upscale': SCALE}
QEDSR = {'type': 'Quantized', 'arch': EDSR, 'w_bits': 4, 'a_bits': 4}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_BENCH = os.path.join(REPO, '..', 'shared', 'data', 'benchmark')


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _make_benchmark(root, set_name='Tiny', sizes=((27, 23), (20, 30))):
    """HR images (one not a multiple of the scale, to exercise the crop) and MATLAB-bicubic LR images."""
    from basicsr.utils.matlab_functions import imresize

    rng = np.random.default_rng(0)
    hr_dir, lr_dir = os.path.join(root, set_name, 'HR'), os.path.join(root, set_name, f'LRbicx{SCALE}')
    os.makedirs(hr_dir)
    os.makedirs(lr_dir)
    for i, (h, w) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(yy / 3.0 + c) * np.cos(xx / 4.0 - c) for c in range(3)], -1) * 0.4 + 0.5
        hr = np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1)
        hr8 = (hr * 255).round().astype(np.uint8)
        hm, wm = h - h % SCALE, w - w % SCALE
        lr = imresize(hr8[:hm, :wm].astype(np.float64) / 255.0, 1 / SCALE)
        lr8 = (np.clip(lr, 0, 1) * 255).round().astype(np.uint8)
        cv2.imwrite(os.path.join(hr_dir, f'img{i}.png'), hr8)
        cv2.imwrite(os.path.join(lr_dir, f'img{i}.png'), lr8)
    return root


def _write_opt(path, net_opt):
    with open(path, 'w') as f:
        yaml.safe_dump({'name': 'eval_test', 'model_type': 'SRModel', 'scale': SCALE, 'network_g': net_opt}, f)
    return str(path)


def _net(net_opt):
    from copy import deepcopy

    from basicsr.archs import build_network

    torch.manual_seed(0)
    return build_network(deepcopy(net_opt)).eval()


def _reference_psnr(net, bench, set_name):
    """BasicSR's calculate_psnr on SR images computed here, independently of odm-eval."""
    from basicsr.metrics import calculate_psnr
    from basicsr.utils import img2tensor, tensor2img

    values = {}
    hr_dir = os.path.join(bench, set_name, 'HR')
    for f in sorted(os.listdir(hr_dir)):
        lr = cv2.imread(os.path.join(bench, set_name, f'LRbicx{SCALE}', f), cv2.IMREAD_COLOR)
        hr = cv2.imread(os.path.join(hr_dir, f), cv2.IMREAD_COLOR)
        hr = hr[:lr.shape[0] * SCALE, :lr.shape[1] * SCALE]
        with torch.no_grad():
            sr = tensor2img([net(img2tensor(lr.astype(np.float32) / 255.0).unsqueeze(0))])
        values[os.path.splitext(f)[0]] = calculate_psnr(sr, hr, crop_border=SCALE, test_y_channel=True)
    return values


def _read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def test_psnr_matches_basicsr_and_tables_written(tmp_path, capsys):
    bench = _make_benchmark(str(tmp_path / 'bench'))
    net = _net(EDSR)
    ckpt = tmp_path / 'tiny_edsr.pth'
    torch.save({'params': net.state_dict()}, ckpt)
    out = tmp_path / 'out'
    main(['-opt', _write_opt(tmp_path / 'net.yml', EDSR), '--checkpoint', str(ckpt), '--data', bench,
          '--sets', 'Tiny', '--out', str(out), '--save-images', '--device', 'cpu'])
    ref = _reference_psnr(net, bench, 'Tiny')

    per_image = _read_csv(out / 'eval_per_image.csv')
    assert [r['image'] for r in per_image] == ['img0', 'img1']
    for r in per_image:
        assert r['checkpoint'] == 'tiny_edsr' and r['set'] == 'Tiny'
        assert abs(float(r['psnr']) - ref[r['image']]) < 1e-6
    rows = _read_csv(out / 'eval.csv')
    assert len(rows) == 1
    assert rows[0]['checkpoint'] == 'tiny_edsr' and rows[0]['set'] == 'Tiny' and rows[0]['images'] == '2'
    assert abs(float(rows[0]['psnr']) - np.mean(list(ref.values()))) < 1e-6
    assert 0 < float(rows[0]['ssim']) <= 1
    md = (out / 'eval.md').read_text()
    assert '| tiny_edsr | Tiny |' in md and md.count('| tiny_edsr |') == 1
    assert '| tiny_edsr | Tiny |' in capsys.readouterr().out
    saved = sorted(os.listdir(out / 'tiny_edsr' / 'Tiny'))
    assert saved == ['img0.png', 'img1.png']
    assert cv2.imread(str(out / 'tiny_edsr' / 'Tiny' / 'img0.png')).shape == (26, 22, 3)

    # a network_g-only YAML, two checkpoints, two sets: one row per checkpoint x set
    _make_benchmark(bench, 'Tiny2', sizes=((16, 18),))
    ckpt2 = tmp_path / 'other.pth'
    torch.save({'params_ema': _net(EDSR).state_dict()}, ckpt2)
    net_only = tmp_path / 'net_only.yml'
    net_only.write_text(yaml.safe_dump(EDSR))
    out2 = tmp_path / 'out2'
    main(['-opt', str(net_only), '--checkpoint', str(ckpt), str(ckpt2), '--data', bench, '--sets', 'Tiny', 'Tiny2',
          '--out', str(out2), '--device', 'cpu'])
    rows = _read_csv(out2 / 'eval.csv')
    assert [(r['checkpoint'], r['set'], r['images']) for r in rows] == [
        ('tiny_edsr', 'Tiny', '2'), ('tiny_edsr', 'Tiny2', '1'), ('other', 'Tiny', '2'), ('other', 'Tiny2', '1')]
    assert len(_read_csv(out2 / 'eval_per_image.csv')) == 6


def test_quantized_checkpoint_initialised_evaluates_uninitialised_errors(tmp_path, capsys):
    bench = _make_benchmark(str(tmp_path / 'bench'), sizes=((16, 16),))
    opt = _write_opt(tmp_path / 'q.yml', QEDSR)

    net = _net(QEDSR)
    fresh = tmp_path / 'uninit.pth'
    torch.save({'params': net.state_dict()}, fresh)
    with torch.no_grad():
        net(torch.rand(1, 3, 8, 8))  # initialise the activation ranges
    calibrated = tmp_path / 'calibrated.pth'
    torch.save({'params': net.state_dict()}, calibrated)
    fp = tmp_path / 'fp.pth'
    torch.save({'params': _net(EDSR).state_dict()}, fp)

    out = tmp_path / 'out'
    main(['-opt', opt, '--checkpoint', str(calibrated), '--data', bench, '--sets', 'Tiny', '--out', str(out),
          '--device', 'cpu'])
    ref = _reference_psnr(net, bench, 'Tiny')
    rows = _read_csv(out / 'eval.csv')
    assert len(rows) == 1 and abs(float(rows[0]['psnr']) - ref['img0']) < 1e-6
    capsys.readouterr()

    for bad, words in ((fresh, 'uninitialised'), (fp, 'no quantizer state')):
        with pytest.raises(SystemExit) as e:
            main(['-opt', opt, '--checkpoint', str(bad), '--data', bench, '--sets', 'Tiny', '--out', str(out),
                  '--device', 'cpu'])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert words in err and str(bad) in err and len(err.strip().splitlines()) == 1


def test_user_errors_exit_2(tmp_path, capsys):
    bench = _make_benchmark(str(tmp_path / 'bench'), sizes=((16, 16),))
    ckpt = tmp_path / 'net.pth'
    torch.save({'params': _net(EDSR).state_dict()}, ckpt)
    opt = _write_opt(tmp_path / 'net.yml', EDSR)

    def fails(argv, *words):
        with pytest.raises(SystemExit) as e:
            main(argv + ['--out', str(tmp_path / 'out'), '--device', 'cpu'])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        for w in words:
            assert w in err, err

    base = ['-opt', opt, '--checkpoint', str(ckpt), '--data', bench]
    fails(base + ['--sets', 'Set99'], os.path.join(bench, 'Set99'), 'unknown set')
    fails(['-opt', opt, '--checkpoint', str(ckpt), '--data', str(tmp_path / 'nowhere'), '--sets', 'Tiny'],
          'benchmark folder not found', 'nowhere')
    fails(['-opt', opt, '--checkpoint', str(tmp_path / 'nope.pth'), '--data', bench, '--sets', 'Tiny'], 'nope.pth')
    fails(['-opt', str(tmp_path / 'nope.yml'), '--checkpoint', str(ckpt), '--data', bench, '--sets', 'Tiny'],
          'nope.yml')
    fails(base + ['--sets', 'Tiny', '--scale', '3'], 'LRbicx3')
    os.remove(os.path.join(bench, 'Tiny', 'HR', 'img0.png'))
    cv2.imwrite(os.path.join(bench, 'Tiny', 'HR', 'a.png'), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(os.path.join(bench, 'Tiny', 'HR', 'b.png'), np.zeros((8, 8, 3), np.uint8))
    fails(base + ['--sets', 'Tiny'], '2 HR images', '1 LR images')
    os.remove(os.path.join(bench, 'Tiny', 'HR', 'b.png'))
    os.rename(os.path.join(bench, 'Tiny', 'HR', 'a.png'), os.path.join(bench, 'Tiny', 'HR', 'img0.png'))
    other = tmp_path / 'other.pth'
    torch.save({'params': _net(dict(EDSR, num_feat=16)).state_dict()}, other)
    fails(['-opt', opt, '--checkpoint', str(other), '--data', bench, '--sets', 'Tiny'], 'does not fit', 'other.pth')


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_BENCH, 'Set5')), reason='no shared Set5')
def test_shared_set5_grey_and_colour_images_read(tmp_path):
    """A real Set14 grey image (bridge.png) is read as 3 channels; Set5 runs end to end with a tiny net."""
    from odm_basicsr.scoring import read_image

    bridge = os.path.join(SHARED_BENCH, 'Set14', 'HR', 'bridge.png')
    if os.path.isfile(bridge):
        assert read_image(bridge).shape[2] == 3
    ckpt = tmp_path / 'net.pth'
    torch.save({'params': _net(EDSR).state_dict()}, ckpt)
    out = tmp_path / 'out'
    main(['-opt', _write_opt(tmp_path / 'net.yml', EDSR), '--checkpoint', str(ckpt), '--data', SHARED_BENCH,
          '--sets', 'Set5', '--out', str(out), '--device', 'cpu'])
    rows = _read_csv(out / 'eval.csv')
    assert rows[0]['images'] == '5' and 5 < float(rows[0]['psnr']) < 60
