#!/usr/bin/env bash
# GPU smoke test: a few iterations of odm_basicsr/options/train/ODM/train_ODM_EDSR_W2A2_x4.yml on one CUDA GPU,
# adapted to the embedded photos (EmbeddedSRDataset train/val; no DIV2K, no FP checkpoint: the quantized EDSR
# starts from random init, which is enough for a speed check), once with AMP off and once with train.amp: float16
# (ODMModel's mixed precision: autocast + gradient scaler). Prints iterations per second of each and their ratio, as a table
# and as one JSON line.
# Exits 0 with a message when torch sees no CUDA device, unless GPU_SMOKE_DEVICE=cpu, which runs the same path on
# the CPU with tiny patches and AMP bfloat16 (for the test suite; CPU timings mean nothing here).
# Usage: bash scripts/gpu_smoke.sh [ITERS]   (run from anywhere; default ITERS=50)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
ITERS=${1:-50}
DEVICE=${GPU_SMOKE_DEVICE:-cuda}

if [ "$DEVICE" = cuda ] && [ "$($PY -c 'import torch; print(torch.cuda.is_available())')" != "True" ]; then
    echo "gpu_smoke: no GPU present (torch.cuda.is_available() is False); nothing to do, skipping."
    exit 0
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_smoke.XXXXXX")
echo "gpu_smoke: work folder $WORK, device $DEVICE, $ITERS iterations per run"
$PY - "$WORK" "$ITERS" "$DEVICE" <<'PYEOF'
import json
import os
import re
import subprocess
import sys
import time

import yaml

work, iters, device = sys.argv[1], int(sys.argv[2]), sys.argv[3]
gpu = device == 'cuda'
with open('odm_basicsr/options/train/ODM/train_ODM_EDSR_W2A2_x4.yml', encoding='utf-8') as f:
    base = yaml.safe_load(f)
results = []
for amp in (False, 'float16' if gpu else 'bfloat16'):
    opt = yaml.safe_load(yaml.safe_dump(base))
    opt['name'] = f'gpu_smoke_ODM_EDSR_W2A2_x4_amp_{amp or "off"}'
    opt['num_gpu'] = 1 if gpu else 0
    size = 192 if gpu else 32
    common = {'gt_size': size, 'use_hflip': True, 'use_rot': True, 'num_worker_per_gpu': 2 if gpu else 0,
              'batch_size_per_gpu': 16 if gpu else 2, 'prefetch_mode': None}
    opt['datasets'] = {
        'train': {'name': 'embedded_train', 'type': 'EmbeddedSRDataset', 'split': 'train',
                  'dataset_enlarge_ratio': 1000, **common},
        'val': {'name': 'embedded_val', 'type': 'EmbeddedSRDataset', 'split': 'val', 'val_size': size},
    }
    if not gpu:  # the test path: a tiny EDSR, so that two runs take seconds
        opt['network_g']['arch'].update(num_feat=8, num_block=2)
    opt['path']['pretrain_network_g'] = None
    opt['train']['total_iter'] = iters
    opt['train']['amp'] = amp
    opt['train']['scheduler']['milestones'] = [10 * iters]
    opt['train']['calibration'] = {'batches': 2}
    opt['train']['log_layer_freq'] = 10 * iters
    opt['val']['val_freq'] = 10 * iters  # validation only at the end (BasicSR always validates after training)
    opt['logger']['print_freq'] = max(1, iters // 5)
    opt['logger']['save_checkpoint_freq'] = 10 * iters
    opt['logger']['use_tb_logger'] = False
    yml = os.path.join(work, f'smoke_amp_{amp or "off"}.yml')
    with open(yml, 'w', encoding='utf-8') as f:
        yaml.safe_dump(opt, f, sort_keys=False)
    print(f'gpu_smoke: training {iters} iterations, AMP {amp or "off"} ...', flush=True)
    start = time.time()
    proc = subprocess.run([sys.executable, '-m', 'odm_basicsr.train', '-opt', yml], cwd=work, capture_output=True,
                          text=True)
    wall = time.time() - start
    console = proc.stdout + proc.stderr
    with open(os.path.join(work, f'console_amp_{amp or "off"}.txt'), 'w', encoding='utf-8') as f:
        f.write(console)
    if proc.returncode != 0:
        print(f'gpu_smoke: training FAILED (AMP {amp or "off"}); last output:\n' + '\n'.join(
            console.splitlines()[-30:]))
        sys.exit(1)
    # BasicSR prints '[eta: ..., time (data): T (D)]', T = mean seconds per iteration over its recent window
    times = [float(t) for t in re.findall(r'time \(data\): ([0-9.]+)', console)]
    psnr = re.findall(r'# psnr: ([0-9.]+)', console)
    results.append({'amp': amp or 'off', 'iters': iters, 's_per_iter': times[-1] if times else None,
                    'it_per_s': round(1 / times[-1], 3) if times else None, 'wall_s': round(wall, 1),
                    'final_psnr': float(psnr[-1]) if psnr else None})
try:
    import torch
    name = torch.cuda.get_device_name(0) if gpu else 'cpu'
except Exception:  # noqa: BLE001  (the name is informative only)
    name = device
off, on = results
ratio = round(on['it_per_s'] / off['it_per_s'], 3) if off['it_per_s'] and on['it_per_s'] else None
print('\n| AMP | it/s | s/it | wall s (incl. start, calibration, validation) | PSNR after |')
print('|---|---|---|---|---|')
for r in results:
    print(f"| {r['amp']} | {r['it_per_s']} | {r['s_per_iter']} | {r['wall_s']} | {r['final_psnr']} |")
print(f'\nAMP speed-up (it/s ratio): {ratio}')
print(json.dumps({'device': name, 'option_file': 'odm_basicsr/options/train/ODM/train_ODM_EDSR_W2A2_x4.yml',
                  'runs': results, 'amp_speedup': ratio}))
PYEOF
echo "gpu_smoke: consoles and options in $WORK"
