"""The option schema: its machinery, the plugin's declarations, the README tables made from it, and where it runs
(``Quantized``, ``check_options`` before any folder, ``ODMModel``)."""
import copy
import inspect
import subprocess
from pathlib import Path

import pytest
import yaml
from basicsr.archs import build_network
from odm_helpers import TINY, load_script, odm_opt

from odm_basicsr.option_schema import (
    ODM_TRAIN,
    OFFSET_SELECT,
    OFFSETS,
    QUANTIZED,
    SECTIONS,
    markdown_tables,
    update_readme,
)
from odm_basicsr.quant import add_offsets, select_offset_layers
from odm_basicsr.utils import schema as sc
from odm_basicsr.utils.option_check import OptionError, check_options

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ the machinery
def _toy():
    inner = sc.Section([sc.Field('n', sc.Integer(1), 2, 'count'),
                        sc.Field('how', sc.OneOf(('a', 'b')), 'a', 'which')])
    return sc.Section([
        sc.Field('size', sc.Number(0, open_min=True), sc.REQUIRED, 'a size'),
        sc.Field('flag', sc.Boolean(), False, 'a flag'),
        sc.Field('mode', sc.OneOf(('x', 'off'), aliases={False: 'off'}), 'x', 'a mode'),
        sc.Field('names', sc.AnyOf(None, sc.Patterns()), None, 'some names'),
        sc.Field('spec', sc.AnyOf(None, sc.Mapping(required=('type',))), None, 'a spec', renamed_from=('old_spec',)),
        sc.Field('inner', inner, {}, 'nested'),
        sc.Field('extra', sc.Section([sc.Field('k', sc.Number(0, 1), 0.5, 'k')],
                                     coerce={True: {}, False: None, None: None}), None, 'optional nested'),
    ], rules=[sc.Rule('flag needs a spec', lambda v, label: f'{label("flag")} needs {label("spec")}'
                      if v['flag'] and v['spec'] is None else None)],
        passthrough=('theirs',), passthrough_doc="someone else's", owner='Toy')


def test_defaults_coercion_and_nested_defaults():
    out = _toy().validate({'size': 3, 'mode': False, 'extra': True, 'theirs': {'anything': 1}})
    assert out == {'theirs': {'anything': 1}, 'size': 3, 'flag': False, 'mode': 'off', 'names': None, 'spec': None,
                   'inner': {'n': 2, 'how': 'a'}, 'extra': {'k': 0.5}}
    assert _toy().validate({'size': 1, 'extra': False})['extra'] is None


@pytest.mark.parametrize('values,where,message', [
    ({}, None, '^size is missing$'),
    ({'size': 0}, None, '^size must be a positive number, got 0$'),
    ({'size': 1, 'flag': 1}, 'top', '^option "top.flag" must be true or false, got 1$'),
    ({'size': 1, 'mode': True}, None, r"^mode must be one of \['x', 'off'\], got True$"),
    ({'size': 1, 'names': 'a*'}, None, '^names must be null or a list of glob or "re:" patterns, got \'a\\*\'$'),
    ({'size': 1, 'inner': {'n': 0}}, 'top', '^option "top.inner.n" must be an integer >= 1, got 0$'),
    ({'size': 1, 'inner': {'hows': 'b'}}, 'top',
     '^unknown option "top.inner.hows": did you mean "how"\\? "top.inner" accepts only "n" and "how"$'),
    ({'size': 1, 'sizes': 2}, None,
     '^unknown option "sizes": did you mean "size"\\? Toy accepts only someone else\'s keys and "size", "flag"'),
    ({'size': 1, 'extra': 3}, None, '^extra must be a mapping, true, false or null, got 3$'),
    ({'size': 1, 'flag': True}, 'top', '^option "top.flag" needs option "top.spec"$'),
    ({'size': 1, 'spec': {'kind': 1}}, None, '^spec must be null or a mapping with "type", got'),
    ({'size': 1, 'spec': {'type': 1}, 'old_spec': {'type': 2}}, None,
     '^old_spec is the old name of "spec": give only the new one$'),
])
def test_errors_name_the_option(values, where, message):
    with pytest.raises(OptionError, match=message):
        _toy().validate(values, where=where)


def test_renamed_field_is_read_with_a_notice():
    notices = []
    out = _toy().validate({'size': 1, 'old_spec': {'type': 'T'}}, where='top', notices=notices)
    assert out['spec'] == {'type': 'T'} and 'old_spec' not in out
    assert notices == ['option "top.old_spec" is deprecated: it is now "top.spec", and its value is used as such. '
                       'Rename it in the option file.']


