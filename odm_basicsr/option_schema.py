"""Every option the plugin adds to a BasicSR option file, declared once: type, default, description, combinations.

* :data:`QUANTIZED`: ``network_g`` of ``type: Quantized`` (the arguments of
  :func:`odm_basicsr.archs.quantized_arch.Quantized`, which validates them with it);
* :data:`ODM_TRAIN`: the ``train`` section under ``model_type: ODMModel`` (validated by
  :mod:`odm_basicsr.utils.option_check` before any folder is made, and by ``ODMModel`` itself);
* :data:`EXPORT`: the ``export`` section, read by ``odm-export`` (whose flags override it), checked by
  :mod:`odm_basicsr.utils.option_check` too;
* :data:`SECTIONS`: the sections documented in the README (``python scripts/make_option_tables.py`` writes
  them between ``<!-- options:<name> -->`` markers; a test fails when they drift).

To add an option: add a :class:`~odm_basicsr.utils.schema.Field` to its section (name, kind, default, one
paragraph of description), read the validated value where it is used (``Quantized`` gets it as an argument,
``ODMModel`` from ``self.train_options``, ``odm-export`` from the validated ``export`` section), and rerun
``scripts/make_option_tables.py``. A new section is a new :class:`~odm_basicsr.utils.schema.Section` added to
:data:`SECTIONS` and validated where the section is read. Combinations of options are
:class:`~odm_basicsr.utils.schema.Rule` s of their section.

BasicSR's own keys (:data:`BASICSR_KEYS`) are listed here too, so that a misspelt one gets a "did you mean"
hint; they are BasicSR's business and otherwise let through.

No BasicSR import at module level (the feature-regulariser check looks up BasicSR's loss registry when it runs).
"""
from odm_basicsr.deploy.convert import OUTPUT_CHOICES as DEPLOY_OUTPUT_CHOICES
from odm_basicsr.deploy.onnx_export import EXPORTERS
from odm_basicsr.deploy.onnx_export import TARGETS as EXPORT_TARGETS
from odm_basicsr.deploy.onnx_export import WEIGHT_FORMATS as EXPORT_WEIGHT_FORMATS
from odm_basicsr.odm.cooperation import COOPERATION_MODES
from odm_basicsr.quant import CALIBRATION_MODES, FP_BITS, OFFSET_KINDS, VALID_BITS
from odm_basicsr.quant.quantizers import (
    ACT_GRIDS,
    ACT_INIT_METHODS,
    WEIGHT_GRANULARITIES,
    WEIGHT_GRIDS,
    WEIGHT_RANGE_METHODS,
    default_act_init,
    default_weight_range,
)
from odm_basicsr.utils.schema import (
    REQUIRED,
    AnyOf,
    Boolean,
    Field,
    Integer,
    Invalid,
    Mapping,
    Number,
    OneOf,
    Patterns,
    Rule,
    Section,
    Text,
    TextList,
)

#: BasicSR 1.4.2's keys per section ('' = the top level): known, so that a misspelling is caught; not checked here.
BASICSR_KEYS = {
    '': ('name', 'model_type', 'scale', 'num_gpu', 'manual_seed', 'datasets', 'network_g', 'network_d', 'path',
         'train', 'val', 'logger', 'dist_params', 'find_unused_parameters', 'dist', 'rank', 'world_size',
         'auto_resume', 'is_train', 'root_path'),
    'train': ('ema_decay', 'optim_g', 'optim_d', 'scheduler', 'total_iter', 'warmup_iter', 'pixel_opt',
              'perceptual_opt', 'gan_opt', 'ldl_opt', 'net_d_iters', 'net_d_init_iters'),
    'val': ('val_freq', 'save_img', 'suffix', 'pbar', 'metrics'),
    'logger': ('print_freq', 'save_checkpoint_freq', 'use_tb_logger', 'wandb'),
    'path': ('pretrain_network_g', 'param_key_g', 'strict_load_g', 'resume_state', 'ignore_resume_networks',
             'pretrain_network_d', 'param_key_d', 'strict_load_d', 'experiments_root', 'models',
             'training_states', 'log', 'visualization', 'results_root'),
}

OFFSET_SELECT = ('topk', 'threshold')
AMP_DTYPES = ('float16', 'bfloat16')


def _bits(fp=True):
    if fp:
        return OneOf(VALID_BITS, expect='one of 2..8 or 32 (= full precision)', doc='2..8 or 32')
    return OneOf([b for b in VALID_BITS if b != FP_BITS], expect='one of 2..8', doc='2..8')


