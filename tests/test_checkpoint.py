"""``odm_basicsr.checkpoint``: the one checkpoint loader (selection, canonical keys, fit, refusals, atomic save)."""
import os
import subprocess
import sys
from copy import deepcopy

import pytest
import torch
from odm_helpers import TINY_EDSR

from odm_basicsr import checkpoint as ck
from odm_basicsr.guards import NonFiniteError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QEDSR = {'type': 'Quantized', 'arch': TINY_EDSR, 'w_bits': 4, 'a_bits': 4}


def _build(net_opt, seed=0):
    from basicsr.archs import build_network

    import odm_basicsr.archs  # noqa: F401  (registration)

    torch.manual_seed(seed)
    return build_network(deepcopy(net_opt)).eval()


def test_importable_without_basicsr_cv2_scipy():
    code = ('import sys, odm_basicsr.checkpoint; '
            'print(sorted(m for m in ("basicsr", "cv2", "scipy") if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=REPO), check=True)
    assert out.stdout.strip() == '[]'


def test_wrapper_prefixes_are_removed_ddp_and_torch_compile():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 1))
    compiled = torch.compile(net)  # lazy: state_dict() does not compile anything
    assert next(iter(compiled.state_dict())).startswith('_orig_mod.')
    wrapped = {f'module.{k}': v for k, v in compiled.state_dict().items()}
    for ckpt in (compiled.state_dict(), wrapped, {'params': wrapped}, {'params_ema': compiled.state_dict()}):
        key, state = ck.select_state_dict(ckpt, 'params_ema')
        assert list(state) == list(net.state_dict())
    assert ck.canonical_key('body._orig_mod.conv.weight') == 'body.conv.weight'
    assert ck.canonical_key('module.module.x') == 'x' and ck.canonical_key('net.module.x') == 'net.module.x'


def test_selection_fallbacks_and_errors_keep_their_types():
    t = torch.zeros(1)
    assert ck.select_state_dict({'params': {'a': t}, 'params_ema': {'a': t}}, 'params_ema')[0] == 'params_ema'
    assert ck.select_state_dict({'params': {'a': t}}, 'params_ema')[0] == 'params'
    assert ck.select_state_dict({'a': t}, None)[0] is None
    with pytest.raises(KeyError) as e:  # MissingEntryError is a KeyError whose str() is the message
        ck.select_state_dict({'params_ema': {'a': t}}, 'params', fallback=None, source='checkpoint x.pth')
    assert str(e.value) == 'checkpoint x.pth has no "params" entry (found: [\'params_ema\'])'
    with pytest.raises(TypeError):
        ck.select_state_dict({'params': 3}, 'params')


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match='checkpoint file not found'):
        ck.load_checkpoint(str(tmp_path / 'nope.pth'))
    (tmp_path / 'text.pth').write_text('not a checkpoint')
    with pytest.raises(RuntimeError, match='weights_only=True'):
        ck.load_checkpoint(str(tmp_path / 'text.pth'))


def test_fp_checkpoint_fits_a_quantized_network_other_mismatches_name_file_and_keys(tmp_path):
    fp = _build(TINY_EDSR)
    path = tmp_path / 'fp.pth'
    torch.save({'params': fp.state_dict()}, path)
    net = _build(QEDSR, seed=1)
    loaded = ck.load_weights(net, str(path), 'params_ema')
    assert loaded.key == 'params' and loaded.fit.ok and loaded.fit.quantizer_missing
    assert all(torch.equal(net.state_dict()[k], v) for k, v in fp.state_dict().items())

    wide = _build(dict(TINY_EDSR, num_feat=16))
    state = {**wide.state_dict(), 'extra.weight': torch.zeros(1)}
    state.pop('conv_last.bias')
    torch.save({'params': state}, tmp_path / 'wide.pth')
    with pytest.raises(ck.CheckpointMismatchError) as e:
        ck.load_weights(_build(QEDSR), str(tmp_path / 'wide.pth'), hint='Try another file.')
    message = str(e.value)
    assert message.startswith(f'checkpoint {tmp_path / "wide.pth"} [params] does not fit network QuantizedEDSR: ')
    for part in ('1 missing (conv_last.bias)', '1 unexpected (extra.weight)', 'shape mismatch (body.0.conv1.bias',
                 'Try another file.'):
        assert part in message
    # not strict: the keys that fit are loaded, the rest is reported
    net = _build(QEDSR)
    fit = ck.load_weights(net, str(tmp_path / 'wide.pth'), strict=False).fit
    assert fit.missing == ['conv_last.bias'] and fit.unexpected == ['extra.weight']
    assert fit.shapes['conv_first.weight'] == ((8, 3, 3, 3), (16, 3, 3, 3))


