"""scripts/mini_study.py end to end on tiny generated data (CPU), and scripts/gpu_smoke.sh without a GPU."""
import json
import math
import os
import subprocess

import pytest
from odm_helpers import load_script, make_study_data, run_script

import odm_basicsr.plugin  # noqa: F401  (BasicSR fixes + registration first)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'scripts', 'mini_study.py')
SCALE = 4


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    return make_study_data(tmp_path_factory.mktemp('data'), SCALE, 2, (112, 120), (48, 64))


def test_mini_study_runs_and_resumes(tiny_data, tmp_path):
    out = tmp_path / 'study'
    args = ['--out', str(out), '--data', str(tiny_data), '--train-sets', 'T91', '--arch-feat', '4',
            '--arch-block', '1', '--fp-iters', '2', '--qat-iters', '2', '--seeds', '0', '--layer-sets',
            'default', '--arms', 'fp', 'qat', 'odm']  # 3 training runs: fits the test-time budget
    first = run_script(SCRIPT, args, tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    study = json.loads((out / 'study.json').read_text())
    names = {r['run'] for r in study['runs']}
    assert names == {'fp', 'qat_default_s0', 'odm_default_s0'}
    for r in study['runs']:
        for set_name in ('Set5', 'Set14'):
            assert math.isfinite(r['metrics'][set_name]['psnr']), r
            assert math.isfinite(r['metrics'][set_name]['ssim']), r
        assert r['train_wall_s'] > 0
    assert study['machine']['summary'] and study['date'] and 'mini_study.py' in study['command']
    odm = next(s for s in study['summary'] if s['arm'] == 'odm')
    assert odm['n'] == 1 and odm['sets']['Set5']['delta_psnr']['verdict'] is None  # one seed: no verdict
    md = (out / 'study.md').read_text()
    assert '| fp | default |' in md and '| qat | default |' in md and '| odm | default |' in md

    second = run_script(SCRIPT, args, tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert 'training:' not in second.stdout
    assert second.stdout.count('skipped') >= 3
    again = json.loads((out / 'study.json').read_text())
    assert sorted(again['reused_runs']) == sorted(names)
    assert [r['metrics'] for r in again['runs']] == [r['metrics'] for r in study['runs']]


def test_gpu_smoke_without_gpu():
    import torch
    if torch.cuda.is_available():
        pytest.skip('a GPU is present: gpu_smoke.sh would train; this test checks the no-GPU path')
    proc = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'gpu_smoke.sh')], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'no GPU present' in proc.stdout


def test_gpu_smoke_path_on_cpu_with_and_without_amp():
    env = {**os.environ, 'GPU_SMOKE_DEVICE': 'cpu', 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'gpu_smoke.sh'), '4'], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-2])  # the JSON line, before the folder line
    assert [r['amp'] for r in report['runs']] == ['off', 'bfloat16']
    for run in report['runs']:
        assert run['iters'] == 4 and run['it_per_s'] > 0 and 5.0 < run['final_psnr'] < 40.0
    assert report['amp_speedup'] == pytest.approx(report['runs'][1]['it_per_s'] / report['runs'][0]['it_per_s'],
                                                  abs=1e-3)


def test_summary_ties_wins_losses():
    ms = load_script('mini_study')
    args = type('A', (), {'layer_sets': ['default'], 'arms': ['fp', 'qat', 'odm', 'v2']})()

    def run(arm, seed, psnr, layers='default'):
        m = {'psnr': psnr, 'ssim': psnr / 100}
        return {'arm': arm, 'layers': layers, 'seed': seed, 'metrics': {'Set5': m, 'Set14': m}}

    runs = [run('fp', ms.FP_SEED, 30.0, '-')]
    runs += [run('qat', s, 25.0 + 0.1 * s) for s in range(3)]
    runs += [run('odm', s, 25.5 + 0.1 * s + 0.01 * (s % 2)) for s in range(3)]  # +0.5 every seed: a win
    runs += [run('v2', s, 25.0 + 0.1 * s + (0.2, -0.2, 0.05)[s]) for s in range(3)]  # scattered: a tie
    rows = {r['arm']: r for r in ms.summarize(runs, args)}
    assert rows['odm']['sets']['Set5']['delta_psnr']['verdict'] == 'win'
    assert rows['v2']['sets']['Set5']['delta_psnr']['verdict'] == 'tie'
    assert rows['fp']['sets']['Set5']['delta_psnr']['verdict'] == 'win'
    assert rows['qat']['sets']['Set5']['psnr']['std'] == pytest.approx(0.1)


