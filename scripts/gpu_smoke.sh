#!/usr/bin/env bash
# GPU smoke test: ~50 iterations of options/train/ODM/train_ODM_EDSR_W2A2_x4.yml on one CUDA GPU, adapted to the
# embedded photos (EmbeddedSRDataset train/val; no DIV2K, no FP checkpoint: the quantized EDSR starts from random
# init, which is enough for a speed check), AMP off. Prints iterations per second from BasicSR's log.
# Exits 0 with a message when torch sees no CUDA device.
# Usage: bash scripts/gpu_smoke.sh [ITERS]   (run from anywhere; default ITERS=50)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
ITERS=${1:-50}

if [ "$($PY -c 'import torch; print(torch.cuda.is_available())')" != "True" ]; then
    echo "gpu_smoke: no GPU present (torch.cuda.is_available() is False); nothing to do, skipping."
    exit 0
fi

# AMP: BasicSR 1.4.2's SRModel has no AMP option; report honestly whether ODMModel has a switch.
if grep -qiE 'autocast|GradScaler' odm_basicsr/models/*.py; then
    AMP_NOTE="ODMModel mentions autocast/GradScaler, but this script measures AMP off only."
else
    AMP_NOTE="AMP is not implemented (no autocast/GradScaler in ODMModel; BasicSR 1.4.2 SRModel has no AMP option): only AMP off is measured."
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_smoke.XXXXXX")
echo "gpu_smoke: work folder $WORK"
$PY - "$WORK" "$ITERS" <<'PYEOF'
import sys

import yaml

work, iters = sys.argv[1], int(sys.argv[2])
with open('options/train/ODM/train_ODM_EDSR_W2A2_x4.yml', encoding='utf-8') as f:
    opt = yaml.safe_load(f)
opt['name'] = 'gpu_smoke_ODM_EDSR_W2A2_x4'
opt['num_gpu'] = 1
common = {'gt_size': 192, 'use_hflip': True, 'use_rot': True, 'num_worker_per_gpu': 2, 'batch_size_per_gpu': 8,
          'prefetch_mode': None}
opt['datasets'] = {
    'train': {'name': 'embedded_train', 'type': 'EmbeddedSRDataset', 'split': 'train', 'dataset_enlarge_ratio': 1000,
              **common},
    'val': {'name': 'embedded_val', 'type': 'EmbeddedSRDataset', 'split': 'val', 'val_size': 192},
}
opt['path']['pretrain_network_g'] = None
opt['train']['total_iter'] = iters
opt['train']['scheduler']['milestones'] = [10 * iters]
opt['train']['calibration'] = {'batches': 2}
opt['train']['log_layer_freq'] = 10 * iters
opt['val']['val_freq'] = iters
opt['logger']['print_freq'] = max(1, iters // 5)
opt['logger']['save_checkpoint_freq'] = iters
opt['logger']['use_tb_logger'] = False
with open(f'{work}/smoke.yml', 'w', encoding='utf-8') as f:
    yaml.safe_dump(opt, f, sort_keys=False)
PYEOF

echo "gpu_smoke: training $ITERS iterations, AMP off ..."
START=$(date +%s)
(cd "$WORK" && $PY -m odm_basicsr.train -opt smoke.yml) > "$WORK/console.txt" 2>&1 || {
    echo "gpu_smoke: training FAILED; last output:"; tail -30 "$WORK/console.txt"; exit 1; }
END=$(date +%s)
grep -E 'iter:|# psnr|# ssim' "$WORK/console.txt" | tail -8 || true
# BasicSR prints '[eta: ..., time (data): T (D)]' with T = mean seconds per iteration over the recent window.
T=$(grep -oE 'time \(data\): [0-9.]+' "$WORK/console.txt" | tail -1 | awk '{print $3}')
if [ -n "$T" ]; then
    $PY -c "print(f'gpu_smoke: AMP off: {1 / $T:.2f} iterations/s ({$T:.4f} s/iteration, BasicSR log, last window)')"
else
    echo "gpu_smoke: no timing line found in the log"
fi
echo "gpu_smoke: wall time $((END - START)) s for $ITERS iterations (process start, calibration and validation included)"
echo "gpu_smoke: AMP on: skipped. $AMP_NOTE"
echo "gpu_smoke: full output in $WORK/console.txt"