def test_refusals_on_request(tmp_path):
    fp, q = _build(TINY_EDSR), _build(QEDSR)
    torch.save({'params': fp.state_dict()}, tmp_path / 'fp.pth')
    torch.save({'params': q.state_dict()}, tmp_path / 'uninit.pth')
    with pytest.raises(ck.UncalibratedError, match='no quantizer state for QuantizedEDSR .*an FP checkpoint'):
        ck.load_weights(_build(QEDSR), str(tmp_path / 'fp.pth'), calibrated=True)
    with pytest.raises(ck.UncalibratedError, match=r'leaves 4 activation quantizer\(s\) uninitialised'):
        ck.load_weights(_build(QEDSR), str(tmp_path / 'uninit.pth'), calibrated=True)
    ck.load_weights(_build(QEDSR), str(tmp_path / 'uninit.pth'))  # loads when the caller does not ask
    with torch.no_grad():
        q(torch.rand(1, 3, 8, 8))  # initialises the ranges
    torch.save({'params': q.state_dict()}, tmp_path / 'calibrated.pth')
    ck.load_weights(_build(QEDSR), str(tmp_path / 'calibrated.pth'), calibrated=True)

    state = fp.state_dict()
    state['conv_first.bias'][0] = float('nan')
    torch.save({'params': state}, tmp_path / 'nan.pth')
    with pytest.raises(NonFiniteError, match=r'\[params\] holds 1 non-finite value .*; refusing to load it$'):
        ck.load_weights(_build(TINY_EDSR), str(tmp_path / 'nan.pth'), finite='refusing to load it')
    ck.load_weights(_build(TINY_EDSR), str(tmp_path / 'nan.pth'))  # not checked unless asked


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / 'net.pth')
    ck.atomic_save({'params': {'a': torch.ones(2)}}, path)
    with pytest.raises(Exception):  # noqa: B017  (a lambda cannot be pickled: the write fails half way)
        ck.atomic_save({'params': {'a': torch.zeros(2)}, 'bad': lambda: 0}, path)
    assert torch.equal(ck.load_checkpoint(path)['params']['a'], torch.ones(2))
    assert os.listdir(tmp_path) == ['net.pth']


def test_every_loader_accepts_an_ema_only_checkpoint(tmp_path):
    """The demo's evaluation used to fail on a file holding only ``params_ema``."""
    from odm_basicsr import cost, scoring
    from odm_basicsr.study.runner import Stage

    fp = _build(TINY_EDSR)
    path = str(tmp_path / 'ema.pth')
    torch.save({'params_ema': fp.state_dict()}, path)
    stage = Stage('fp', 'fp', 32, {'network_g': TINY_EDSR})
    net = scoring.load_network(TINY_EDSR, path, 'cpu', stage.param_key)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in fp.state_dict().items())
    cost.load_weights(_build(TINY_EDSR, seed=2), path, 'params_ema')
    with pytest.raises(cost.CostError, match='has no "params" entry .*; use --param-key'):
        cost.load_weights(_build(TINY_EDSR), path)  # odm-cost's --param-key has no fallback