def test_pretrained_start_plans_the_issue_arms(tiny_data, tmp_path):
    """With --pretrained-opt there is no FP stage; each arm's options say what the arm changes; naive_matched takes
    odm's weight times the coop that odm's run logged; odm's weights are the given shares of l_pix / l_var."""
    import torch
    import yaml
    from basicsr.archs import build_network
    study = load_script('mini_study')
    arch = {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 4, 'num_block': 1, 'upscale': SCALE}
    torch.manual_seed(0)
    ckpt = tmp_path / 'fp.pth'
    torch.save(build_network(dict(arch)).state_dict(), ckpt)  # a plain state dict
    net_yml = tmp_path / 'net.yml'
    net_yml.write_text(yaml.safe_dump({'scale': SCALE, 'network_g': arch}))
    args = study.parse_args(['--out', str(tmp_path / 'o'), '--data', str(tiny_data), '--train-sets', 'T91',
                             '--pretrained-opt', str(net_yml), '--pretrained', str(ckpt), '--seeds', '0',
                             '--layer-sets', 'default', '--arms', 'qat', 'naive_matched', 'clip_only', 'qlr10',
                             'v2', 'v2_noclip', 'odm_low'])
    assert args.pretrained_key is None and args.var_shares == [0.01, 0.1, 0.5]
    assert args.arms.index('odm') < args.arms.index('naive_matched')  # odm is added and runs first
    args.var_unit = {'default': 2e-3}
    makers = study.plan(args, {'name': 't'})
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        log_dir = tmp_path / 'experiments' / 'odm_default_s0'
        log_dir.mkdir(parents=True)
        record = [{'event': 'iter', 'iter': 1, 'values': {'l_pix': 3e-2, 'coop': 0.4, 'agree': 0.5}},
                  {'event': 'val', 'iter': 1, 'metrics': {'psnr': 20.0}},
                  {'event': 'iter', 'iter': 2, 'values': {'l_pix': 2e-2, 'coop': 0.2}}]
        (log_dir / 'train_record.jsonl').write_text(''.join(json.dumps(e) + '\n' for e in record))
        stages = {st.name: st for st in (m() for m in makers)}
    finally:
        os.chdir(cwd)
    assert 'fp' not in stages and set(stages) == {f'{a}_default_s0' for a in args.arms if a != 'fp'}
    opts = {name.rsplit('_default', 1)[0]: st.opt for name, st in stages.items()}
    for o in opts.values():
        assert o['network_g']['arch'] == arch and o['path']['pretrain_network_g'] == str(ckpt)
        assert o['path']['param_key_g'] is None
    assert opts['qat']['train']['cooperation'] == 'off' and 'clip_correction' not in opts['qat']['network_g']
    assert opts['clip_only']['network_g']['clip_correction'] is True
    assert opts['clip_only']['train']['cooperation'] == 'off'
    assert opts['qlr10']['train']['quant_lr_mult'] == 10 and opts['qlr10']['train']['cooperation'] == 'off'
    assert opts['v2']['network_g']['clip_correction'] is True and opts['v2_noclip']['network_g'][
        'clip_correction'] is False
    assert opts['odm']['train']['reg_opt']['loss_weight'] == pytest.approx(0.1 * 2e-3)
    assert opts['odm_low']['train']['reg_opt']['loss_weight'] == pytest.approx(0.01 * 2e-3)
    assert opts['naive_matched']['train']['cooperation'] == 'naive'
    assert opts['naive_matched']['train']['reg_opt']['loss_weight'] == pytest.approx(0.1 * 2e-3 * 0.3)