# ----------------------------------------------------------------------------------------------- network_g: Quantized
def _threshold_given(values, label):
    if values['select'] == 'threshold' and values['threshold'] is None:
        return f'{label("threshold")} must be a number >= 0 when select is "threshold", got None'
    return None


OFFSETS = Section([
    Field('select', OneOf(OFFSET_SELECT), 'topk',
          '`topk`: the `ceil(fraction * n)` layers with the largest mismatch score; `threshold`: the layers whose '
          'score is at least `threshold`. A layer\'s score is the larger of its shift mismatch '
          '`std_c(mu_c) / mean_c(sigma_c)` and scale mismatch `std_c(sigma_c) / mean_c(sigma_c)` (FP network, '
          'calibration batches).'),
    Field('fraction', Number(0, 1), 0.25, 'Share of the quantized layers that get an offset, for `select: topk`.'),
    Field('threshold', AnyOf(None, Number(0)), None, 'Score a layer needs, for `select: threshold`.'),
    Field('kind', OneOf(('auto',) + tuple(OFFSET_KINDS)), 'auto',
          '`auto`: per layer a shift or a scale, by the larger of its two scores (shift on a tie); `shift` or '
          '`scale` forces the kind (the layer set stays the same).'),
], rules=[Rule('`offsets.select: threshold` needs `offsets.threshold`.', _threshold_given)],
    coerce={True: {}, False: None, None: None}, doc='`~` \\| `true` \\| mapping')


def _clip_correction_needs_weights(values, label):
    if values['clip_correction'] and values['w_bits'] == FP_BITS:
        return (f'{label("clip_correction")} needs quantized weights (w_bits 2..8); with w_bits 32 there is no '
                'weight range to correct')
    return None


def _percentile_is_used(values, label):
    """A percentile option that differs from its default must have a percentile statistic to act on."""
    weight_range = values['weight_range'] if values['weight_range'] not in (None, 'auto') else default_weight_range(
        values['w_bits'], values['clip_correction'])
    act_init = values['act_init'] if values['act_init'] != 'auto' else default_act_init(values['a_bits'])
    for key, bits, statistic, what in (('weight_percentile', 'w_bits', weight_range, 'weight_range'),
                                       ('act_percentile', 'a_bits', act_init, 'act_init')):
        if values[key] != QUANTIZED_DEFAULTS[key] and values[bits] != FP_BITS and statistic != 'percentile':
            return (f'{label(key)} = {values[key]} is used only with a percentile statistic, but {what} is '
                    f'{statistic!r} here ({bits} {values[bits]}, {what}: {values[what]!r}'
                    f'{", clip_correction" if key == "weight_percentile" and values["clip_correction"] else ""})')
    return None


def _offsets_need_activations(values, label):
    if values['offsets'] is not None and values['a_bits'] == FP_BITS:
        return (f'{label("offsets")} need quantized activations (a_bits 2..8): an offset normalises the input '
                'of the activation quantizer')
    return None


