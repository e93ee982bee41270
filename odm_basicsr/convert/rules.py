"""Key mappings from the source layouts to BasicSR / odm_basicsr archs, and :func:`convert` itself.

* ``EDSR``: EDSR-PyTorch's ``src/model/edsr.py`` (``sub_mean``, ``head.0``, ``body.{i}.body.0|2``, ``body.{n}``,
  ``tail.0.{k}``, ``tail.1``, ``add_mean``) -> BasicSR ``EDSR`` (``conv_first``, ``body.{i}.conv1|conv2``,
  ``conv_after_body``, ``upsample.{k}``, ``conv_last``). The mean shifts become ``rgb_mean``; ``rgb_std`` other
  than 1 is rejected (BasicSR's EDSR has none). ``res_scale`` is not stored in the weights (default 1, or 0.1 for
  the 32-block 256-channel EDSR, as EDSR-PyTorch trains it).
* ``RDN``: EDSR-PyTorch / DAQ / DDTB ``rdn.py`` -> ``odm_basicsr`` ``RDN`` (``odm_basicsr/archs/rdn_arch.py``).
* ``SRResNet``: DAQ's ``srresnet.py`` (its unused mean shifts are dropped, its shared ReLU becomes per-block PReLU
  slopes of 0, which is exactly ReLU) or DDTB's ``bnsrresnet_org.py`` -> ``odm_basicsr`` ``SRResNet``
  (``odm_basicsr/archs/srresnet_bn_arch.py``).

Every source key must be used or dropped explicitly (``drop``); anything else is a :class:`ConversionError`.
"""
import re
from dataclasses import dataclass, field

import torch
from basicsr.utils.registry import ARCH_REGISTRY

from .layout import ConversionError, detect_layout, unwrap_state_dict

ARCHS = ('EDSR', 'RDN', 'SRResNet')
DIV2K_MEAN = (0.4488, 0.4371, 0.4040)  # EDSR-PyTorch's MeanShift default = BasicSR EDSR's rgb_mean default


@dataclass
class Conversion:
    """Result of :func:`convert`."""

    arch: str  # EDSR | RDN | SRResNet
    layout: str  # the source layout recognised (edsr-pytorch, rdn, daq, ddtb)
    state_dict: dict  # BasicSR / odm_basicsr keys
    arch_opts: dict  # keyword arguments of the target arch (without 'type')
    notes: list = field(default_factory=list)
    dropped: list = field(default_factory=list)  # source keys not carried over

    def network_yaml(self):
        """The ``network_g.arch`` option that fits the converted weights, as one YAML flow mapping."""
        items = ', '.join(f'{k}: {_yaml_value(v)}' for k, v in self.arch_opts.items())
        return f'{{type: {self.arch}, {items}}}'


def _yaml_value(v):
    if isinstance(v, (list, tuple)):
        return '[' + ', '.join(_yaml_value(x) for x in v) + ']'
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _count(state, pattern):
    regex = re.compile(pattern)
    found = {int(m.group(1)) for k in state if (m := regex.match(k))}
    n = len(found)
    if found != set(range(n)):
        raise ConversionError(f'indices of {pattern!r} are not 0..{n - 1}: {sorted(found)}')
    return n


def _shape(state, key):
    if key not in state:
        raise ConversionError(f'key {key} is missing')
    return tuple(state[key].shape)


def _scale_from_upsampler(convs, num_feat, what):
    """Upscale factor of an EDSR-PyTorch style upsampler from the output channels of its convs."""
    outs = [shape[0] for shape in convs]
    if len(outs) >= 1 and all(o == 4 * num_feat for o in outs):
        return 2 ** len(outs)
    if len(outs) == 1 and outs[0] == 9 * num_feat:
        return 3
    raise ConversionError(f'{what}: cannot tell the scale from upsampler convs with {outs} output channels '
                          f'(num_feat {num_feat})')


