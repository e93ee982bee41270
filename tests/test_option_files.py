"""The paper-recipe option files ``odm_basicsr/options/{train,test}/ODM/*.yml`` (package data, written by
``scripts/make_option_files.py``).

Each file is read by BasicSR's own ``parse_options`` (in a temporary working directory), passes
``check_options`` once the data folders and checkpoint it names exist there (and fails only on exactly those
paths before), and its ``network_g`` builds. Builds skip weight initialisation (unused here) and each distinct
``network_g`` is built once, to keep the file fast.
"""
import os
import re
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from basicsr.utils.options import ordered_yaml, parse_options
from basicsr.utils.registry import ARCH_REGISTRY
from odm_helpers import load_script

from odm_basicsr.archs import srresnet_bn_arch
from odm_basicsr.quant import quantized_layers, quantizer_state_keys
from odm_basicsr.utils.option_check import OptionError, check_options

REPO = Path(__file__).resolve().parents[1]
NAME = re.compile(r'^(train|test)_(ODM|QAT)_(EDSR|RDN|SRResNet)_W([234])A\4_x([24])\.yml$')
OPTIONS = REPO / 'odm_basicsr' / 'options'
FILES = sorted(p for d in ('train/ODM', 'test/ODM') for p in (OPTIONS / d).glob('*.yml'))
IDS = [p.name for p in FILES]
FP_PARAMS = {  # parameter counts of the FP networks (rdn_arch.py / srresnet_bn_arch.py docstrings; EDSR counted)
    ('RDN', 2): 22_123_395, ('RDN', 4): 22_271_107, ('SRResNet', 2): 1_399_314, ('SRResNet', 4): 1_546_771,
}


def _no_init(t, *args, **kwargs):
    return t


_BUILT = {}
_QUANTIZED = ARCH_REGISTRY.get('Quantized')


def _cached_quantized(**kwargs):
    key = repr(sorted(kwargs.items()))
    if key not in _BUILT:
        with mock.patch.multiple(torch.nn.init, kaiming_uniform_=_no_init, kaiming_normal_=_no_init,
                                 uniform_=_no_init, normal_=_no_init):
            if hasattr(srresnet_bn_arch, 'default_init_weights'):  # BasicSR's helper rescales the weights
                with mock.patch.object(srresnet_bn_arch, 'default_init_weights', lambda *a, **k: None):
                    _BUILT[key] = _QUANTIZED(**kwargs)
            else:
                _BUILT[key] = _QUANTIZED(**kwargs)
    return _BUILT[key]


@pytest.fixture(scope='module', autouse=True)
def _release_networks():
    yield
    _BUILT.clear()


@pytest.fixture
def fast_builds():
    with mock.patch.dict(ARCH_REGISTRY._obj_map, {'Quantized': _cached_quantized}):
        yield


