"""scripts/deploy_study.py end to end on a tiny EDSR and tiny generated data (CPU), and its calibration crops on the
shared training data."""
import json
import math
import os

import pytest
from odm_helpers import load_script, make_study_data, run_script

import odm_basicsr.plugin  # noqa: F401  (BasicSR fixes + registration first)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'scripts', 'deploy_study.py')
SHARED = os.path.join(ROOT, '..', 'shared', 'data')
SCALE = 2


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    """train/T91 (3 images), benchmark/Set5 and Set14 (2 images each, HR + LRbicx2), and a random-init FP EDSR
    (8 channels, 2 blocks, x2) with its option file."""
    import torch
    import yaml
    from basicsr.archs import build_network

    root = make_study_data(tmp_path_factory.mktemp('deploy_study_data'), SCALE, 3, (96, 112), (40, 48))
    arch = {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 2, 'upscale': SCALE}
    torch.manual_seed(0)
    torch.save({'params': build_network(dict(arch)).state_dict()}, root / 'edsr_fp.pth')
    with open(root / 'edsr_fp.yml', 'w', encoding='utf-8') as f:
        yaml.safe_dump({'scale': SCALE, 'network_g': arch}, f)
    return root


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_deploy_study_runs_and_resumes(tiny_data, tmp_path):
    out = tmp_path / 'study'
    args = ['--out', str(out), '--data', str(tiny_data), '--networks', 'edsr',
            '--edsr-opt', str(tiny_data / 'edsr_fp.yml'), '--edsr-checkpoint', str(tiny_data / 'edsr_fp.pth'),
            '--edsr-qat-iters', '2', '--bits', '2', '--arms', 'midrise_free', '--train-sets', 'T91',
            '--calib-set', 'T91', '--batch', '2', '--lr-patch', '16', '--latency-size', '0',
            '--exporter', 'torchscript']  # one QAT run and one export: fits the test-time budget
    first = run_script(SCRIPT, args, ROOT)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    lines = [json.loads(line) for line in first.stdout.splitlines() if line.startswith('{"run"')]
    assert [line['run'] for line in lines] == ['edsr_fp', 'edsr_w2_midrise_free_s0']  # one JSON line per run

    study = json.loads((out / 'study.json').read_text())
    assert study['fp']['edsr']['Set5'] > 0 and 'deploy_study.py' in study['command']
    assert study['machine']['summary'] and study['date']
    (run,) = study['runs']
    assert (run['network'], run['bits'], run['arm'], run['seed']) == ('edsr', 2, 'midrise_free', 0)
    assert run['network_g']['act_grid'] == 'free' and run['network_g']['weight_grid'] == 'midrise'
    e = run['export']
    assert e['command'].startswith('odm-export ') and '--output-quant auto' in e['command']
    assert e['quantized_layers'] == 4 and e['added_output_quantizers'] == 2  # conv2 of each block feeds an addition
    assert e['onnxruntime']['integer_convs'] == e['onnxruntime']['quantized_convs'] == 4
    assert e['sizes']['compact'] < e['sizes']['fp32_checkpoint'] and e['compact_reload_bit_identical']
    assert _finite(e['max_nudge_steps']) and 0 <= e['max_nudge_steps'] <= 0.5
    for set_name in ('Set5', 'Set14'):
        for step in ('calib', 'qat', 'deploy_trained_outq'):
            assert _finite(run[step][set_name]), (step, run[step])
        p = e['parity'][set_name]
        for key in ('psnr_trained', 'psnr_deploy', 'psnr_onnxruntime', 'ort_vs_deploy_psnr',
                    'ort_vs_deploy_within_1'):
            assert _finite(p[key]), (key, p)
        assert 0.0 <= p['ort_vs_deploy_within_1'] <= 1.0
        assert p['psnr_trained'] == pytest.approx(run['qat'][set_name], abs=1e-6)  # same network, same pipeline
    assert run['qat']['iters'] == 2 and run['qat']['train_wall_s'] > 0
    assert any(r['comparison'].startswith('nudging at export') for r in study['summary'])
    md = (out / 'study.md').read_text()
    assert '| edsr | W2A2 | midrise_free |' in md and '## Paired comparisons' in md
    assert len(list((out / 'calib_lr' / f'x{SCALE}').glob('*.png'))) == 3  # every T91 image once (< 8 there)

    second = run_script(SCRIPT, args, ROOT)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert 'training:' not in second.stdout and '[edsr_w2_midrise_free_s0] skipped' in second.stdout
    again = json.loads((out / 'study.json').read_text())
    assert again['runs'] == study['runs']


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, 'train', 'BSD200')),
                    reason=f'shared training data not found at {SHARED} (../shared/data from the repo root)')
def test_calibration_crops_from_bsd200(tmp_path):
    import cv2

    deploy_study = load_script('deploy_study')
    folder = deploy_study.make_calib_crops(SHARED, 'BSD200', 4, str(tmp_path / 'x4'), n=3)
    files = sorted(os.listdir(folder))
    assert files == ['calib_00.png', 'calib_01.png', 'calib_02.png']
    for f in files:
        img = cv2.imread(os.path.join(folder, f))
        assert img.shape == (deploy_study.EXPORT_CALIB_LR, deploy_study.EXPORT_CALIB_LR, 3)  # 320 px HR crops
    assert deploy_study.make_calib_crops(SHARED, 'BSD200', 4, folder, n=3) == folder  # kept, not remade
