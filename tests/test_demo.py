import odm_basicsr.plugin  # noqa: F401, I001  (BasicSR fixes + registration first)

# ``odm-demo`` end to end with tiny settings (real training subprocesses on CPU), its re-run and its flags.
import json
import math
import re
import time
from copy import deepcopy

import cv2
import numpy as np
import pytest

from odm_basicsr import demo, scoring
from odm_basicsr.demo import figures, recipe
from odm_basicsr.study.data import prepare_paired_data

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
        assert re.fullmatch(r'\d+:\d\d:\d\d', r['basicsr_time_consumed']), r  # from the run's record
    assert results['settings']['var_weight'] == recipe.DEFAULT_VAR_WEIGHT
    assert 'torch' in results['machine'] and results['command'].startswith('odm-demo --out')

    md = (out / 'results.md').read_text()
    for method in ('bicubic', 'fp', 'baseline', 'odm'):
        assert f'| {method} |' in md

    # the stages really were configured as the study needs
    import yaml
    base = yaml.safe_load((out / 'options' / 'w4_baseline.yml').read_text())
    odm = yaml.safe_load((out / 'options' / 'w4_odm.yml').read_text())
    assert base['train']['cooperation'] == 'off' and 'reg_opt' not in base['train']
    assert 'offsets' not in base['network_g']
    assert odm['train']['cooperation'] == 'feature' and odm['network_g']['offsets'] == recipe.OFFSETS
    assert odm['train']['reg_opt'] == {'type': 'FeatureVarianceLoss', 'loss_weight': recipe.DEFAULT_VAR_WEIGHT,
                                       'reduction': 'channel'}
    for opt in (base, odm):
        assert opt['path']['pretrain_network_g'] == 'experiments/fp/models/net_g_latest.pth'
        assert opt['model_type'] == 'ODMModel' and opt['logger']['use_tb_logger'] is True
        del opt['name'], opt['train']['cooperation']
        opt['train'].pop('reg_opt', None), opt['network_g'].pop('offsets', None)
    assert base == odm  # identical in everything else
    assert (out / 'tb_logger' / 'w4_odm').is_dir()
    odm_log = next((out / 'experiments' / 'w4_odm').glob('train_*.log')).read_text()
    assert 'Distribution mismatch (shift / scale) and offsets' in odm_log
    assert 'quantizer entries are not in' in odm_log  # the FP checkpoint was loaded into the quantized net


def test_demo_comparison_png_has_four_panels(tiny_run):
    out, _ = tiny_run
    img = cv2.imread(str(out / 'comparison_w4.png'))
    assert img is not None
    panel = figures.CROP * figures.ZOOM
    assert img.shape == (figures.LABEL_H + panel, figures.PANELS * panel + (figures.PANELS - 1) * figures.GAP, 3)
    # label strips are white with dark text; the panels differ from each other
    strip = img[:figures.LABEL_H, :panel]
    assert (strip == 255).mean() > 0.5 and strip.min() < 100
    tiles = [img[figures.LABEL_H:, i * (panel + figures.GAP):i * (panel + figures.GAP) + panel] for i in range(4)]
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
    paired = prepare_paired_data(args.hr_images, str(tmp_path / 'w' / 'data_x2'), 2, 64, messages.append)
    assert paired[2] == 2 and any('tiny.png' in m for m in messages)
    hr = cv2.imread(str(tmp_path / 'w' / 'data_x2' / 'HR' / 'a.png'))
    lr = cv2.imread(str(tmp_path / 'w' / 'data_x2' / 'LR_bicubic' / 'X2' / 'a.png'))
    assert hr.shape == (80, 100, 3) and lr.shape == (40, 50, 3)
    opt = demo.train_dataset_opt(args, paired)
    ds = build_dataset({**opt, 'phase': 'train', 'scale': 2})
    item = ds[0]
    assert tuple(item['gt'].shape) == (3, 64, 64) and tuple(item['lq'].shape) == (3, 32, 32)


# ---------------------------------------------------------------------------------------------------------------
# --pretrained-opt / --pretrained: start from a given FP network (a tiny random EDSR written here)
# ---------------------------------------------------------------------------------------------------------------

TINY_NET = {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 1, 'upscale': 2}
PRETRAINED_QAT = ['--bits', '8', '--qat-iters', '1', '--device', 'cpu']


