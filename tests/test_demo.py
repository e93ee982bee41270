import odm_basicsr  # noqa: F401, I001  (must precede any basicsr import)

# ``odm-demo`` end to end with tiny settings (real training subprocesses on CPU), its re-run and its flags.
import json
import math
import time

import cv2
import numpy as np
import pytest

from odm_basicsr import demo

pytestmark = pytest.mark.slow

TINY = ['--fp-iters', '6', '--qat-iters', '4', '--bits', '4', '--num-feat', '8', '--num-block', '1',
        '--device', 'cpu']


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo')
    start = time.time()
    assert demo.main(['--out', str(out)] + TINY) == 0
    return out, time.time() - start


def test_demo_trains_every_stage_and_reports_them(tiny_run, capsys):
    out, _ = tiny_run
    results = json.loads((out / 'results.json').read_text())
    stages = {r['stage']: r for r in results['stages']}
    assert list(stages) == ['fp', 'w4_baseline', 'w4_odm']
    assert [(r['method'], r['bits']) for r in results['stages']] == [('fp', 32), ('baseline', 4), ('odm', 4)]
    for r in [results['bicubic']] + results['stages']:
        assert math.isfinite(r['psnr']) and 10.0 < r['psnr'] < 60.0, r
        assert 0.0 < r['ssim'] <= 1.0, r
    for r in results['stages']:
        assert r['skipped'] is False and r['train_wall_s'] > 0 and r['iters'] == (6 if r['method'] == 'fp' else 4)
        # evaluation in this process == BasicSR's own final validation in the run's log
        assert abs(r['psnr'] - r['log_psnr']) < 0.01 and abs(r['ssim'] - r['log_ssim']) < 1e-3, r
    assert results['settings']['var_weight'] == demo.DEFAULT_VAR_WEIGHT
    assert 'torch' in results['machine'] and results['command'].startswith('odm-demo --out')

    md = (out / 'results.md').read_text()
    for method in ('bicubic', 'fp', 'baseline', 'odm'):
        assert f'| {method} |' in md

    # the stages really were configured as the study needs
    import yaml
    base = yaml.safe_load((out / 'options' / 'w4_baseline.yml').read_text())
    odm = yaml.safe_load((out / 'options' / 'w4_odm.yml').read_text())
    assert base['train']['cooperation'] == 'off' and 'var_opt' not in base['train']
    assert 'offsets' not in base['network_g']
    assert odm['train']['cooperation'] == 'feature' and odm['network_g']['offsets'] == demo.OFFSETS
    assert odm['train']['var_opt'] == {'type': 'FeatureVarianceLoss', 'loss_weight': demo.DEFAULT_VAR_WEIGHT,
                                       'reduction': 'channel'}
    for opt in (base, odm):
        assert opt['path']['pretrain_network_g'] == 'experiments/fp/models/net_g_latest.pth'
        assert opt['model_type'] == 'ODMModel' and opt['logger']['use_tb_logger'] is True
        del opt['name'], opt['train']['cooperation']
        opt['train'].pop('var_opt', None), opt['network_g'].pop('offsets', None)
    assert base == odm  # identical in everything else
    assert (out / 'tb_logger' / 'w4_odm').is_dir()
    odm_log = next((out / 'experiments' / 'w4_odm').glob('train_*.log')).read_text()
    assert 'Distribution mismatch (shift / scale) and offsets' in odm_log
    assert 'quantizer entries are not in' in odm_log  # the FP checkpoint was loaded into the quantized net


def test_demo_comparison_png_has_four_panels(tiny_run):
    out, _ = tiny_run
    img = cv2.imread(str(out / 'comparison_w4.png'))
    assert img is not None
    panel = demo.CROP * demo.ZOOM
    assert img.shape == (demo.LABEL_H + panel, demo.PANELS * panel + (demo.PANELS - 1) * demo.GAP, 3)
    # label strips are white with dark text; the panels differ from each other
    strip = img[:demo.LABEL_H, :panel]
    assert (strip == 255).mean() > 0.5 and strip.min() < 100
    tiles = [img[demo.LABEL_H:, i * (panel + demo.GAP):i * (panel + demo.GAP) + panel] for i in range(4)]
    assert not np.array_equal(tiles[0], tiles[1])