def test_documentation_comes_from_the_fields():
    table = _toy().markdown('top.')
    assert table.splitlines()[:3] == ['| option | type | default | description |', '|---|---|---|---|',
                                      '| `top.size` | number > 0 | required | a size |']
    assert "| `top.mode` | `x` \\| `'off'` | `x` | a mode |" in table
    assert '| `top.inner.n` | int >= 1 | `2` | count |' in table
    assert '| `top.extra.k` | number in [0, 1] | `0.5` | k |' in table
    assert table.endswith('Checked together:\n- flag needs a spec')
    assert '    size (number > 0): a size Default: required.' in _toy().args_doc()


# ------------------------------------------------------------------------------------ the plugin's declarations
def test_readme_tables_are_the_generated_ones():
    """Fails when the README's option tables drift from the schema: rerun scripts/make_option_tables.py."""
    text = (REPO / 'README.md').read_text(encoding='utf-8')
    for name, table in markdown_tables().items():
        block = text.split(f'<!-- options:{name} -->\n')[1].split(f'\n<!-- /options:{name} -->')[0]
        assert block == table, f'README table "{name}" differs from the schema: run scripts/make_option_tables.py'
    assert update_readme(text) == text
    assert set(SECTIONS) == {'network_g', 'train', 'export'}
    with pytest.raises(ValueError, match='no <!-- options:network_g -->'):
        update_readme('no markers here')


def test_make_option_tables_check(tmp_path, capsys):
    make = load_script('make_option_tables')
    readme = tmp_path / 'README.md'
    readme.write_text((REPO / 'README.md').read_text(encoding='utf-8').replace('`train.amp`', '`train.ampp`'))
    assert make.main(['--readme', str(readme), '--check']) == 1
    assert 'differ from the schema' in capsys.readouterr().out
    assert make.main(['--readme', str(readme)]) == 0
    assert readme.read_text(encoding='utf-8') == (REPO / 'README.md').read_text(encoding='utf-8')
    assert make.main(['--readme', str(readme), '--check']) == 0


def test_offset_choices_and_defaults_are_the_quantization_cores():
    scores = {'a': {'shift': 1.0, 'scale': 0.5}, 'b': {'shift': 0.1, 'scale': 0.2}}
    kinds = OFFSETS.fields['kind'].kind.choices
    for select in OFFSET_SELECT:
        for kind in kinds:
            assert select_offset_layers(scores, select=select, threshold=0.5, kind=kind)
    defaults = inspect.signature(add_offsets).parameters
    for name in ('select', 'fraction', 'threshold', 'kind'):
        assert OFFSETS.fields[name].default == defaults[name].default, name


def test_quantized_defaults_are_the_built_networks():
    net = build_network(dict(type='Quantized', arch=dict(type='EDSR', **TINY['EDSR'](2))))
    cfg, defaults = net.quant_config, QUANTIZED.validate({'arch': {'type': 'EDSR'}})
    assert (cfg['w_bits'], cfg['a_bits'], cfg['offsets'], cfg['output_bits']) == (4, 4, None, 8)
    assert cfg['act_options'] == dict(init=defaults['act_init'], init_percentile=defaults['act_percentile'],
                                      learnable=defaults['act_learnable'], grid=defaults['act_grid'])
    assert cfg['weight_options'] == dict(granularity='layer', range_method=None, percentile=99.0,
                                         clip_correction=False, grid='midrise')
    net = build_network(dict(type='Quantized', arch=dict(type='EDSR', **TINY['EDSR'](2)), offsets=True))
    assert net.quant_config['offsets'] == {'select': 'topk', 'fraction': 0.25, 'threshold': None, 'kind': 'auto'}


@pytest.mark.parametrize('options,statistic', [
    (dict(w_bits=2, weight_percentile=95, clip_correction=True), ('weight', 'percentile')),
    (dict(w_bits=4, weight_percentile=95), ('weight', 'percentile')),
    (dict(w_bits=2, weight_percentile=95, weight_range='percentile'), ('weight', 'percentile')),
    (dict(w_bits=32, weight_percentile=95), ('weight', None)),
    (dict(a_bits=4, act_percentile=95), ('act', 'percentile')),
    (dict(a_bits=2, act_percentile=95, act_init='percentile'), ('act', 'percentile')),
])
def test_percentiles_with_the_statistics_that_use_them(options, statistic):
    layer = build_network(dict(type='Quantized', arch=dict(type='EDSR', **TINY['EDSR'](2)), **options)).body[0].conv1
    which, expected = statistic
    if which == 'weight':
        assert (layer.weight_quant.range_method if layer.weight_quant is not None else None) == expected
    else:
        assert layer.act_quant.init == expected


