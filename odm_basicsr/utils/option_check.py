"""Fail fast on option-file mistakes, before BasicSR creates folders or builds anything.

BasicSR 1.4.2 reads option files leniently: a misspelt key is silently ignored or crashes deep inside training.
:func:`check_options` runs on the parsed options and raises :class:`OptionError` naming the problem.

The plugin's own options are declared in :mod:`odm_basicsr.option_schema` and checked strictly there: ``network_g``
of ``type: Quantized`` (by building the network, whose constructor validates its arguments) and the ``train``
section of a model class with an ``option_schema`` (``ODMModel``). In BasicSR's own sections, unknown keys that look
like a misspelling of a known key are errors; other unknown keys (options of other BasicSR plugins' models) are
allowed.
"""
# ruff: noqa: I001  (the plugin before BasicSR)
import difflib
import os
import re

import odm_basicsr.plugin  # noqa: F401  (BasicSR fixes, and the registries the checks look into, first)
from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, METRIC_REGISTRY, MODEL_REGISTRY

from odm_basicsr.option_schema import BASICSR_KEYS, EXPORT
from odm_basicsr.utils.schema import OptionError, did_you_mean

__all__ = ['OptionError', 'check_options']

OPTIMIZERS = ('Adam', 'AdamW', 'Adamax', 'SGD', 'RMSprop')
SCHEDULERS = ('MultiStepLR', 'MultiStepRestartLR', 'CosineAnnealingRestartLR')
_FLOAT_STRING = re.compile(r'^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$')


def _check_keys(section, where, extra=()):
    """BasicSR's sections: an unknown key that looks like a known one is an error (other plugins' keys pass)."""
    known = set(BASICSR_KEYS[where]) | set(extra)
    for key in section:
        hint = '' if key in known else did_you_mean(key, known)
        if hint:
            raise OptionError(f'unknown option "{f"{where}.{key}" if where else key}"{hint}')


def _check_float_strings(node, path=''):
    """PyYAML reads 2e-4 as a string (YAML 1.1): catch it before torch does."""
    if isinstance(node, dict):
        for k, v in node.items():
            _check_float_strings(v, f'{path}.{k}' if path else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _check_float_strings(v, f'{path}[{i}]')
    elif isinstance(node, str) and _FLOAT_STRING.match(node):
        raise OptionError(f'option "{path}" is the string {node!r}: PyYAML reads this notation as text. '
                          f'Write !!float {node} or {float(node)!r}')


def _check_registered(registry, type_name, key):
    if type_name is None:
        raise OptionError(f'option "{key}" is missing')
    if type_name not in registry:
        names = sorted(registry._obj_map)
        close = difflib.get_close_matches(str(type_name), names, n=3)
        hint = f' Did you mean {close}?' if close else ''
        raise OptionError(f'option "{key}": {type_name!r} is not a registered {registry._name}.{hint} '
                          f'Registered: {", ".join(names)}')


def _check_file(path, key):
    if path is not None and not os.path.isfile(path):
        raise OptionError(f'option "path.{key}": file not found: {path}')


def check_options(opt, is_train=True):
    """Validate the options that BasicSR's ``parse_options`` returned. Raises :class:`OptionError`."""
    _check_float_strings({k: v for k, v in opt.items() if k != 'name'})
    model_cls = MODEL_REGISTRY.get(opt['model_type']) if opt.get('model_type') in MODEL_REGISTRY else None
    train_schema = getattr(model_cls, 'option_schema', None)
    _check_keys(opt, '', extra=('export',))
    if opt.get('export') is not None:  # odm-export's section: checked here too, so that a typo shows before training
        EXPORT.validate(opt['export'], where='export')
    for section in ('train', 'val', 'logger', 'path'):
        if not isinstance(opt.get(section), dict):
            continue
        if section == 'train' and train_schema is not None:
            if is_train:  # strict; the model logs the deprecation notices when it reads the options
                train_schema.validate(opt['train'], where='train')
            else:
                _check_keys(opt['train'], 'train', train_schema.keys())
        else:
            _check_keys(opt[section], section)
    if 'num_gpu' not in opt:
        raise OptionError('option "num_gpu" is missing (0 = CPU, "auto" = all visible GPUs)')
    _check_registered(MODEL_REGISTRY, opt.get('model_type'), 'model_type')
    for name, ds in (opt.get('datasets') or {}).items():
        if name.split('_')[0] not in ('train', 'val', 'test'):
            raise OptionError(f'dataset "{name}": the key must start with train, val or test')
        _check_registered(DATASET_REGISTRY, ds.get('type'), f'datasets.{name}.type')
        if (ds.get('io_backend') or {}).get('type', 'disk') == 'disk':
            for key in ('dataroot_gt', 'dataroot_lq'):
                if ds.get(key) is not None and not os.path.isdir(ds[key]):
                    raise OptionError(f'option "datasets.{name}.{key}": folder not found: {ds[key]}')
    network = opt.get('network_g')
    if not isinstance(network, dict):
        raise OptionError('option "network_g" is missing')
    _check_registered(ARCH_REGISTRY, network.get('type'), 'network_g.type')
    if network['type'] == 'Quantized' and model_cls is not None and not _quantization_aware(model_cls):
        raise OptionError(f'model_type {opt["model_type"]} does not know quantized networks: use model_type: '
                          'QuantSRModel (SRModel with quantizer-aware checkpoints, NaN guards and EMA of quantizer '
                          'state) or ODMModel')
    try:  # not basicsr's build_network: its logging would set up BasicSR's logger before the log file exists
        kwargs = {k: v for k, v in network.items() if k != 'type'}
        ARCH_REGISTRY.get(network['type'])(**kwargs)
    except (ValueError, TypeError) as e:
        raise OptionError(f'network_g: {e}') from e
    path = opt.get('path') or {}
    resuming = bool(path.get('resume_state')) or opt.get('auto_resume')
    if not resuming:
        _check_file(path.get('pretrain_network_g'), 'pretrain_network_g')
    _check_file(path.get('resume_state'), 'resume_state')
    if is_train:
        _check_train(opt.get('train') or {})
    for name, metric in ((opt.get('val') or {}).get('metrics') or {}).items():
        _check_registered(METRIC_REGISTRY, metric.get('type'), f'val.metrics.{name}.type')


def _quantization_aware(model_cls):
    from odm_basicsr.models.quant_sr_model import QuantSRModel

    return issubclass(model_cls, QuantSRModel)


def _check_train(train):
    optim = train.get('optim_g')
    if optim is not None and optim.get('type') not in OPTIMIZERS:
        raise OptionError(f'option "train.optim_g.type": {optim.get("type")!r} is not one of {list(OPTIMIZERS)}')
    sched = train.get('scheduler')
    if sched is not None and sched.get('type') not in SCHEDULERS:
        raise OptionError(f'option "train.scheduler.type": {sched.get("type")!r} is not one of {list(SCHEDULERS)}')
    for key, value in train.items():
        if key.endswith('_opt') and isinstance(value, dict):
            _check_registered(LOSS_REGISTRY, value.get('type'), f'train.{key}.type')
    if 'total_iter' not in train:
        raise OptionError('option "train.total_iter" is missing')