@pytest.fixture(scope='module')
def fp_files(tmp_path_factory):
    """A tiny FP EDSR as a plain state dict, a ``params`` checkpoint and a ``params``/``params_ema`` one, its
    BasicSR-style option file, and a checkpoint of another width."""
    import torch
    import yaml
    from basicsr.archs.edsr_arch import EDSR

    root = tmp_path_factory.mktemp('fp_files')
    torch.manual_seed(0)
    kwargs = {k: v for k, v in TINY_NET.items() if k != 'type'}
    net, ema, wide = EDSR(**kwargs), EDSR(**kwargs), EDSR(**{**kwargs, 'num_feat': 16})
    files = {'plain': root / 'plain.pth', 'params': root / 'params.pth', 'both': root / 'both.pth',
             'wide': root / 'wide.pth', 'opt': root / 'net.yml', 'state': net.state_dict(),
             'ema_state': ema.state_dict()}
    torch.save(net.state_dict(), files['plain'])
    torch.save({'params': net.state_dict()}, files['params'])
    torch.save({'params': net.state_dict(), 'params_ema': ema.state_dict()}, files['both'])
    torch.save(wide.state_dict(), files['wide'])
    files['opt'].write_text(yaml.safe_dump({'name': 'tiny', 'scale': 2, 'network_g': TINY_NET}))
    return files


@pytest.fixture(scope='module')
def pretrained_run(fp_files, tmp_path_factory):
    out = tmp_path_factory.mktemp('demo_pretrained')
    start = time.time()
    argv = ['--out', str(out), '--pretrained-opt', str(fp_files['opt']), '--pretrained', str(fp_files['plain'])]
    assert demo.main(argv + PRETRAINED_QAT) == 0
    return out, time.time() - start


def test_pretrained_skips_the_fp_stage_and_qat_starts_from_it(pretrained_run, fp_files):
    import torch
    import yaml

    from odm_basicsr.checkpoint import load_checkpoint

    out, _ = pretrained_run
    # (a) no FP training run
    assert not (out / 'experiments' / 'fp').exists() and not (out / 'options' / 'fp.yml').exists()
    assert not (out / 'console' / 'fp.txt').exists() and not (out / 'tb_logger' / 'fp').exists()
    results = json.loads((out / 'results.json').read_text())
    fp, base, odm = results['stages']
    assert (fp['stage'], fp['method'], fp['pretrained'], fp['train_wall_s']) == ('fp', 'fp', True, None)
    assert fp['checkpoint'] == str(fp_files['plain']) and fp['options'] == str(fp_files['opt'])
    assert results['settings']['pretrained'] == {'network': 'EDSR', 'options': str(fp_files['opt']),
                                                 'checkpoint': str(fp_files['plain']), 'param_key': None}
    assert results['settings']['fp_iters'] is None and results['reused_stages'] == []
    assert '| fp (pretrained) | FP32 |' in (out / 'results.md').read_text()
    # the QAT stages wrap the given network_g and load the given weights
    for stage in ('w8_baseline', 'w8_odm'):
        opt = yaml.safe_load((out / 'options' / f'{stage}.yml').read_text())
        assert opt['network_g']['type'] == 'Quantized' and opt['network_g']['arch'] == TINY_NET
        assert 'layers' not in opt['network_g']  # --layers default: the arch's preset
        assert opt['path']['pretrain_network_g'] == str(fp_files['plain'])
        assert opt['path']['param_key_g'] == 'params'  # compat.load_network falls back to the plain state dict
        log = next((out / 'experiments' / stage).glob('train_*.log')).read_text()
        assert f'quantizer entries are not in {fp_files["plain"]}' in log
        assert f'Loaded QuantizedEDSR from {fp_files["plain"]}' in log
        # (c) one QAT iteration at lr 1e-4 moves each weight by about 1e-4 at most (Adam); another init is far off
        trained = load_checkpoint(str(out / 'experiments' / stage / 'models' / 'net_g_latest.pth'))['params']
        for k, v in fp_files['state'].items():
            assert torch.allclose(trained[k], v, atol=1e-3, rtol=0), k
        far = max((fp_files['ema_state'][k] - v).abs().max().item() for k, v in fp_files['state'].items())
        assert far > 0.05
    # (c) W8A8 after one iteration: next to the FP row (a random start would be tens of dB off)
    for r in (base, odm):
        assert abs(r['psnr'] - fp['psnr']) < 0.1, (r['psnr'], fp['psnr'])
        assert abs(r['psnr'] - r['log_psnr']) < 0.01  # BasicSR's own validation agrees