QUANTIZED = Section([
    Field('arch', Mapping(required=('type',), expect='a mapping with a "type" key (e.g. {type: EDSR, ...})'),
          REQUIRED,
          'The FP network, as BasicSR\'s `network_g`: `{type: EDSR, num_feat: 64, upscale: 4, ...}`; any registered '
          'arch. Its keys are checked against the arch\'s constructor. `Quantized` returns this network itself '
          '(class `Quantized<Arch>`), so its state-dict keys are the FP arch\'s plus the quantizer entries.'),
    Field('w_bits', _bits(), 4, 'Weight bits of the quantized layers; 32 = full precision.'),
    Field('a_bits', _bits(), 4, 'Input-activation bits of the quantized layers; 32 = full precision.'),
    Field('layers', AnyOf(OneOf(('default', 'all')), Patterns(),
                          expect='"default", "all" or a list of patterns', doc='`default` \\| `all` \\| list'),
          'default',
          '`default`: the arch\'s preset (the convolutions of the residual body, METHOD.md 3; README "Which layers '
          'are quantized"); `all`: '
          'every Conv2d/Linear but the first and the last; or glob / `re:` patterns on module names.'),
    Field('exclude', AnyOf(None, Patterns()), None, 'Patterns removed from the selection.'),
    Field('act_init', OneOf(ACT_INIT_METHODS), 'auto',
          'Calibration statistic of the activation ranges: `mse` (the range minimising the quantization MSE at '
          '`a_bits`), `percentile`, `minmax`, or `auto`: chosen per bit width by measurement (min-max at 6-8 '
          'bits, percentiles at 4-5, MSE at 2-3).'),
    Field('act_percentile', Number(50, 100, open_min=True), 99.0,
          'Upper percentile `p` of `act_init: percentile`; the lower bound uses `100 - p`.'),
    Field('act_learnable', Boolean(), True, 'Learn the activation bounds during training.'),
    Field('act_grid', OneOf(ACT_GRIDS), 'aligned',
          '`aligned`: `2^a_bits` levels with the step of the learned range, moved by less than half a step so that '
          '0 is on the grid (an integer zero point): exactly what the exported integer network computes, so the '
          'deployed network is the trained one. `free`: the levels span the learned range exactly (the grid before '
          '2026-12-02; odm-export moves it onto the aligned grid, which cost up to 0.045 dB on Set5 at W2A2, '
          'docs/DEPLOY_STUDY.md). Measured no different in accuracy at W2A2 and W4A4 (RLFN, EDSR, 200 QAT '
          'iterations, one seed).'),
    Field('weight_granularity', OneOf(WEIGHT_GRANULARITIES), 'layer',
          'One symmetric weight range per layer, or per output `channel`.'),
    Field('weight_range', AnyOf(None, OneOf(WEIGHT_RANGE_METHODS)), None,
          'Weight range statistic, recomputed every step: `mse` (the symmetric range minimising the quantization '
          'MSE of W at `w_bits`), `maxabs`, or `percentile` of |W|. `~` or `auto`: per bit width by '
          'measurement (MSE at 2 and 6-8 bits, percentiles at 3-5); with `clip_correction` the 2024 version\'s '
          'percentile.', default_doc='`~` (auto)'),
    Field('weight_percentile', Number(50, 100, open_min=True), 99.0,
          'Percentile of |W| for `weight_range: percentile`.'),
    Field('weight_grid', OneOf(WEIGHT_GRIDS), 'midrise',
          '`midrise`: `2^w_bits` levels, no zero level (odd integer codes: 7 bits at most fit int8, 3 bits int4); '
          '`midtread`: `2^w_bits - 1` symmetric levels with a zero level (4-bit codes fit int4). midrise won at '
          'W2A2 after QAT (+0.18 dB Set5 on EDSR, +0.07 on RLFN; a tie at W4A4; docs/DEPLOY_STUDY.md).'),
    Field('clip_correction', Boolean(), False,
          '2024 weight clipping correction: `u_w = percentile_99(|W|) * gamma` (or the given `weight_range` times '
          '`gamma`), one learnable `gamma` per layer, trained by the reconstruction loss only in every cooperation '
          'mode (METHOD.md 6; in `feature`/`naive` mode that costs one extra gradient of `l_pix` with respect to '
          'the factors).'),
    Field('offsets', OFFSETS, None,
          'Distribution offsets (METHOD.md 4.3): learnable per-channel shift or scale before the activation '
          'quantizer of the layers with the largest channel mismatch, attached by `ODMModel` at calibration. '
          '`~` or `false`: none; `true`: the defaults below.'),
    Field('output_quant', AnyOf(OneOf((None, False, 'auto'), doc='`~` \\| `auto`'), Patterns(),
                                expect='"auto", a list of patterns or null', doc='`~` \\| `auto` \\| list'), None,
          'Quantize the output of these quantized layers too (zero-aligned grid containing 0), so that they run as '
          'integer convolutions when deployed: `auto` (every quantized layer whose output reaches a float '
          'operation, found by one forward pass; with `offsets`, also the layers that feed an offset\'s float '
          'shift / scale, added at calibration), or patterns among the quantized layers.'),
    Field('output_bits', _bits(fp=False), 8, 'Bits of the output quantizers.'),
], rules=[
    Rule('`clip_correction` needs quantized weights (`w_bits` 2..8).', _clip_correction_needs_weights),
    Rule('`weight_percentile` / `act_percentile` other than 99 need a percentile statistic: `weight_range: '
         'percentile`, or `~` / `auto` where that resolves to it (3-5 bits, or with `clip_correction`); '
         '`act_init: percentile`, or `auto` at 4-5 bits.', _percentile_is_used),
    Rule('`offsets` need quantized activations (`a_bits` 2..8).', _offsets_need_activations),
], owner='Quantized')
QUANTIZED_DEFAULTS = {name: f.default for name, f in QUANTIZED.fields.items()}


