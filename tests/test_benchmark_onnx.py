"""scripts/benchmark_onnx.py: a tiny real run (built networks, then the same pair given as files) and its report."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')

SCRIPT = Path(__file__).resolve().parents[1] / 'scripts' / 'benchmark_onnx.py'
NUM_BLOCK = 2
#: Quantized convs per arch with the default layer presets: EDSR two per residual block, RLFN three per block.
QUANTIZED_PER_BLOCK = {'EDSR': 2, 'RLFN': 3}


def _load_script():
    spec = importlib.util.spec_from_file_location('benchmark_onnx', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table_rows(md):
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('|---'))
    return [line for line in lines[start + 1:] if line.startswith('| ')]


def _check_result(result, keys, md):
    rows = {(r['arch'], r['scale'], r['size']): r for r in result['results']}
    assert len(rows) == len(result['results'])
    assert set(rows) == set(keys)
    for key, r in rows.items():
        for name in ('fp32_ms', 'int_ms', 'fp32_min_ms', 'int_min_ms'):
            assert isinstance(r[name], float) and math.isfinite(r[name]) and r[name] > 0, (key, name, r)
        assert r['ratio'] == pytest.approx(r['int_ms'] / r['fp32_ms'], rel=1e-12)
        # every quantized conv runs as an integer conv; the rest of the convs stay float, none is lost
        assert r['int_integer_convs'] == r['quantized_convs'] > 0, r
        assert r['int_integer_convs'] + r['int_float_convs'] == r['fp32_convs'], r
        assert r['fp32_integer_convs'] == 0
    assert len(_table_rows(md)) == len(keys)
    machine = result['machine']
    assert machine['onnxruntime'] and machine['cpu'] and isinstance(machine['vnni'], bool)
    assert machine['vnni'] == bool(machine['vnni_flags'])


def test_tiny_built_networks_then_given_pair(tmp_path, capsys):
    bench = _load_script()
    sizes, scales, archs = [16, 24], [2, 4], ['EDSR', 'RLFN']
    json_path, md_path = tmp_path / 'bench.json', tmp_path / 'bench.md'
    result = bench.main(['--archs', *archs, '--scales', *map(str, scales), '--sizes', *map(str, sizes),
                         '--num-feat', '8', '--num-block', str(NUM_BLOCK), '--rounds', '2', '--workdir',
                         str(tmp_path / 'models'), '--json', str(json_path), '--md', str(md_path)])
    md = md_path.read_text()
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(result))
    _check_result(result, [(a, s, n) for a in archs for s in scales for n in sizes], md)
    for r in result['results']:
        assert r['quantized_convs'] == QUANTIZED_PER_BLOCK[r['arch']] * NUM_BLOCK
        assert (r['w_bits'], r['a_bits']) == (4, 4)
    for m in result['models']:  # the ONNX file's count agrees with the deploy form and the export report
        assert m['quantized_convs'] == m['deploy_integer_layers'] == m['export_quantized_convs']
    assert result['rounds'] == 2 and result['threads'] == 1 and result['sizes'] == sizes
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == json.loads(json.dumps(result))  # the JSON object is the last line of stdout
    assert md.strip() in '\n'.join(out)

    # the same integer model and float twin given as files (as odm-export writes them): the scale is read back
    pair = next(m for m in result['models'] if m['arch'] == 'EDSR' and m['scale'] == 4)
    given = bench.main(['--onnx', pair['onnx'], '--float', pair['float'], '--label', 'given', '--sizes', '16',
                        '--rounds', '1', '--warmup', '0', '--md', str(tmp_path / 'given.md')])
    _check_result(given, [('given', 4, 16)], (tmp_path / 'given.md').read_text())
    assert given['results'][0]['quantized_convs'] == pair['quantized_convs']


def test_given_pair_needs_its_float_twin(tmp_path):
    bench = _load_script()
    model = tmp_path / 'model.onnx'
    model.write_bytes(b'')
    with pytest.raises(SystemExit, match='--float'):
        bench.main(['--onnx', str(model)])