def test_pretrained_fp_row_equals_odm_eval_of_the_checkpoint(pretrained_run, fp_files, tmp_path):
    """(b) the FP row against an independent reference: odm-eval's functions on the val photos written as PNGs."""
    from basicsr.utils import tensor2img

    from odm_basicsr.network_options import build_network, read_network_options

    out, _ = pretrained_run
    fp = json.loads((out / 'results.json').read_text())['stages'][0]
    root = tmp_path / 'bench'
    (root / 'val' / 'HR').mkdir(parents=True)
    (root / 'val' / 'LRbicx2').mkdir()
    for name, lq, gt in demo.val_pairs(2):
        cv2.imwrite(str(root / 'val' / 'HR' / f'{name}.png'), gt)
        cv2.imwrite(str(root / 'val' / 'LRbicx2' / f'{name}.png'), tensor2img([lq]))
    net_opt, scale = read_network_options(str(fp_files['opt']))
    assert scale == 2
    net = build_network(net_opt)
    assert scoring.load_weights(net, str(fp_files['plain'])) is None  # a plain state dict
    rows = scoring.evaluate_set(net.eval(), scoring.list_pairs(str(root), 'val', 2), 2, 'cpu')
    assert {n: round(p, 4) for n, p, _ in rows} == fp['per_image_psnr']
    assert fp['psnr'] == pytest.approx(sum(r[1] for r in rows) / len(rows), abs=1e-9)
    assert fp['ssim'] == pytest.approx(sum(r[2] for r in rows) / len(rows), abs=1e-9)


@pytest.mark.parametrize('which,key', [('plain', None), ('params', 'params'), ('both', 'params_ema')])
def test_pretrained_checkpoint_kinds_load_as_the_qat_runs_load_them(fp_files, tmp_path, which, key):
    """Plain state dict, ``params`` and ``params``+``params_ema`` checkpoints: the entry found, the options the QAT
    stages get, the QAT model's load_network (ODMModel's, from QuantSRModel) with them, and the FP evaluation's
    loader."""
    import types

    import torch
    from basicsr.archs import build_network

    from odm_basicsr.models.quant_sr_model import QuantSRModel

    args = demo.parse_args(['--out', str(tmp_path / 'w'), '--pretrained-opt', str(fp_files['opt']),
                            '--pretrained', str(fp_files[which])] + PRETRAINED_QAT)
    assert (args.pretrained_key, args.scale, args.pretrained_net) == (key, 2, TINY_NET)
    fp, base, odm = demo.plan_stages(args, demo.train_dataset_opt(args))
    assert fp.pretrained and fp.checkpoint == str(fp_files[which]) and fp.param_key == key
    assert base.opt['path']['param_key_g'] == odm.opt['path']['param_key_g'] == (key or 'params')
    expected = fp_files['ema_state'] if key == 'params_ema' else fp_files['state']
    net = build_network(deepcopy(base.opt['network_g']))
    fake_model = types.SimpleNamespace(get_bare_model=lambda n: n)
    QuantSRModel.load_network(fake_model, net, base.opt['path']['pretrain_network_g'], True,
                           base.opt['path']['param_key_g'])
    state = net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    fp_net = scoring.load_network(fp.opt['network_g'], fp.checkpoint, 'cpu', fp.param_key)
    assert all(torch.equal(fp_net.state_dict()[k], v) for k, v in expected.items())
    assert not (tmp_path / 'w').exists()  # parsing and planning create nothing