def _apply_rules(state, rules, drop):
    """Rename keys by the first matching ``(regex, replacement)``; replacement None = consumed on purpose."""
    out, dropped, unknown = {}, [], []
    drop_res = [re.compile(p) for p in drop]
    for key, value in state.items():
        if any(r.search(key) for r in drop_res):
            dropped.append(key)
            continue
        for regex, repl in rules:
            if regex.fullmatch(key):
                if repl is None:
                    dropped.append(key)
                else:
                    out[regex.sub(repl, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        shown = ', '.join(unknown[:10]) + (', ...' if len(unknown) > 10 else '')
        raise ConversionError(f'{len(unknown)} key(s) of the input have no place in the target network: {shown}. '
                              'If they are extra entries (e.g. quantizer state of a quantized checkpoint), drop '
                              'them with --drop REGEX')
    return out, dropped


def _rules(pairs):
    return [(re.compile(p), r) for p, r in pairs]


def _edsr(state, rgb_range, res_scale, notes):
    num_feat, n_colors = _shape(state, 'head.0.weight')[:2]
    num_block = _count(state, r'^body\.(\d+)\.body\.0\.weight$')
    if f'body.{num_block}.weight' not in state:
        raise ConversionError(f'key body.{num_block}.weight (the conv after the {num_block} residual blocks) is '
                              'missing')
    conv_keys = sorted((k for k in state if re.fullmatch(r'tail\.0\.\d+\.weight', k)),
                       key=lambda k: int(k.split('.')[2]))
    scale = _scale_from_upsampler([_shape(state, k) for k in conv_keys], num_feat, 'EDSR')
    if n_colors != 3:
        raise ConversionError(f'EDSR with {n_colors} input channels: BasicSR\'s EDSR mean shift needs 3')
    rgb_mean = DIV2K_MEAN
    if 'sub_mean.weight' in state:
        w = state['sub_mean.weight'].double().reshape(3, 3)
        if not torch.allclose(w, torch.eye(3, dtype=torch.float64), atol=1e-6):
            raise ConversionError('sub_mean is not the identity (rgb_std != 1): BasicSR\'s EDSR has no std')
        mean = (-state['sub_mean.bias'].double() / rgb_range).tolist()
        if 'add_mean.bias' in state and not torch.allclose(state['add_mean.bias'].double(),
                                                           -state['sub_mean.bias'].double(), atol=1e-4):
            raise ConversionError('add_mean does not undo sub_mean: not an EDSR-PyTorch MeanShift pair')
        if any(not 0.0 <= m <= 1.0 for m in mean):
            raise ConversionError(f'the mean shift implies rgb_mean {mean} outside [0, 1] at rgb_range '
                                  f'{rgb_range}: is --rgb-range right?')
        if max(abs(a - b) for a, b in zip(mean, DIV2K_MEAN)) > 1e-5:
            rgb_mean = tuple(round(m, 6) for m in mean)
            notes.append(f'mean shift differs from the DIV2K default: rgb_mean {list(rgb_mean)}')
    else:
        notes.append('no sub_mean/add_mean in the input: the DIV2K mean (EDSR-PyTorch default) is assumed')
    if res_scale is None:
        res_scale = 0.1 if (num_feat, num_block) == (256, 32) else 1
        notes.append(f'res_scale {res_scale} assumed (not stored in the weights; --res-scale to change)')
    rules = _rules([
        (r'head\.0\.(weight|bias)', r'conv_first.\1'),
        (r'body\.(\d+)\.body\.0\.(weight|bias)', r'body.\1.conv1.\2'),
        (r'body\.(\d+)\.body\.2\.(weight|bias)', r'body.\1.conv2.\2'),
        (rf'body\.{num_block}\.(weight|bias)', r'conv_after_body.\1'),
        (r'tail\.0\.(\d+)\.(weight|bias)', r'upsample.\1.\2'),
        (r'tail\.1\.(weight|bias)', r'conv_last.\1'),
        (r'(sub_mean|add_mean)\.(weight|bias)', None),
    ])
    opts = dict(num_in_ch=n_colors, num_out_ch=n_colors, num_feat=num_feat, num_block=num_block, upscale=scale,
                res_scale=res_scale, img_range=float(rgb_range), rgb_mean=list(rgb_mean))
    return rules, opts


def _rdn(state, rgb_range):
    num_feat, n_colors, k = _shape(state, 'SFENet1.weight')[:3]
    if k != 3:
        raise ConversionError(f'RDN with kernel size {k}: only RDNkSize 3 is supported')
    num_block = _count(state, r'^RDBs\.(\d+)\.LFF\.weight$')
    num_layer = _count(state, r'^RDBs\.0\.convs\.(\d+)\.conv\.0\.weight$')
    growth = _shape(state, 'RDBs.0.convs.0.conv.0.weight')[0]
    if 'UPNet.4.weight' in state:
        scale, last = 4, 4
    else:
        r2 = _shape(state, 'UPNet.0.weight')[0] // growth
        scale = {4: 2, 9: 3}.get(r2)
        if scale is None or 'UPNet.2.weight' not in state:
            raise ConversionError(f'RDN: cannot tell the scale from UPNet (UPNet.0 has {r2 * growth} output '
                                  f'channels, growth {growth})')
        last = 2
    rules = _rules([
        (r'SFENet1\.(weight|bias)', r'sfe1.\1'),
        (r'SFENet2\.(weight|bias)', r'sfe2.\1'),
        (r'RDBs\.(\d+)\.convs\.(\d+)\.conv\.0\.(weight|bias)', r'rdbs.\1.layers.\2.conv.\3'),
        (r'RDBs\.(\d+)\.LFF\.(weight|bias)', r'rdbs.\1.lff.\2'),
        (r'GFF\.([01])\.(weight|bias)', r'gff.\1.\2'),
        (r'UPNet\.0\.(weight|bias)', r'upsample.0.\1'),
        (rf'UPNet\.{last}\.(weight|bias)', r'conv_last.\1'),
    ] + ([(r'UPNet\.2\.(weight|bias)', r'upsample.2.\1')] if scale == 4 else []))
    opts = dict(num_in_ch=n_colors, num_out_ch=n_colors, num_feat=num_feat, num_block=num_block,
                num_layer=num_layer, growth=growth, upscale=scale, img_range=float(rgb_range))
    return rules, opts


_BN = r'(weight|bias|running_mean|running_var|num_batches_tracked)'


def _srresnet(state, layout, rgb_range):
    if layout == 'daq':
        num_feat, n_colors = _shape(state, 'head.0.weight')[:2]
        num_block = _count(state, r'^body\.(\d+)\.conv1\.weight$')
        ups = sorted((k for k in state if re.fullmatch(r'tail\.0\.\d+\.weight', k) and state[k].dim() == 4),
                     key=lambda k: int(k.split('.')[2]))
        n = num_block
        rules = [
            (r'head\.0\.weight', r'head.0.weight'),
            (r'head\.1\.weight', r'head.1.weight'),
            (r'body\.(\d+)\.(conv1|conv2)\.weight', r'body.\1.\2.weight'),
            (rf'body\.(\d+)\.(bn1|bn2)\.{_BN}', r'body.\1.\2.\3'),
            (r'body\.(\d+)\.act\.weight', r'body.\1.act.weight'),
            (rf'body\.{n}\.weight', r'body_tail.0.weight'),
            (rf'body\.{n + 1}\.{_BN}', r'body_tail.1.\1'),
            (r'tail\.0\.(\d+)\.weight', r'upsample.\1.weight'),
            (r'tail\.1\.weight', r'conv_last.weight'),
            (r'(sub_mean|add_mean)\.(weight|bias)', None),  # built by DAQ's SRResNet, never used in forward
        ]
    else:
        num_feat, n_colors = _shape(state, 'conv_input.weight')[:2]
        num_block = _count(state, r'^residual\.(\d+)\.conv1\.weight$')
        ups = sorted((k for k in state if re.fullmatch(r'upscale\.\d+\.weight', k) and state[k].dim() == 4),
                     key=lambda k: int(k.split('.')[1]))
        rules = [
            (r'conv_input\.weight', r'head.0.weight'),
            (r'relu\.weight', r'head.1.weight'),
            (r'residual\.(\d+)\.(conv1|conv2)\.weight', r'body.\1.\2.weight'),
            (rf'residual\.(\d+)\.in1\.{_BN}', r'body.\1.bn1.\2'),
            (rf'residual\.(\d+)\.in2\.{_BN}', r'body.\1.bn2.\2'),
            (r'residual\.(\d+)\.relu\.weight', r'body.\1.act.weight'),
            (r'conv_mid\.weight', r'body_tail.0.weight'),
            (rf'bn_mid\.{_BN}', r'body_tail.1.\1'),
            (r'upscale\.(\d+)\.weight', r'upsample.\1.weight'),
            (r'conv_output\.weight', r'conv_last.weight'),
        ]
    scale = _scale_from_upsampler([_shape(state, k) for k in ups], num_feat, 'SRResNet')
    num_out_ch = _shape(state, 'tail.1.weight' if layout == 'daq' else 'conv_output.weight')[0]
    opts = dict(num_in_ch=n_colors, num_out_ch=num_out_ch, num_feat=num_feat, num_block=num_block, upscale=scale,
                img_range=float(rgb_range))
    return _rules(rules), opts


def _fill_defaults(out, target, notes, layout):
    """Entries the target has and the source legitimately lacks: DAQ's ReLU slopes, old BN counters."""
    relu = [k for k in target if re.fullmatch(r'body\.\d+\.act\.weight', k) and k not in out]
    if relu:
        for k in relu:
            out[k] = torch.zeros(target[k])
        notes.append(f'{len(relu)} residual blocks use a ReLU in the source ({layout}): their PReLU slopes are set '
                     'to 0, which is exactly ReLU')
    counters = [k for k in target if k.endswith('num_batches_tracked') and k not in out]
    for k in counters:
        out[k] = torch.zeros((), dtype=torch.long)
    if counters:
        notes.append(f'{len(counters)} BatchNorm num_batches_tracked counters were absent: set to 0')


def _own_storage(t):
    """``t`` detached, copied only if it is a view into a larger storage (torch.save writes whole storages)."""
    t = t.detach()
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone().contiguous()


def target_state_shapes(arch, opts):
    """``{key: shape}`` of the target FP network, built on the meta device (no memory, no init cost)."""
    with torch.device('meta'):
        net = ARCH_REGISTRY.get(arch)(**opts)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def convert(state, arch='auto', rgb_range=255., res_scale=None, drop=()):
    """Convert a source-layout state dict; see the module docstring. Returns a :class:`Conversion`."""
    state = unwrap_state_dict(state)
    found_arch, layout = detect_layout(state)
    if arch not in ('auto', found_arch):
        raise ConversionError(f'--arch {arch}, but the input has the keys of an {found_arch} checkpoint '
                              f'({layout} layout)')
    notes = []
    if found_arch == 'EDSR':
        rules, opts = _edsr(state, rgb_range, res_scale, notes)
    elif found_arch == 'RDN':
        rules, opts = _rdn(state, rgb_range)
    else:
        rules, opts = _srresnet(state, layout, rgb_range)
    if res_scale is not None and found_arch != 'EDSR':
        raise ConversionError('--res-scale applies to EDSR only')
    out, dropped = _apply_rules(state, rules, drop)
    target = target_state_shapes(found_arch, opts)
    _fill_defaults(out, target, notes, layout)
    missing = sorted(set(target) - set(out))
    extra = sorted(set(out) - set(target))
    bad = sorted(k for k in set(target) & set(out) if tuple(out[k].shape) != target[k])
    if missing or extra or bad:
        parts = []
        for label, keys in (('missing', missing), ('unexpected', extra), ('shape mismatch', bad)):
            if keys:
                parts.append(f'{len(keys)} {label} ({", ".join(keys[:6])}{", ..." if len(keys) > 6 else ""})')
        raise ConversionError(f'the converted weights do not fit {found_arch}({opts}): ' + '; '.join(parts))
    ordered = {k: _own_storage(out[k]) for k in target}
    return Conversion(found_arch, layout, ordered, opts, notes, dropped)
