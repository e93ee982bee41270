"""scripts/benchmark_step.py: a tiny real run on the CPU (JSON contract) and its option building."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / 'scripts' / 'benchmark_step.py'
VARIANTS = ('fp', 'qat', 'feature', 'param', 'cosine', 'naive')
TINY = ['--num-feat', '8', '--num-block', '2', '--steps', '2', '--warmup', '1', '--rounds', '1', '--patch', '12',
        '--batch', '2', '--device', 'cpu', '--threads', '1', '--calib-batches', '1']


def _load_script():
    spec = importlib.util.spec_from_file_location('benchmark_step', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positive_finite(values, keys=VARIANTS):
    assert set(keys) <= set(values), values
    for key in keys:
        assert isinstance(values[key], (int, float)) and math.isfinite(values[key]) and values[key] > 0, (key, values)


@pytest.mark.slow
def test_tiny_run_prints_table_and_json_last_line(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), *TINY], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert any(line.startswith('feature (default)') for line in lines[:-1])  # the human table comes first
    assert 'default ODM mode (feature) / qat step time' in out.stdout
    for key in ('step_ms', 'peak_mem_mb', 'ratio_to_qat', 'iqr_ms', 'min_ms', 'cpu_ms', 'saved_mb'):
        assert key in result, key
    for key in ('step_ms', 'peak_mem_mb', 'ratio_to_qat', 'min_ms', 'cpu_ms', 'saved_mb', 'resident_mb'):
        _positive_finite(result[key])
    for name in VARIANTS:
        assert result['ratio_to_qat'][name] == pytest.approx(result['step_ms'][name] / result['step_ms']['qat'],
                                                             rel=1e-3, abs=1e-3)
    assert result['ratio_to_qat']['qat'] == pytest.approx(1.0)
    assert result['default'] == 'feature'
    assert result['feature_over_qat'] == pytest.approx(result['ratio_to_qat']['feature'])
    assert result['target'] == 1.3
    assert result['device'].startswith('cpu') and result['torch']
    cfg = result['config']
    assert cfg['arch']['num_feat'] == 8 and cfg['arch']['num_block'] == 2 and cfg['patch'] == 12
    assert cfg['batch'] == 2 and cfg['threads'] == 1 and cfg['samples_per_variant'] == 2
    # quantized variants save more for backward than FP (the fake-quant graph); ODM no less than QAT
    assert result['saved_mb']['qat'] > result['saved_mb']['fp']
    assert result['saved_mb']['feature'] >= result['saved_mb']['qat']


def test_variant_options_share_network_and_data():
    bench = _load_script()
    args = bench.parse_args(['--num-feat', '8', '--num-block', '2', '--modes', 'feature'])
    assert args.modes == ['qat', 'feature']  # qat is always the reference
    base = bench.base_options(args, bench.torch.device('cpu'), '/tmp/fp.pth')
    opts = {v: bench.variant_options(base, v) for v in VARIANTS}
    assert opts['fp']['model_type'] == 'SRModel' and opts['fp']['network_g']['type'] == 'EDSR'
    assert opts['qat']['train']['cooperation'] == 'off' and 'offsets' not in opts['qat']['network_g']
    assert 'reg_opt' not in opts['qat']['train']
    for mode in ('feature', 'param', 'cosine', 'naive'):
        opt = opts[mode]
        assert opt['model_type'] == 'ODMModel' and opt['train']['cooperation'] == mode
        assert opt['train']['reg_opt']['type'] == 'FeatureVarianceLoss'
        assert opt['network_g']['offsets'] == {'select': 'topk', 'fraction': 0.25, 'kind': 'auto'}
    for v in VARIANTS:
        arch = opts[v]['network_g'] if v == 'fp' else opts[v]['network_g']['arch']
        assert arch == opts['fp']['network_g']
        assert opts[v]['path']['pretrain_network_g'] == '/tmp/fp.pth'
        assert opts[v]['datasets'] == base['datasets']
    assert base['datasets']['train']['gt_size'] == args.patch * args.scale == 24 * 4


def test_median_iqr():
    bench = _load_script()
    assert bench.median_iqr([5.0]) == (5.0, 0.0)
    med, iqr = bench.median_iqr([1.0, 2.0, 3.0, 4.0, 5.0])
    assert med == 3.0 and iqr == pytest.approx(2.0)