@pytest.mark.parametrize('extra,message', [
    (['--pretrained-opt', '{opt}'], '--pretrained-opt needs --pretrained too'),
    (['--pretrained', '{plain}'], '--pretrained needs --pretrained-opt too'),
    (['--pretrained-opt', '{dir}/missing.yml', '--pretrained', '{plain}'],
     '--pretrained-opt: option file not found: {dir}/missing.yml'),
    (['--pretrained-opt', '{opt}', '--pretrained', '{dir}/missing.pth'],
     '--pretrained: checkpoint file not found: {dir}/missing.pth'),
    (['--pretrained-opt', '{opt}', '--pretrained', '{wide}'],
     '--pretrained: checkpoint {wide} [None] does not fit network EDSR'),
    (['--pretrained-opt', '{opt}', '--pretrained', '{plain}', '--scale', '3'],
     '--scale 3 conflicts with the x2 network of {opt}'),
    (['--pretrained-opt', '{x3}', '--pretrained', '{plain}'], 'scale 3 conflicts with network_g upscale 2'),
    (['--pretrained-opt', '{quantized}', '--pretrained', '{plain}'], 'network_g is Quantized; give the FP network'),
    (['--pretrained-opt', '{opt}', '--pretrained', '{plain}', '--num-feat', '8'],
     '--num-feat does not apply with --pretrained'),
    (['--pretrained-opt', '{opt}', '--pretrained', '{plain}', '--fp-iters', '5'],
     '--fp-iters does not apply with --pretrained'),
    (['--pretrained-opt', '{opt}', '--pretrained', '{plain}', '--layers', 'no.such.*'],
     '--layers no.such.*: '),
    (['--pretrained-opt', '{vgg}', '--pretrained', '{vgg_ckpt}'],
     '--layers default: Quantized: no default layer set for arch SRVGGNetCompact_basicsr'),
    (['--layers', 'default', 'all'], '--layers: "default" and "all" stand alone'),
])
def test_pretrained_flag_errors_stop_before_anything_runs(fp_files, tmp_path, capsys, extra, message):
    import torch
    import yaml
    from basicsr.archs.srvgg_arch import SRVGGNetCompact

    vgg = {'type': 'SRVGGNetCompact_basicsr', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 4, 'num_conv': 2,
           'upscale': 2}
    files = {'opt': fp_files['opt'], 'plain': fp_files['plain'], 'wide': fp_files['wide'], 'dir': tmp_path,
             'x3': tmp_path / 'x3.yml', 'quantized': tmp_path / 'q.yml', 'vgg': tmp_path / 'vgg.yml',
             'vgg_ckpt': tmp_path / 'vgg.pth'}
    files['x3'].write_text(yaml.safe_dump({'scale': 3, 'network_g': TINY_NET}))
    files['quantized'].write_text(yaml.safe_dump({'network_g': {'type': 'Quantized', 'arch': TINY_NET}}))
    files['vgg'].write_text(yaml.safe_dump(vgg))  # a network_g-only file; the scale from its upscale
    torch.save(SRVGGNetCompact(**{k: v for k, v in vgg.items() if k != 'type'}).state_dict(), files['vgg_ckpt'])
    fill = {k: str(v) for k, v in files.items()}
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as e:
        demo.main(['--out', str(out)] + [a.format(**fill) for a in extra] + PRETRAINED_QAT)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # usage lines, then one error line
    assert err.startswith('odm-demo: error: ') and message.format(**fill) in err, err
    assert not out.exists()


def test_pretrained_layers_all_is_passed_to_the_qat_stages(fp_files, tmp_path):
    argv = ['--out', str(tmp_path / 'w'), '--layers', 'all']
    args = demo.parse_args(argv)
    assert args.layers == 'all' and args.pretrained_net is None and args.num_feat == recipe.DEFAULT_NUM_FEAT
    stages = demo.plan_stages(args, demo.train_dataset_opt(args))
    assert 'layers' not in stages[0].opt['network_g']
    assert all(s.opt['network_g']['layers'] == 'all' for s in stages[1:])
    args = demo.parse_args(argv[:2] + ['--layers', 'body.0.conv1', 'conv_after_body', '--pretrained-opt',
                                       str(fp_files['opt']), '--pretrained', str(fp_files['params'])])
    stages = demo.plan_stages(args, demo.train_dataset_opt(args))
    assert all(s.opt['network_g']['layers'] == ['body.0.conv1', 'conv_after_body'] for s in stages[1:])


def test_demo_help_describes_the_pretrained_flags(capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(['--help'])
    text = capsys.readouterr().out
    for flag in ('--pretrained-opt NET.yml', '--pretrained CKPT.pth', '--param-key', '--layers', 'plain state dict',
                 'pretrain_network_g'):
        assert flag in text, flag
