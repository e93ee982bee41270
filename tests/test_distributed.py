"""Two CPU processes under torchrun (gloo): every cooperation mode keeps the ranks identical; the real
training entry point runs distributed."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent


def torchrun(args, cwd, port):
    # the checkout under test first, whatever odm_basicsr an editable install elsewhere points to
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}'] + args
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


MODES = ('feature', 'param', 'cosine', 'naive', 'off')


def test_ranks_stay_identical_in_every_mode(tmp_path):
    out = torchrun([str(HERE / 'ddp_worker.py'), *MODES], tmp_path, 29611)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for mode in MODES:
        assert f'RANKS_IDENTICAL=True mode={mode}' in out.stdout


def test_odm_train_with_pytorch_launcher(tmp_path):
    sys.path.insert(0, str(HERE))
    import copy

    from test_training_cli import BASE, write_opt
    opt = copy.deepcopy(BASE)
    opt.update(name='ddp', model_type='ODMModel')
    opt['train'].update(cooperation='feature', reg_opt={'type': 'FeatureVarianceLoss', 'loss_weight': 1e-4},
                        calibration={'batches': 1})
    opt['network_g']['offsets'] = {'fraction': 0.5}
    out = torchrun(['-m', 'odm_basicsr.train', '-opt', str(write_opt(tmp_path, opt)), '--launcher', 'pytorch'],
                   tmp_path, 29616)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = next((tmp_path / 'experiments' / 'ddp').glob('train_ddp_*.log')).read_text()
    assert 'world_size: 2' in log and 'coop:' in log
    assert (tmp_path / 'experiments' / 'ddp' / 'models' / 'net_g_latest.pth').is_file()
