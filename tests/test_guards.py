"""Non-finite networks: never written, refused by odm-test / odm-train loading and by odm-eval, with clear messages."""
import copy
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import yaml

from odm_basicsr.guards import NonFiniteError, TrainingDivergedError, check_finite, last_checkpoint, nonfinite_entries

NAN, INF = float('nan'), float('inf')
EDSR = {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 4, 'num_block': 1, 'upscale': 2}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_nonfinite_entries_counts_a_hand_made_state():
    state = {
        'finite': torch.tensor([1.0, -2.0, 3e38]),
        'nan': torch.tensor([[NAN, 1.0], [NAN, NAN]]),  # 3
        'ints': torch.tensor([1, 2, 3]),  # integer and bool tensors are never non-finite: ignored
        'flag': torch.tensor(True),
        'half': torch.tensor([INF, 0.0, -INF], dtype=torch.float16),  # 2
        'nested': {'a': torch.tensor(-INF), 'b': [torch.zeros(2), torch.tensor([NAN] * 4, dtype=torch.bfloat16)]},
        'not_a_tensor': NAN,  # plain values are not tensors: ignored
        'empty': torch.empty(0),
    }
    assert nonfinite_entries(state) == [('nan', 3), ('half', 2), ('nested/a', 1), ('nested/b/1', 4)]
    assert nonfinite_entries([torch.ones(2), torch.tensor([INF, NAN])]) == [('1', 2)]
    assert nonfinite_entries({'w': torch.ones(3, requires_grad=True)}) == []

    check_finite({'w': torch.ones(2), 'i': torch.tensor([7])}, 'anything')  # finite: no error
    with pytest.raises(NonFiniteError) as e:
        check_finite(state, 'checkpoint x.pth [params]', 'refusing to load it')
    assert str(e.value) == ('checkpoint x.pth [params] holds 10 non-finite values (NaN/Inf) in 4 tensors: nan (3), '
                            'half (2), nested/a (1), nested/b/1 (4); refusing to load it')
    assert e.value.entries == [('nan', 3), ('half', 2), ('nested/a', 1), ('nested/b/1', 4)]
    many = {f'layer{i}.weight': torch.tensor([NAN]) for i in range(7)}
    with pytest.raises(NonFiniteError, match=r'in 7 tensors: layer0.weight \(1\), .*layer4.weight \(1\), and 2 more$'):
        check_finite(many, 'net')
    assert issubclass(TrainingDivergedError, RuntimeError)


def test_last_checkpoint_by_iteration_number(tmp_path):
    assert last_checkpoint(str(tmp_path / 'nope')) is None and last_checkpoint(str(tmp_path)) is None
    for name in ('net_g_5.pth', 'net_g_100.pth', 'net_g_40.pth', 'net_d_900.pth', 'net_g_7.pth.tmp123'):
        (tmp_path / name).write_bytes(b'x')
    assert last_checkpoint(str(tmp_path)) == str(tmp_path / 'net_g_100.pth')  # 100 > 40 > 5, not by name
    latest = tmp_path / 'net_g_latest.pth'
    latest.write_bytes(b'x')
    t = os.path.getmtime(tmp_path / 'net_g_100.pth')
    os.utime(latest, (t - 60, t - 60))  # an earlier run's final network: older than net_g_100
    assert last_checkpoint(str(tmp_path)) == str(tmp_path / 'net_g_100.pth')
    os.utime(latest, (t + 60, t + 60))  # written when this run ended
    assert last_checkpoint(str(tmp_path)) == str(latest)
    assert last_checkpoint(str(tmp_path), 'net_d') == str(tmp_path / 'net_d_900.pth')