# ----------------------------------------------------------------------------------------------- train: ODMModel
def _feature_regulariser(spec):
    """``reg_opt.type`` must be a registered loss with a closed-form ``feature_grad``."""
    import odm_basicsr.losses  # noqa: F401, I001  (BasicSR fixes and the plugin's losses first)
    from basicsr.utils.registry import LOSS_REGISTRY

    name = spec.get('type')
    cls = LOSS_REGISTRY.get(name) if name in LOSS_REGISTRY else None
    if cls is None or not hasattr(cls, 'feature_grad'):
        raise Invalid(problem=f'{name!r} is not a feature regulariser (FeatureVarianceLoss or MismatchLoss)',
                      key='type')


def _regulariser_given(values, label):
    if values['cooperation'] != 'off' and values['reg_opt'] is None:
        return (f'{label("reg_opt")} is required with cooperation: {values["cooperation"]} '
                '(e.g. {type: FeatureVarianceLoss, loss_weight: !!float 1e-4})')
    return None


ODM_TRAIN = Section([
    Field('cooperation', OneOf(COOPERATION_MODES, aliases={False: 'off'}), 'feature',
          'How the regulariser\'s gradient `g_V` joins the reconstruction gradient `g_R` (METHOD.md 4.2). '
          '`feature`: at each quantized layer\'s input `X_i`, the closed-form `g_V` is added where its sign agrees '
          'with the **total** reconstruction gradient at `X_i` (a gradient hook on `X_i` itself, so the gradient '
          'through skip connections and concats that also read `X_i` counts; one backward pass). `param`: the '
          'same gate per parameter element (two gradient computations). `cosine`: `g_R + (cos+1)/2 * g_V` over '
          'all weights (2024 rule). `naive`: `g_R + g_V`. `off`: no regulariser: with `offsets` absent this is '
          'the **plain QAT baseline**, identical in everything else. YAML reads an unquoted `off` as `false`, '
          'which means `off` too. Every mode but `off` logs `coop`, the share of the regulariser\'s gradient that '
          'is applied (L1: the agreeing share for `feature` and `param`, `w` for `cosine`, 1 for `naive`); '
          '`cosine` also logs `cos` and its weight `cos_weight` = `(cos + 1) / 2`.'),
    Field('reg_opt', AnyOf(None, Mapping(required=('type',), check=_feature_regulariser)), None,
          'The feature regulariser, a loss with a closed-form gradient: `FeatureVarianceLoss` (`loss_weight`, '
          '`reduction`: `channel` (mean over channels of the variance over B, H, W), `layer`, `image`) or '
          '`MismatchLoss` (2024: `loss_weight * sum ||X_i - q(X_i)||_2`, where `q(X_i)`, held constant, is what '
          'the conv effectively sees in `X_i`\'s units: `q(x)`, `q(x - delta) + delta` with a shift offset, '
          '`rho * q(x / rho)` with a scale offset). Logged as `l_reg` (`l_var` in logs written before the '
          'rename). Old name: `var_opt` (still read, with a deprecation notice in the log).',
          default_doc='required unless `off`', renamed_from=('var_opt',),
          rename_note=' (the loss it configures is logged as l_reg, formerly l_var)'),
    Field('quant_lr_mult', Number(0, open_min=True), 1.0,
          'Learning rate of the activation ranges, clip factors and offsets = `optim_g.lr` times this (a second '
          'parameter group, weight decay 0).'),
    Field('calibration', Section([
        Field('batches', Integer(1), 8,
              'Training batches used once, before training: activation ranges (mean over batches of the '
              '`act_init` statistic) and, with offsets, per-channel means and standard deviations. Not repeated '
              'on resume or for a calibrated checkpoint: the calibrated state is in the checkpoint.'),
        Field('mode', OneOf(CALIBRATION_MODES), 'fp',
              '`fp`: every range from the full-precision network (weights and activations unquantized). '
              '`sequential`: layer by layer in forward order, each from the input that the already-quantized '
              'earlier layers give it (one partial forward pass per layer and batch).'),
    ]), {}, 'Calibration before the first training step.', default_doc='see below'),
    Field('log_layer_freq', Integer(1), 500,
          'Every this many iterations, each quantized layer\'s activation range and `coop` to the log and to '
          'tensorboard (`layers/<name>/lower`, `upper`, `coop`).'),
    Field('amp', AnyOf(None, Boolean(), OneOf(AMP_DTYPES), expect='true, false, float16 or bfloat16',
                       doc='`false` \\| `true` \\| `float16` \\| `bfloat16`'), False,
          'Mixed precision for the training forward pass: `float16` (autocast plus a gradient scaler whose state '
          'is saved in the `.state` file; the closed-form `feature`-mode gradient is multiplied by the same loss '
          'scale), `bfloat16` (no scaler), `true` (float16 on CUDA, bfloat16 on CPU). The fake quantizers, the '
          'regulariser and validation run in float32. Tested on CPU: loss scaling changes no gradient in any '
          'cooperation mode; half-precision weight gradients point the same way as float32 ones (cosine > 0.95).'),
    Field('max_nonfinite_steps', Integer(1), 10,
          'A step with a non-finite loss or gradient is skipped (no update); this many in a row stop the run '
          '(exit status 3) naming the iteration and the last good checkpoint. float16 steps that the gradient '
          'scaler skips do not count.'),
], rules=[Rule('`reg_opt` is required unless `cooperation: off`.', _regulariser_given)],
    passthrough=BASICSR_KEYS['train'], passthrough_doc="BasicSR's", owner='ODMModel\'s "train"')

