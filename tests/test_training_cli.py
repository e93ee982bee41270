"""Real odm-train / odm-test runs on CPU in a temporary folder: training, EMA, checkpoints, test, resume, errors."""
import copy
import re
import subprocess
import sys

import pytest
import torch
import yaml

from odm_basicsr.utils.option_check import OptionError, check_options

pytestmark = pytest.mark.slow

BASE = {
    'name': 'cli_tiny',
    'model_type': 'QuantSRModel',
    'scale': 2,
    'num_gpu': 0,
    'manual_seed': 0,
    'datasets': {
        'train': {'name': 'emb', 'type': 'EmbeddedSRDataset', 'split': 'train', 'gt_size': 32, 'use_hflip': True,
                  'use_rot': True, 'num_worker_per_gpu': 0, 'batch_size_per_gpu': 2, 'dataset_enlarge_ratio': 10},
        'val': {'name': 'emb_val', 'type': 'EmbeddedSRDataset', 'split': 'val', 'val_size': 32},
    },
    'network_g': {'type': 'Quantized', 'w_bits': 4, 'a_bits': 4,
                  'arch': {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 2,
                           'upscale': 2}},
    'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
    'train': {'ema_decay': 0.9, 'optim_g': {'type': 'Adam', 'lr': 1e-3}, 'total_iter': 4, 'warmup_iter': -1,
              'scheduler': {'type': 'MultiStepLR', 'milestones': [100], 'gamma': 0.5},
              'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}},
    'val': {'val_freq': 4, 'save_img': False,
            'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 2, 'test_y_channel': True}}},
    'logger': {'print_freq': 1, 'save_checkpoint_freq': 4, 'use_tb_logger': False},
}


def write_opt(folder, opt, name='opt.yml'):
    path = folder / name
    path.write_text(yaml.safe_dump(opt))
    return path


def run(args, cwd):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """One real training run of 4 iterations, shared by the tests below."""
    cwd = tmp_path_factory.mktemp('train')
    opt_file = write_opt(cwd, BASE)
    out = run(['odm-train', '-opt', str(opt_file)], cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    return cwd, opt_file


def test_training_writes_checkpoints_logs_and_validates(trained):
    cwd, _ = trained
    exp = cwd / 'experiments' / 'cli_tiny'
    assert (exp / 'models' / 'net_g_4.pth').is_file() and (exp / 'models' / 'net_g_latest.pth').is_file()
    assert (exp / 'training_states' / '4.state').is_file()
    log = next(exp.glob('train_cli_tiny_*.log')).read_text()
    assert 'Network [QuantizedEDSR] is created.' in log and '# psnr:' in log
    psnr = float(log.split('# psnr:')[-1].split()[0])
    assert 10.0 < psnr < 50.0
    assert not list(exp.glob('**/*.tmp*'))  # atomic writes leave no temporaries


def test_checkpoints_load_weights_only_and_ema_has_quantizer_state(trained):
    cwd, _ = trained
    models = cwd / 'experiments' / 'cli_tiny' / 'models'
    ckpt = torch.load(models / 'net_g_4.pth', weights_only=True)
    state = torch.load(cwd / 'experiments' / 'cli_tiny' / 'training_states' / '4.state', weights_only=True)
    assert state['iter'] == 4 and len(state['optimizers']) == 1
    params, ema = ckpt['params'], ckpt['params_ema']
    for key in ('body.0.conv1.act_quant.initialized', 'body.1.conv2.act_quant.range_scale'):
        assert torch.equal(params[key], ema[key]), key  # buffers are copied into net_g_ema
    assert bool(ema['body.0.conv1.act_quant.initialized'])
    # the EMA range starts at the calibrated value (not at the uncalibrated default [0, 1])
    upper = ema['body.0.conv1.act_quant.upper_raw'] * ema['body.0.conv1.act_quant.range_scale']
    ref = params['body.0.conv1.act_quant.upper_raw'] * params['body.0.conv1.act_quant.range_scale']
    assert abs(upper.item() - ref.item()) < 0.1 * abs(ref.item())


def test_odm_test_evaluates_the_trained_checkpoint(trained):
    cwd, _ = trained
    opt = copy.deepcopy(BASE)
    opt['name'] = 'cli_tiny_test'
    opt['datasets'] = {'test_1': dict(BASE['datasets']['val'], name='emb_test')}
    opt['path'] = {'pretrain_network_g': str(cwd / 'experiments/cli_tiny/models/net_g_latest.pth'),
                   'strict_load_g': True, 'param_key_g': 'params_ema'}
    del opt['train']
    opt['val'].pop('val_freq')  # and no 'suffix': BasicSR needs it, odm-test does not
    opt_file = write_opt(cwd, opt, 'test.yml')
    out = run([sys.executable, '-m', 'odm_basicsr.test', '-opt', str(opt_file)], cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    log = next((cwd / 'results' / 'cli_tiny_test').glob('test_cli_tiny_test_*.log')).read_text()
    assert 'quantizer entries are not in' not in log  # the trained quantizer state was loaded
    train_log = next((cwd / 'experiments' / 'cli_tiny').glob('train_*.log')).read_text()
    assert log.split('# psnr:')[-1].split()[0] == train_log.split('# psnr:')[-1].split()[0]


def test_auto_resume_on_cpu(trained):
    cwd, opt_file = trained
    out = run([sys.executable, '-m', 'odm_basicsr.train', '-opt', str(opt_file), '--auto_resume',
               '--force_yml', 'train:total_iter=6'], cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    log = sorted((cwd / 'experiments' / 'cli_tiny').glob('train_cli_tiny_*.log'))[-1].read_text()
    assert 'Resuming training from epoch: ' in log and 'iter: 4.' in log
    assert re.search(r'iter:\s+5,', log) and re.search(r'iter:\s+6,', log) and not re.search(r'iter:\s+4,', log)


def test_cli_reports_option_errors_before_creating_folders(tmp_path):
    opt = copy.deepcopy(BASE)
    opt['network_g']['w_bits'] = 0
    out = run(['odm-train', '-opt', str(write_opt(tmp_path, opt))], tmp_path)
    assert out.returncode != 0
    assert 'odm-train: error: network_g: w_bits must be one of 2..8 or 32' in out.stderr
    assert 'Traceback' not in out.stderr
    assert not (tmp_path / 'experiments').exists()
    missing = run(['odm-train', '-opt', str(tmp_path / 'nope.yml')], tmp_path)
    assert missing.returncode != 0 and 'option file not found' in missing.stderr


def _processed(opt):
    """What BasicSR's parse_options adds before our check runs."""
    opt = copy.deepcopy(opt)
    for name, ds in opt['datasets'].items():
        ds['phase'], ds['scale'] = name.split('_')[0], opt['scale']
    opt.update(dist=False, rank=0, world_size=1, auto_resume=False, is_train=True)
    return opt


def _with(path, value):
    opt = copy.deepcopy(BASE)
    *parents, last = path.split('.')
    node = opt
    for p in parents:
        node = node[p]
    node[last] = value
    return _processed(opt)


@pytest.mark.parametrize('opt,message', [
    (_with('network_g.arch.type', 'EDSRX'), "unknown arch type 'EDSRX'"),
    (_with('network_g.type', 'Quantised'), "'Quantised' is not a registered arch.*Did you mean.*Quantized"),
    (_with('network_g.a_bits', 33), 'a_bits must be one of 2..8 or 32'),
    (_with('network_g.layers', ['body.*.conv3']), "'body.\\*.conv3' matches no Conv2d/Linear layer"),
    (_with('path.pretrain_network_g', '/no/such/net.pth'), 'pretrain_network_g": file not found: /no/such/net.pth'),
    (_with('train.optim_g.lr', '2e-4'), "train.optim_g.lr\" is the string '2e-4'.*!!float 2e-4"),
    (_with('model_type', 'SRModle'), "'SRModle' is not a registered model.*SRModel"),
    (_with('datasets.train.type', 'PairedDataset'), 'not a registered dataset'),
    (_with('train.pixel_opt.type', 'L1'), "'L1' is not a registered loss"),
    (_with('train.totl_iter', 5), 'unknown option "train.totl_iter": did you mean "total_iter"'),
    (_with('netwrok_d', {}), 'unknown option "netwrok_d": did you mean "network_d"'),
    (_with('datasets.val.dataroot_gt', '/no/such/dir'), 'folder not found: /no/such/dir'),
])
def test_option_errors(opt, message):
    with pytest.raises(OptionError, match=message):
        check_options(opt)


def test_valid_options_pass():
    check_options(_processed(BASE))


def _final_params(cwd, name, it):
    return torch.load(cwd / 'experiments' / name / 'models' / f'net_g_{it}.pth', weights_only=True)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    """ODMModel, fixed seed, CPU, no loader workers: 3 + 3 resumed iterations == 6 iterations, bit for bit."""
    opt = copy.deepcopy(BASE)
    opt.update(name='exact', model_type='ODMModel')  # calibration, offsets and quantizer state all round-trip
    opt['train'].update(cooperation='feature', reg_opt={'type': 'FeatureVarianceLoss', 'loss_weight': 1e-4},
                        calibration={'batches': 2})
    # output quantizers: two at build, two more at calibration for the layers feeding the offsets
    opt['network_g'].update(offsets={'fraction': 0.5}, output_quant='auto')
    opt['datasets']['train']['dataset_enlarge_ratio'] = 2  # 5 iterations per epoch: the resume is mid-epoch
    opt['train']['total_iter'] = 6
    opt['val']['val_freq'] = 1000
    opt['logger']['save_checkpoint_freq'] = 3
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    straight.mkdir(), split.mkdir()
    out = run(['odm-train', '-opt', str(write_opt(straight, opt))], straight)
    assert out.returncode == 0, out.stderr
    first = run(['odm-train', '-opt', str(write_opt(split, opt)), '--force_yml', 'train:total_iter=3'], split)
    assert first.returncode == 0, first.stderr
    second = run(['odm-train', '-opt', str(split / 'opt.yml'), '--auto_resume'], split)
    assert second.returncode == 0, second.stderr
    resumed_log = sorted((split / 'experiments' / 'exact').glob('train_exact_*.log'))[-1].read_text()
    assert 'ODM calibration skipped' in resumed_log
    a, b = _final_params(straight, 'exact', 6), _final_params(split, 'exact', 6)
    for key in ('params', 'params_ema'):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    # and the resumed run really trained: iteration 3 differs from iteration 6
    mid = _final_params(split, 'exact', 3)
    assert not torch.equal(mid['params']['body.0.conv1.weight'], b['params']['body.0.conv1.weight'])


@pytest.mark.parametrize('mode', ['feature', 'param', 'cosine', 'naive', 'off'])
def test_odm_train_in_every_mode(mode, tmp_path):
    opt = copy.deepcopy(BASE)
    opt.update(name=f'odm_{mode}', model_type='ODMModel')
    opt['train'].update(cooperation=mode, calibration={'batches': 1}, log_layer_freq=2, total_iter=2, ema_decay=0)
    if mode != 'off':  # naive: under the old name, still read (with one deprecation notice in the log)
        opt['train']['var_opt' if mode == 'naive' else 'reg_opt'] = {'type': 'FeatureVarianceLoss', 'loss_weight': 1e-4}
        opt['network_g']['offsets'] = {'fraction': 0.5}
    opt['val']['val_freq'] = 2
    opt['logger'].update(use_tb_logger=True, save_checkpoint_freq=2)
    out = run(['odm-train', '-opt', str(write_opt(tmp_path, opt))], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = next((tmp_path / 'experiments' / f'odm_{mode}').glob('train_*.log')).read_text()
    assert 'ODM calibration (fp): activation ranges of 4 layers' in log and '# psnr:' in log
    assert ('l_reg:' in log) == (mode != 'off') and ('coop:' in log) == (mode != 'off') and 'l_var:' not in log
    assert ('agree:' in log) == (mode in ('feature', 'param'))  # the sign-gate modes
    assert ('cos_weight:' in log) == (mode == 'cosine')
    assert log.count('option "train.var_opt" is deprecated: it is now "train.reg_opt"') == (mode == 'naive')
    if mode == 'naive':
        assert 'coop: 1.0000e+00' in log  # all of the regulariser's gradient is applied
    assert 'per-layer activation ranges and cooperation ratio' in log
    if mode == 'feature':
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        tags = set()
        for f in (tmp_path / 'tb_logger' / 'odm_feature').iterdir():
            acc = EventAccumulator(str(f))
            acc.Reload()
            tags |= set(acc.Tags()['scalars'])
        assert {'losses/l_pix', 'losses/l_reg', 'coop', 'layers/body.0.conv1/upper', 'layers/body.0.conv1/coop'} <= tags
    ckpt = torch.load(tmp_path / 'experiments' / f'odm_{mode}' / 'models' / 'net_g_2.pth', weights_only=True)
    has_offsets = any('.offset.' in k for k in ckpt['params'])
    assert has_offsets == (mode != 'off')


def test_offsets_with_auto_output_quantizers_train_the_way_they_export(tmp_path):
    """A distribution offset puts a float shift / scale in front of its layer, so with ``output_quant: auto`` the
    layer feeding it gets an output quantizer at calibration; the EMA copy mirrors it, the checkpoint carries it,
    and odm-export needs to add none: every quantized conv runs as an integer conv, as trained."""
    opt = copy.deepcopy(BASE)
    opt.update(name='odm_outq', model_type='ODMModel')
    opt['train'].update(cooperation='feature', calibration={'batches': 1}, total_iter=2, ema_decay=0.9)
    opt['train']['reg_opt'] = {'type': 'FeatureVarianceLoss', 'loss_weight': 1e-4}
    opt['network_g'].update(offsets={'fraction': 0.5}, output_quant='auto')
    opt['logger']['save_checkpoint_freq'] = 2
    opt['val']['val_freq'] = 2
    out = run(['odm-train', '-opt', str(write_opt(tmp_path, opt))], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = next((tmp_path / 'experiments' / 'odm_outq').glob('train_*.log')).read_text()
    # EDSR's conv2 feed the float residual addition (built with output quantizers); offsets go on the two conv2
    # (the largest mismatch), whose producers conv1 now feed the offsets' float shift / scale
    assert "output quantizers for the layers that now feed an offset: ['body.0.conv1', 'body.1.conv1']" in log
    ckpt_path = tmp_path / 'experiments' / 'odm_outq' / 'models' / 'net_g_2.pth'
    ckpt = torch.load(ckpt_path, weights_only=True)
    for key in ('params', 'params_ema'):
        assert {k.split('.out_quant.')[0] for k in ckpt[key] if '.out_quant.' in k} == {
            'body.0.conv1', 'body.0.conv2', 'body.1.conv1', 'body.1.conv2'}
    out = run(['odm-export', '-opt', str(tmp_path / 'opt.yml'), '--checkpoint', str(ckpt_path), '--out',
               str(tmp_path / 'export'), '--latency-size', '0'], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    import json
    report = json.loads((tmp_path / 'export' / 'export.json').read_text())
    assert report['added_output_quantizers'] == []
    assert report['onnxruntime']['integer_convs'] == 4 == report['onnxruntime']['quantized_convs']