@pytest.mark.parametrize('options,message', [
    (dict(w_bits=32, clip_correction=True), '^clip_correction needs quantized weights'),
    (dict(a_bits=32, offsets={'fraction': 0.5}), '^offsets need quantized activations'),
    (dict(w_bits=2, weight_percentile=95), "^weight_percentile = 95 is used only with a percentile statistic, but "
                                           r"weight_range is 'mse' here \(w_bits 2, weight_range: None\)$"),
    (dict(a_bits=2, act_percentile=95.0), "^act_percentile = 95.0 is used only with a percentile statistic, but "
                                          r"act_init is 'mse' here \(a_bits 2, act_init: 'auto'\)$"),
    (dict(offsets={'select': 'threshold'}), 'offsets.threshold must be a number >= 0 when select is "threshold"'),
    (dict(offsets={'fraction': 2}), r'^offsets.fraction must be a number in \[0, 1\], got 2$'),
    (dict(offsets={'kind': 'both'}), r"^offsets.kind must be one of \['auto', 'shift', 'scale'\], got 'both'$"),
    (dict(offsets={'selekt': 'topk'}), '^unknown option "offsets.selekt": did you mean "select"'),
    (dict(offsets=0.5), '^offsets must be a mapping, true, false or null, got 0.5$'),
    (dict(layers='body'), '^layers must be "default", "all" or a list of patterns'),
    (dict(output_quant='yes'), '^output_quant must be "auto", a list of patterns or null'),
    (dict(output_bits=32), '^output_bits must be one of 2..8, got 32$'),
    (dict(act_learnable='yes'), '^act_learnable must be true or false'),
    (dict(act_percentile=40), r'^act_percentile must be a number in \(50, 100\]'),
    (dict(weight_range='max'), "^weight_range must be null or one of"),
    (dict(act_grid='fixed'), r"^act_grid must be one of \['free', 'aligned'\]"),
    (dict(weight_grid='odd'), r"^weight_grid must be one of \['midrise', 'midtread'\]"),
])
def test_quantized_option_errors(options, message):
    with pytest.raises(OptionError, match=message):
        build_network(dict(type='Quantized', arch=dict(type='EDSR', **TINY['EDSR'](2)), **options))


# --------------------------------------------------------------------------------- where the schema is applied
def _checked(opt):
    """``odm_opt`` as BasicSR's parse_options hands it to check_options (the data set is embedded: no folders)."""
    opt = copy.deepcopy(opt)
    opt.update(auto_resume=False)
    return opt


def test_check_options_validates_odm_train_strictly_and_srmodel_train_leniently():
    check_options(_checked(odm_opt()))
    opt = _checked(odm_opt())
    opt['train']['foo_bar'] = 1
    with pytest.raises(OptionError, match='unknown option "train.foo_bar": ODMModel\'s "train" accepts only'):
        check_options(opt)
    opt['model_type'] = 'QuantSRModel'  # no train schema (SRModel's): other plugins' keys pass, ours are not checked
    opt['train'].pop('reg_opt')
    check_options(opt)
    opt = _checked(odm_opt())
    opt['train']['reg_opt'] = {'type': 'L1Loss'}
    with pytest.raises(OptionError, match='"train.reg_opt.type": \'L1Loss\' is not a feature regulariser'):
        check_options(opt)
    opt = _checked(odm_opt())
    opt['network_g']['w_bit'] = 2
    with pytest.raises(OptionError, match='^network_g: unknown option "w_bit": did you mean "w_bits"'):
        check_options(opt)
    test_opt = _checked(odm_opt())  # odm-test: train keys of the model are known, not required
    test_opt['train'] = {'reg_opt': {'type': 'FeatureVarianceLoss'}, 'cooperation': 'feature'}
    check_options(test_opt, is_train=False)


def test_odm_train_reports_a_missing_regulariser_before_creating_folders(tmp_path):
    opt = odm_opt()
    opt['train'].pop('reg_opt')
    for key in ('is_train', 'dist', 'rank', 'world_size'):
        opt.pop(key)
    opt['datasets']['train'].pop('phase'), opt['datasets']['train'].pop('scale')
    (tmp_path / 'opt.yml').write_text(yaml.safe_dump(opt))
    out = subprocess.run(['odm-train', '-opt', str(tmp_path / 'opt.yml')], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        'odm-train: error: option "train.reg_opt" is required with cooperation: feature '
        '(e.g. {type: FeatureVarianceLoss, loss_weight: !!float 1e-4})')
    assert not (tmp_path / 'experiments').exists() and not (tmp_path / 'tb_logger').exists()


def test_odm_train_schema_holds_every_key_odm_model_reads():
    assert set(ODM_TRAIN.fields) == {'cooperation', 'reg_opt', 'quant_lr_mult', 'calibration', 'log_layer_freq',
                                     'amp', 'max_nonfinite_steps'}
    assert ODM_TRAIN.keys() >= {'var_opt', 'total_iter', 'pixel_opt', 'optim_g'}


def test_schema_and_feature_recorder_import_without_basicsr():
    """The declarations, the machinery and the recorder are plain Python / PyTorch (BasicSR only where it runs)."""
    import sys
    code = ('import sys\n'
            'import odm_basicsr.option_schema, odm_basicsr.utils.schema, odm_basicsr.odm.feature_recorder\n'
            'bad = [m for m in ("basicsr", "cv2", "scipy") if m in sys.modules]\n'
            'assert not bad, bad\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