# ------------------------------------------------------------------------------------------------- export: odm-export
def _int4_needs_onnx(values, label):
    if values['format'] == 'int4' and not values['onnx']:
        return f'{label("format")} int4 is a format of the ONNX model, but {label("onnx")} is false'


#: The ``export`` section of an option file, read by ``odm-export`` (each key is also a command-line flag, which
#: overrides it: ``fp16`` is ``--fp16``, ``calib_images`` is ``--calib-images``, ``onnx: false`` is ``--no-onnx``).
EXPORT = Section([
    Field('fp16', Boolean(), False, 'Store the full-precision layers of the compact file in float16.'),
    Field('format', OneOf(EXPORT_WEIGHT_FORMATS), 'int8',
          'ONNX weight initializers: `int8` containers (onnxruntime runs the convs as integer `QLinearConv`) or '
          '`int4` (smaller; onnxruntime runs float convs today; needs midtread weights of at most 4 bits or midrise '
          'of at most 3).'),
    Field('target', OneOf(EXPORT_TARGETS), 'onnxruntime',
          '`tensorrt` also writes `model_tensorrt.onnx`: int8 activations with zero point 0, the form TensorRT '
          'takes (exported, untested here).'),
    Field('output_quant', OneOf(DEPLOY_OUTPUT_CHOICES), 'auto',
          '`auto`: an 8-bit output quantizer (calibrated on `calib` images) on every quantized conv whose output '
          'would stay float, so that it runs as an integer conv; `trained`: only those the network was trained '
          'with; `none`: none.'),
    Field('calib', AnyOf(None, Text('path', 'a folder')), None,
          'Folder of LR images to calibrate the output quantizers `output_quant: auto` adds; `~`: '
          '`datasets.train.dataroot_lq` of the option file.'),
    Field('calib_images', Integer(1), 8, 'Calibration images used.'),
    Field('data', AnyOf(None, Text('path', 'a folder')), None,
          'Benchmark root (`<Set>/HR`, `<Set>/LRbicx<scale>`) for the parity check; `~`: no parity check.'),
    Field('sets', TextList('list of sets', 'a list of benchmark set names'), ['Set5'],
          'Benchmark sets for the parity check.'),
    Field('exporter', OneOf(EXPORTERS), 'auto',
          'PyTorch ONNX exporter of the float graph: `dynamo`, `torchscript`, or `auto` (dynamo when onnxscript '
          'is installed, else TorchScript).'),
    Field('allow_float', Boolean(), False,
          'Keep quantized layers the ONNX writer has no integer form for (linear layers) in float arithmetic, '
          'with a warning, instead of refusing.'),
    Field('onnx', Boolean(), True, 'Write the ONNX models (false: the compact file only).'),
    Field('latency_size', Integer(0), 64, 'LR side in pixels of the latency probe (0: none).'),
], rules=[Rule('`export.format: int4` needs the ONNX model (`export.onnx: true`).', _int4_needs_onnx)],
    owner='odm-export\'s "export"')

#: The documented sections: name (README marker and key prefix) -> section.
SECTIONS = {'network_g': QUANTIZED, 'train': ODM_TRAIN, 'export': EXPORT}


def markdown_tables():
    """``{section name: Markdown table}`` for the README (keys prefixed with the section name)."""
    return {name: section.markdown(f'{name}.') for name, section in SECTIONS.items()}


def update_readme(text):
    """``text`` with the table between ``<!-- options:<name> -->`` and ``<!-- /options:<name> -->`` replaced by the
    generated one, for every section; raises ValueError when a section's markers are missing."""
    for name, table in markdown_tables().items():
        start, end = f'<!-- options:{name} -->', f'<!-- /options:{name} -->'
        i, j = text.find(start), text.find(end)
        if i < 0 or j < i:
            raise ValueError(f'the README has no {start} ... {end} block')
        text = text[:i + len(start)] + '\n' + table + '\n' + text[j:]
    return text