def _parse(path, tmp_path, monkeypatch, is_train):
    """BasicSR's parse_options on ``path``, run in ``tmp_path`` (adds phase/scale, dist, rank, is_train...)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', ['odm-train', '-opt', str(path)])
    opt, _ = parse_options(str(tmp_path), is_train=is_train)
    return opt


def _referenced_paths(opt):
    folders = {ds[k] for ds in opt['datasets'].values() for k in ('dataroot_gt', 'dataroot_lq')}
    return folders, {opt['path']['pretrain_network_g']}


def test_the_full_set_exists_and_is_named_consistently():
    assert len(FILES) == 2 * 2 * 3 * 3 * 2  # train/test x ODM/QAT x 3 archs x 3 bit widths x 2 scales
    for path in FILES:
        assert NAME.match(path.name), path.name
        assert path.parent.name == 'ODM' and path.parent.parent.name == path.name.split('_')[0]


def test_files_are_up_to_date_with_the_generator():
    make = load_script('make_option_files')
    files = make.generate()
    assert sorted(files) == sorted(str(p.relative_to(REPO)) for p in FILES)
    for rel, (text, expected) in files.items():
        assert (REPO / rel).read_text(encoding='utf-8') == text, f'{rel}: rerun scripts/make_option_files.py'
        assert make._same(yaml.load(text, Loader=ordered_yaml()[0]), expected), rel


def test_yaml_writer_scalars():
    make = load_script('make_option_files')
    for value, text in ((1e-4, '!!float 1e-4'), (2.5e-6, '!!float 2.5e-6'), (0.5, '0.5'), (255.0, '255.0'),
                        (1.0, '1.0'), ('{}', "'{}'"), ('off', "'off'"), ('topk', 'topk'), (None, '~'),
                        (True, 'true'), ([15000, 30000], '[15000, 30000]')):
        assert make.format_scalar(value) == text
        assert yaml.load(f'k: {text}', Loader=ordered_yaml()[0])['k'] == value


@pytest.mark.parametrize('path', FILES, ids=IDS)
def test_option_file(path, tmp_path, monkeypatch, fast_builds):
    kind, method, arch, bits, scale = NAME.match(path.name).groups()
    bits, scale, is_train = int(bits), int(scale), kind == 'train'
    with open(path, encoding='utf-8') as f:
        raw = yaml.load(f, Loader=ordered_yaml()[0])
    stem = path.stem.split('_', 1)[1]

    # content that the name promises, and the recipe (METHOD.md 5)
    assert raw['name'] == stem and raw['model_type'] == 'ODMModel' and raw['scale'] == scale
    net = raw['network_g']
    assert net['type'] == 'Quantized' and net['w_bits'] == net['a_bits'] == bits
    assert net['arch']['type'] == arch and net['arch']['upscale'] == scale
    assert net.get('offsets') == ({'select': 'topk', 'fraction': 0.25} if method == 'ODM' else None)
    for m in ('psnr', 'ssim'):
        assert raw['val']['metrics'][m] == {'type': f'calculate_{m}', 'crop_border': scale, 'test_y_channel': True}
    assert raw['path']['strict_load_g'] is True
    if is_train:
        train, ds = raw['train'], raw['datasets']['train']
        assert raw['path']['pretrain_network_g'] == f'pretrained/{arch}_x{scale}_fp.pth'
        assert ds['dataroot_gt'] == 'datasets/DIV2K/DIV2K_train_HR_sub'
        assert ds['dataroot_lq'] == f'datasets/DIV2K/DIV2K_train_LR_bicubic/X{scale}_sub'
        assert ds['gt_size'] == {2: 96, 4: 192}[scale] and ds['use_hflip'] and ds['use_rot']
        assert ds['batch_size_per_gpu'] == 8 and raw['num_gpu'] == 1
        assert raw['datasets']['val']['dataroot_lq'] == f'datasets/Set5/LRbicx{scale}'
        assert train['total_iter'] == 60000 and train['optim_g']['type'] == 'Adam'
        assert train['optim_g']['lr'] == pytest.approx(1e-4) and isinstance(train['optim_g']['lr'], float)
        assert train['scheduler'] == {'type': 'MultiStepLR', 'milestones': [15000, 30000, 45000], 'gamma': 0.5}
        assert train['pixel_opt']['type'] == 'L1Loss'
        if method == 'ODM':
            assert train['cooperation'] == 'feature'
            assert train['reg_opt'] == {'type': 'FeatureVarianceLoss', 'loss_weight': pytest.approx(1e-6),
                                        'reduction': 'channel'}
            assert isinstance(train['reg_opt']['loss_weight'], float)
        else:
            assert train['cooperation'] == 'off' and 'reg_opt' not in train and 'var_opt' not in train
    else:
        assert raw['path']['pretrain_network_g'] == f'experiments/{stem}/models/net_g_latest.pth'
        assert [d['name'] for d in raw['datasets'].values()] == ['Set5', 'Set14', 'B100', 'Urban100']
        assert all(d['dataroot_lq'] == f'datasets/{d["name"]}/LRbicx{scale}' for d in raw['datasets'].values())

    # BasicSR's parser, then check_options: before the data and checkpoint exist, the only errors are
    # "not found" for exactly the paths the file names; with them in place (empty folders, a dummy file) it passes
    opt = _parse(path, tmp_path, monkeypatch, is_train)
    assert opt['is_train'] is is_train and opt['dist'] is False and opt['rank'] == 0
    assert all(ds['scale'] == scale and ds['phase'] == name.split('_')[0] for name, ds in opt['datasets'].items())
    folders, files = _referenced_paths(opt)
    created = set()
    for _ in range(len(folders) + len(files) + 1):
        try:
            check_options(opt, is_train)
            break
        except OptionError as e:
            missing = re.search(r'(?:folder|file) not found: (\S+)$', str(e))
            assert missing, f'unexpected option error: {e}'
            target = missing.group(1)
            assert target in folders | files and target not in created, str(e)
            if target in folders:
                (tmp_path / target).mkdir(parents=True)
            else:
                (tmp_path / target).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / target).write_bytes(b'')
            created.add(target)
    else:
        pytest.fail('check_options did not pass')
    assert created == folders | files  # every named path is checked, and nothing else fails
    assert not os.path.exists(tmp_path / ('experiments' if is_train else 'results'))  # nothing made by BasicSR


NETWORKS = sorted({(m, a, int(b), int(s)) for m, a, b, s in (NAME.match(p.name).groups()[1:] for p in FILES)})


@pytest.mark.parametrize('method,arch,bits,scale', NETWORKS, ids=['_'.join(map(str, n)) for n in NETWORKS])
def test_network_builds(method, arch, bits, scale, fast_builds):
    path = OPTIONS / 'train' / 'ODM' / f'train_{method}_{arch}_W{bits}A{bits}_x{scale}.yml'
    with open(path, encoding='utf-8') as f:
        network_opt = yaml.load(f, Loader=ordered_yaml()[0])['network_g']
    net = ARCH_REGISTRY.get('Quantized')(**{k: v for k, v in network_opt.items() if k != 'type'})
    assert type(net).__name__ == f'Quantized{arch}'
    layers = quantized_layers(net)
    assert len(layers) == {'EDSR': 32, 'RDN': 128, 'SRResNet': 32}[arch]
    assert all(m.w_bits == bits and m.a_bits == bits for _, m in layers)
    offsets = {'select': 'topk', 'fraction': 0.25, 'threshold': None, 'kind': 'auto'}  # the schema's defaults filled in
    assert net.quant_config['offsets'] == (offsets if method == 'ODM' else None)
    assert net.quant_config['fp'] is False
    if (arch, scale) in FP_PARAMS:
        quant = set(quantizer_state_keys(net))
        fp = sum(p.numel() for k, p in net.named_parameters() if k not in quant)
        assert fp == FP_PARAMS[(arch, scale)]