def _sr_model(tmp_path, pretrain=None):
    from odm_basicsr.models.quant_sr_model import QuantSRModel

    torch.manual_seed(0)
    opt = {'is_train': True, 'dist': False, 'num_gpu': 0, 'scale': 2, 'network_g': dict(EDSR),
           'path': {'pretrain_network_g': pretrain, 'strict_load_g': True, 'models': str(tmp_path / 'models'),
                    'training_states': str(tmp_path / 'states')},
           'train': {'ema_decay': 0.5, 'optim_g': {'type': 'Adam', 'lr': 1e-3},
                     'scheduler': {'type': 'MultiStepLR', 'milestones': [100], 'gamma': 0.5},
                     'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}}}
    os.makedirs(opt['path']['models'], exist_ok=True)
    os.makedirs(opt['path']['training_states'], exist_ok=True)
    return QuantSRModel(opt)


def _step(model):
    g = torch.Generator().manual_seed(1)
    model.feed_data({'lq': torch.rand(1, 3, 6, 6, generator=g), 'gt': torch.rand(1, 3, 12, 12, generator=g)})
    model.optimize_parameters(1)


def test_save_refuses_a_nonfinite_network_and_keeps_the_previous_files(tmp_path):
    model = _sr_model(tmp_path)
    _step(model)
    model.save(epoch=0, current_iter=2)  # BasicSR's SRModel.save: net_g + net_g_ema, then the training state
    net_file, state_file = tmp_path / 'models' / 'net_g_2.pth', tmp_path / 'states' / '2.state'
    good_net, good_state = net_file.read_bytes(), state_file.read_bytes()

    with torch.no_grad():
        model.net_g.conv_first.weight[0, 0, 0, 0] = NAN
        model.net_g_ema.body[0].conv1.bias[:2] = torch.tensor([INF, -INF])
    for it in (2, 3):  # over an existing file, and a new one
        with pytest.raises(NonFiniteError) as e:
            model.save(epoch=0, current_iter=it)
        path = tmp_path / 'models' / f'net_g_{it}.pth'
        assert str(e.value) == (f'not writing {path}: the network holds 3 non-finite values (NaN/Inf) in 2 '
                                'tensors: params/conv_first.weight (1), params_ema/body.0.conv1.bias (2); nothing '
                                'was written (a file already there is left as it was)')
    assert net_file.read_bytes() == good_net and state_file.read_bytes() == good_state
    assert sorted(os.listdir(tmp_path / 'models')) == ['net_g_2.pth']  # no net_g_3.pth, no temporary file
    assert sorted(os.listdir(tmp_path / 'states')) == ['2.state']  # the state after a refused network: not written

    # a training state whose optimizer state went non-finite
    model = _sr_model(tmp_path / 'b')
    _step(model)
    model.save_training_state(epoch=0, current_iter=2)
    state_file = tmp_path / 'b' / 'states' / '2.state'
    good_state = state_file.read_bytes()
    first = model.optimizer_g.param_groups[0]['params'][0]
    model.optimizer_g.state[first]['exp_avg'].fill_(NAN)
    with pytest.raises(NonFiniteError) as e:
        model.save_training_state(epoch=0, current_iter=2)
    n = first.numel()
    assert str(e.value).startswith(f'not writing {state_file}: the training state holds {n} non-finite values '
                                   f'(NaN/Inf) in 1 tensor: optimizers/0/state/0/exp_avg ({n}); nothing was written')
    assert state_file.read_bytes() == good_state and os.listdir(tmp_path / 'b' / 'states') == ['2.state']


def test_loading_a_nonfinite_pretrained_network_or_resume_state_is_refused(tmp_path):
    import basicsr.train
    from basicsr.archs import build_network
    torch.manual_seed(0)
    state = build_network(dict(EDSR)).state_dict()
    state['conv_after_body.weight'][0, :2] = NAN  # 2 x 3 x 3
    ckpt = tmp_path / 'nan.pth'
    torch.save({'params': state}, ckpt)
    with pytest.raises(NonFiniteError, match=rf'^checkpoint {ckpt} \[params\] holds 18 non-finite values \(NaN/Inf\) '
                       r'in 1 tensor: conv_after_body.weight \(18\); refusing to load it$'):
        _sr_model(tmp_path, str(ckpt))

    bad_state = tmp_path / '4.state'
    torch.save({'epoch': 0, 'iter': 4, 'optimizers': [{'state': {0: {'exp_avg': torch.tensor([INF])}}}]}, bad_state)
    resume_state = basicsr.train.load_resume_state({'auto_resume': False, 'path': {'resume_state': str(bad_state)}})
    model = _sr_model(tmp_path)  # the plugin's models refuse it when asked to resume from it
    model.opt['path']['resume_state'] = str(bad_state)
    with pytest.raises(NonFiniteError, match=rf'^training state {bad_state} holds 1 non-finite value .*'
                       r'optimizers/0/state/0/exp_avg \(1\); refusing to resume from it$'):
        model.resume_training(resume_state)


def test_odm_eval_refuses_a_nan_checkpoint(tmp_path, capsys):
    from basicsr.archs import build_network

    from odm_basicsr.evaluate import main

    rng = np.random.default_rng(0)
    for sub, size in (('HR', 24), ('LRbicx2', 12)):
        os.makedirs(tmp_path / 'bench' / 'Tiny' / sub)
        cv2.imwrite(str(tmp_path / 'bench' / 'Tiny' / sub / 'a.png'), rng.integers(0, 256, (size, size, 3), np.uint8))
    opt = tmp_path / 'net.yml'
    opt.write_text(yaml.safe_dump({'scale': 2, 'network_g': EDSR}))
    torch.manual_seed(0)
    state = build_network(dict(EDSR)).state_dict()
    good = tmp_path / 'good.pth'
    torch.save({'params': state}, good)
    state = copy.deepcopy(state)
    state['conv_first.bias'][1] = NAN
    bad = tmp_path / 'diverged.pth'
    torch.save({'params': state}, bad)
    args = ['-opt', str(opt), '--data', str(tmp_path / 'bench'), '--sets', 'Tiny', '--device', 'cpu']

    main(args + ['--checkpoint', str(good), '--out', str(tmp_path / 'ok')])  # the finite one evaluates
    assert (tmp_path / 'ok' / 'eval.csv').is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args + ['--checkpoint', str(good), str(bad), '--out', str(tmp_path / 'out')])
    assert e.value.code == 3
    err = capsys.readouterr().err
    assert err == (f'odm-eval: error: checkpoint {bad} [params] holds 1 non-finite value (NaN/Inf) in 1 tensor: '
                   'conv_first.bias (1); refusing to evaluate it\n')
    assert not (tmp_path / 'out').exists()  # no table with a score for it (nor for the other one)


def test_cli_exit_status_3_for_nonfinite_and_diverged_2_for_option_errors(tmp_path, capsys, monkeypatch):
    import basicsr.test
    import basicsr.train

    from odm_basicsr.cli import run_pipeline
    from odm_basicsr.utils.option_check import OptionError

    opt = tmp_path / 'opt.yml'
    opt.write_text('name: x\n')
    for module, is_train, error, status in (
            (basicsr.train, True, TrainingDivergedError('diverged at iter 7;\nlast good: net_g_5.pth'), 3),
            (basicsr.test, False, NonFiniteError('checkpoint n.pth', [('w', 2)], 'refusing to load it'), 3),
            (basicsr.train, True, OptionError('network_g: bad'), 2)):
        def pipeline(root, error=error):
            raise error
        monkeypatch.setattr(module, 'train_pipeline' if is_train else 'test_pipeline', pipeline)
        with pytest.raises(SystemExit) as e:
            run_pipeline(is_train, ['-opt', str(opt)])
        assert e.value.code == status
        prog = 'odm-train' if is_train else 'odm-test'
        assert capsys.readouterr().err == f'{prog}: error: {" ".join(str(error).split())}\n'
    with pytest.raises(SystemExit) as e:
        run_pipeline(True, ['-opt', str(tmp_path / 'nope.yml')])
    assert e.value.code == 2 and 'option file not found' in capsys.readouterr().err


def test_odm_test_refuses_a_nan_pretrained_network(tmp_path):
    from basicsr.archs import build_network

    torch.manual_seed(0)
    state = build_network(dict(EDSR)).state_dict()
    state['conv_last.weight'].fill_(INF)
    ckpt = tmp_path / 'diverged.pth'
    torch.save({'params': state}, ckpt)
    n = state['conv_last.weight'].numel()
    opt = {'name': 'nan_test', 'model_type': 'QuantSRModel', 'scale': 2, 'num_gpu': 0,
           'datasets': {'test_1': {'name': 'emb', 'type': 'EmbeddedSRDataset', 'split': 'val', 'val_size': 16}},
           'network_g': EDSR, 'path': {'pretrain_network_g': str(ckpt), 'strict_load_g': True},
           'val': {'save_img': False, 'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 2}}}}
    (tmp_path / 'test.yml').write_text(yaml.safe_dump(opt))
    out = subprocess.run([sys.executable, '-m', 'odm_basicsr.test', '-opt', str(tmp_path / 'test.yml')],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    message = (f'checkpoint {ckpt} [params] holds {n} non-finite values (NaN/Inf) in 1 tensor: conv_last.weight '
               f'({n}); refusing to load it')
    assert out.returncode == 3, out.stdout + out.stderr
    assert out.stderr.strip().splitlines()[-1] == f'odm-test: error: {message}'
    assert 'Traceback' not in out.stderr and '# psnr' not in out.stdout + out.stderr
    log = next((tmp_path / 'results' / 'nan_test').glob('test_nan_test_*.log')).read_text()
    assert f'NonFiniteError: {message}' in log  # the run's log says why it stopped


def test_guards_import_without_basicsr_cv2_scipy():
    """The module itself is plain PyTorch (``import odm_basicsr.guards`` would run the package's BasicSR set-up)."""
    path = os.path.join(REPO, 'odm_basicsr', 'guards.py')
    code = ('import importlib.util, sys, torch\n'
            f'spec = importlib.util.spec_from_file_location("guards", {path!r})\n'
            'g = importlib.util.module_from_spec(spec); spec.loader.exec_module(g)\n'
            'assert g.nonfinite_entries({"w": torch.tensor([float("nan")])}) == [("w", 1)]\n'
            'bad = [m for m in ("basicsr", "cv2", "scipy") if m in sys.modules]\n'
            'assert not bad, bad\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