def test_demo_rerun_skips_finished_stages(tiny_run, capsys):
    out, first = tiny_run
    before = json.loads((out / 'results.json').read_text())
    capsys.readouterr()
    start = time.time()
    assert demo.main(['--out', str(out)] + TINY) == 0
    second = time.time() - start
    printed = capsys.readouterr().out
    for name in ('fp', 'w4_baseline', 'w4_odm'):
        assert f'[{name}] skipped' in printed
    assert '] iter ' not in printed and 'training:' not in printed
    assert second < first / 2, (first, second)
    for line in ('bicubic', 'fp ', 'baseline', 'odm '):
        assert any(row.startswith(line) for row in printed.splitlines()), line
    after = json.loads((out / 'results.json').read_text())
    assert [r['psnr'] for r in after['stages']] == [r['psnr'] for r in before['stages']]
    assert [r['train_wall_s'] for r in after['stages']] == [r['train_wall_s'] for r in before['stages']]
    assert all(r['skipped'] for r in after['stages'])
    assert after['reused_stages'] == ['fp', 'w4_baseline', 'w4_odm'] and before['reused_stages'] == []
    assert 'reused from an earlier run' in (out / 'results.md').read_text()


def test_demo_refuses_to_reuse_a_stage_trained_with_other_settings(tiny_run):
    out, _ = tiny_run
    args = list(TINY)
    args[args.index('--qat-iters') + 1] = '5'
    with pytest.raises(SystemExit, match='w4_baseline .* was trained with other settings.*train.total_iter'):
        demo.main(['--out', str(out)] + args)


@pytest.mark.parametrize('argv,message', [
    (['--bits', '9'], 'a bit width is an integer in 2..8'),
    (['--bits', 'four'], 'a bit width is an integer in 2..8'),
    (['--scale', '5'], "invalid choice: 5"),
    (['--fp-iters', '0'], 'expected a positive integer'),
    (['--var-weight=-1e-6'], 'expected a positive finite number'),
    (['--var-weight', '0'], 'expected a positive finite number'),
    (['--var-weight', 'nan'], 'expected a positive finite number'),
    (['--device', 'tpu'], "invalid choice: 'tpu'"),
    (['--data', '/no/such/folder'], '--data: folder not found'),
])
def test_demo_flag_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        demo.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_help_mentions_resuming(capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(['--help'])
    text = capsys.readouterr().out
    assert 'skipped' in text and 're-running the same' in text and '--data' in text


def test_demo_data_folder_becomes_paired_dataset(tmp_path):
    from basicsr.data import build_dataset

    src = tmp_path / 'photos'
    src.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(src / 'a.png'), rng.integers(0, 256, (81, 101, 3), dtype=np.uint8))  # odd sizes: cropped
    cv2.imwrite(str(src / 'b.jpg'), rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
    cv2.imwrite(str(src / 'tiny.png'), rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))  # too small: skipped
    args = demo.parse_args(['--data', str(src), '--out', str(tmp_path / 'w')])
    messages = []
    paired = demo.prepare_paired_data(args.hr_images, str(tmp_path / 'w' / 'data_x2'), 2, 64, messages.append)
    assert paired[2] == 2 and any('tiny.png' in m for m in messages)
    hr = cv2.imread(str(tmp_path / 'w' / 'data_x2' / 'HR' / 'a.png'))
    lr = cv2.imread(str(tmp_path / 'w' / 'data_x2' / 'LR_bicubic' / 'X2' / 'a.png'))
    assert hr.shape == (80, 100, 3) and lr.shape == (40, 50, 3)
    opt = demo.train_dataset_opt(args, paired)
    ds = build_dataset({**opt, 'phase': 'train', 'scale': 2})
    item = ds[0]
    assert tuple(item['gt'].shape) == (3, 64, 64) and tuple(item['lq'].shape) == (3, 32, 32)
