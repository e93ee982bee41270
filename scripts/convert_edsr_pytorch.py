#!/usr/bin/env python
"""Convert full-precision EDSR-PyTorch / DAQ / DDTB checkpoints to BasicSR state dicts for odm-basicsr.

Usage::

    python scripts/convert_edsr_pytorch.py edsr_baseline_x4-6b446fab.pt pretrained/EDSR_x4_fp.pth --check
    python scripts/convert_edsr_pytorch.py rdn_x4.pt pretrained/RDN_x4_fp.pth --arch RDN --check
    python scripts/convert_edsr_pytorch.py srresnet_x4.pt pretrained/SRResNet_x4_fp.pth --arch SRResNet --check

The output is ``{'params': state_dict}``, loadable with ``path.pretrain_network_g`` and ``strict_load_g: true``
into ``network_g: {type: Quantized, arch: {...}}`` (the quantizer entries the FP file lacks are expected). The
script prints the ``arch`` options that fit the converted weights.

Source layouts (``--arch auto`` recognises them from the keys):

* ``EDSR``: EDSR-PyTorch's ``src/model/edsr.py`` (``sub_mean``, ``head.0``, ``body.{i}.body.0|2``,
  ``body.{n}``, ``tail.0.{k}``, ``tail.1``, ``add_mean``) -> BasicSR ``EDSR`` (``conv_first``,
  ``body.{i}.conv1|conv2``, ``conv_after_body``, ``upsample.{k}``, ``conv_last``). The mean shifts become
  ``rgb_mean``; ``rgb_std`` other than 1 is rejected (BasicSR's EDSR has none). ``res_scale`` is not stored in
  the weights: ``--res-scale`` (default 1, or 0.1 for the 32-block 256-channel EDSR, as EDSR-PyTorch trains it).
* ``RDN``: EDSR-PyTorch / DAQ / DDTB ``rdn.py`` (``SFENet1``, ``RDBs.{i}.convs.{j}.conv.0``, ``GFF``,
  ``UPNet``) -> ``odm_basicsr`` ``RDN`` (mapping in ``odm_basicsr/archs/rdn_arch.py``).
* ``SRResNet``: DAQ's ``srresnet.py`` (``head``, ``body.{i}.conv1|bn1|conv2|bn2``, ``body.{n}``,
  ``body.{n+1}``, ``tail.0.{k}``, ``tail.1``; its unused ``sub_mean``/``add_mean`` are dropped, its shared ReLU
  becomes per-block PReLU slopes of 0, which is exactly ReLU) or DDTB's ``bnsrresnet_org.py`` (``conv_input``,
  ``residual.{i}.conv1|in1|relu|conv2|in2``, ``conv_mid``, ``bn_mid``, ``upscale.{k}``, ``conv_output``) ->
  ``odm_basicsr`` ``SRResNet`` (mapping in ``odm_basicsr/archs/srresnet_bn_arch.py``).

All three feed images in [0, ``rgb_range``] (EDSR-PyTorch's ``--rgb_range 255``); the converted networks take
[0, 1] and use ``img_range: rgb_range`` inside, so they compute the same function.

``--check`` builds the source-layout network (a minimal copy of the original module structure, in this file)
and ours, loads both and compares their outputs on a random image. Every source key must be used or dropped
explicitly (``--drop REGEX``, e.g. quantizer entries of a quantized checkpoint); anything else is an error.

Where the originals are: EDSR-baseline x2/x3/x4 (``edsr_baseline_x{2,3,4}-*.pt``) at
https://cv.snu.ac.kr/research/EDSR/models/ (URLs in EDSR-PyTorch's ``src/model/edsr.py``); DAQ's FP models
(EDSR-baseline, RDN, SRResNet) in the Google Drive folder linked from https://github.com/Cheeun/DAQ-pytorch;
DDTB's FP models in the Google Drive folder linked from https://github.com/zysxmu/DDTB.
"""
# ruff: noqa: I001
import odm_basicsr.archs  # noqa: F401  (BasicSR fixes + registration first)

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass, field

import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

ARCHS = ('EDSR', 'RDN', 'SRResNet')
DIV2K_MEAN = (0.4488, 0.4371, 0.4040)  # EDSR-PyTorch's MeanShift default = BasicSR EDSR's rgb_mean default
_WRAPPER_KEYS = ('params', 'params_ema', 'state_dict', 'model', 'net', 'network')


class ConversionError(ValueError):
    """The input is not a checkpoint this script can convert; the message says why."""


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


# ----------------------------------------------------------------------------------------------------------------
# reading the input


def unwrap_state_dict(obj, source='input'):
    """The tensor dict inside a loaded checkpoint (bare, or under params/state_dict/model...), prefixes stripped."""
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
            break
        if isinstance(obj, dict):
            inner = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)]
            if inner:
                obj = obj[inner[0]]
                continue
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
            continue
        break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        found = sorted(map(str, obj))[:10] if isinstance(obj, dict) else type(obj).__name__
        raise ConversionError(f'{source} is not a state dict of tensors (found: {found})')
    state = {}
    for k, v in obj.items():
        for prefix in ('module.', 'model.'):
            if k.startswith(prefix):
                k = k[len(prefix):]
        state[k] = v
    return state


def load_source(path, trust=False):
    """Load ``path`` on the CPU (``weights_only`` unless ``trust``) and return its state dict."""
    try:
        obj = torch.load(path, map_location='cpu', weights_only=not trust)
    except FileNotFoundError as e:
        raise ConversionError(f'{path}: file not found') from e
    except Exception as e:  # unpickling errors come in many types
        hint = '' if trust else ' If the file comes from a source you trust, retry with --trust.'
        raise ConversionError(f'{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: '
                              f'{str(e).splitlines()[0] if str(e) else ""}).{hint}') from e
    return unwrap_state_dict(obj, source=str(path))


def detect_layout(state):
    """``(arch, layout)`` of a source state dict, from its keys."""
    keys = set(state)
    if 'SFENet1.weight' in keys:
        return 'RDN', 'rdn'
    if 'conv_input.weight' in keys and any(k.startswith('residual.') for k in keys):
        return 'SRResNet', 'ddtb'
    if 'head.0.weight' in keys:
        if state['head.0.weight'].dim() == 4 and state['head.0.weight'].shape[-1] == 9:
            return 'SRResNet', 'daq'
        if 'body.0.body.0.weight' in keys:
            return 'EDSR', 'edsr-pytorch'
    if 'conv_first.weight' in keys or 'sfe1.weight' in keys or 'body_tail.0.weight' in keys:
        raise ConversionError('the input is in BasicSR / odm_basicsr layout already (keys conv_first / sfe1 / '
                              'body_tail): use it as it is')
    shown = ', '.join(sorted(keys)[:8])
    raise ConversionError(f'unrecognised layout (first keys: {shown}). Expected EDSR-PyTorch EDSR (head.0, '
                          'body.{i}.body.0, tail), RDN (SFENet1, RDBs, UPNet) or DAQ/DDTB SRResNet (head.0 9x9 / '
                          'conv_input)')


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


# ----------------------------------------------------------------------------------------------------------------
# key mappings


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


# ----------------------------------------------------------------------------------------------------------------
# reference modules: minimal copies of the source layouts (module names = state-dict keys), for --check


class MeanShift(nn.Conv2d):
    """EDSR-PyTorch ``common.MeanShift``."""

    def __init__(self, rgb_range, rgb_mean=DIV2K_MEAN, rgb_std=(1.0, 1.0, 1.0), sign=-1):
        super().__init__(3, 3, kernel_size=1)
        std = torch.Tensor(rgb_std)
        self.weight.data = torch.eye(3).view(3, 3, 1, 1) / std.view(3, 1, 1, 1)
        self.bias.data = sign * rgb_range * torch.Tensor(rgb_mean) / std
        for p in self.parameters():
            p.requires_grad = False


def _conv(cin, cout, k, bias=True):
    return nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)


class _EDSRResBlock(nn.Module):
    def __init__(self, n_feats, res_scale):
        super().__init__()
        self.body = nn.Sequential(_conv(n_feats, n_feats, 3), nn.ReLU(True), _conv(n_feats, n_feats, 3))
        self.res_scale = res_scale

    def forward(self, x):
        return self.body(x).mul(self.res_scale) + x


def _edsr_upsampler(scale, n_feats, bias=True, act=None):
    m = []
    stages = [3] if scale == 3 else [2] * int(math.log2(scale))
    for r in stages:
        m += [_conv(n_feats, r * r * n_feats, 3, bias=bias), nn.PixelShuffle(r)]
        if act == 'prelu':
            m.append(nn.PReLU())
    return nn.Sequential(*m)


class EDSRPyTorchRef(nn.Module):
    """EDSR-PyTorch ``src/model/edsr.py``; input and output in [0, rgb_range]."""

    def __init__(self, n_resblocks=16, n_feats=64, scale=4, rgb_range=255, n_colors=3, res_scale=1,
                 rgb_mean=DIV2K_MEAN):
        super().__init__()
        self.sub_mean = MeanShift(rgb_range, rgb_mean)
        self.add_mean = MeanShift(rgb_range, rgb_mean, sign=1)
        self.head = nn.Sequential(_conv(n_colors, n_feats, 3))
        self.body = nn.Sequential(*[_EDSRResBlock(n_feats, res_scale) for _ in range(n_resblocks)],
                                  _conv(n_feats, n_feats, 3))
        self.tail = nn.Sequential(_edsr_upsampler(scale, n_feats), _conv(n_feats, n_colors, 3))

    def forward(self, x):
        x = self.head(self.sub_mean(x))
        res = self.body(x) + x
        return self.add_mean(self.tail(res))


class _RDBConv(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(cin, growth, 3, padding=1), nn.ReLU())

    def forward(self, x):
        return torch.cat((x, self.conv(x)), 1)


class _RDB(nn.Module):
    def __init__(self, g0, g, c):
        super().__init__()
        self.convs = nn.Sequential(*[_RDBConv(g0 + i * g, g) for i in range(c)])
        self.LFF = nn.Conv2d(g0 + c * g, g0, 1)

    def forward(self, x):
        return self.LFF(self.convs(x)) + x


class RDNRef(nn.Module):
    """EDSR-PyTorch / DAQ / DDTB ``rdn.py`` (FP); input and output in [0, rgb_range]."""

    def __init__(self, scale=4, G0=64, D=16, C=8, G=64, n_colors=3):
        super().__init__()
        self.SFENet1 = nn.Conv2d(n_colors, G0, 3, padding=1)
        self.SFENet2 = nn.Conv2d(G0, G0, 3, padding=1)
        self.RDBs = nn.ModuleList(_RDB(G0, G, C) for _ in range(D))
        self.GFF = nn.Sequential(nn.Conv2d(D * G0, G0, 1), nn.Conv2d(G0, G0, 3, padding=1))
        if scale in (2, 3):
            self.UPNet = nn.Sequential(nn.Conv2d(G0, G * scale * scale, 3, padding=1), nn.PixelShuffle(scale),
                                       nn.Conv2d(G, n_colors, 3, padding=1))
        else:
            self.UPNet = nn.Sequential(nn.Conv2d(G0, G * 4, 3, padding=1), nn.PixelShuffle(2),
                                       nn.Conv2d(G, G * 4, 3, padding=1), nn.PixelShuffle(2),
                                       nn.Conv2d(G, n_colors, 3, padding=1))

    def forward(self, x):
        f1 = self.SFENet1(x)
        x = self.SFENet2(f1)
        outs = []
        for block in self.RDBs:
            x = block(x)
            outs.append(x)
        return self.UPNet(self.GFF(torch.cat(outs, 1)) + f1)


class _DAQResBlock(nn.Module):
    def __init__(self, n_feats, act):
        super().__init__()
        self.conv1 = _conv(n_feats, n_feats, 3, bias=False)
        self.conv2 = _conv(n_feats, n_feats, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(n_feats)
        self.act = act
        self.bn2 = nn.BatchNorm2d(n_feats)

    def forward(self, x):
        return self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))) + x


class SRResNetDAQRef(nn.Module):
    """DAQ ``src/model/srresnet.py`` + ``common_srresnet.py`` (FP; one ReLU shared by all blocks, mean shifts
    built but unused); input and output in [0, rgb_range]. DAQ forces x4; x2/x3 follow the same pattern."""

    def __init__(self, n_resblocks=16, n_feats=64, scale=4, rgb_range=255, n_colors=3):
        super().__init__()
        self.sub_mean = MeanShift(rgb_range)
        self.add_mean = MeanShift(rgb_range, sign=1)
        self.head = nn.Sequential(_conv(n_colors, n_feats, 9, bias=False), nn.PReLU())
        act = nn.ReLU(True)
        self.body = nn.Sequential(*[_DAQResBlock(n_feats, act) for _ in range(n_resblocks)],
                                  _conv(n_feats, n_feats, 3, bias=False), nn.BatchNorm2d(n_feats))
        self.tail = nn.Sequential(_edsr_upsampler(scale, n_feats, bias=False, act='prelu'),
                                  _conv(n_feats, n_colors, 9, bias=False))

    def forward(self, x):
        x = self.head(x)
        return self.tail(self.body(x) + x)


class _DDTBResBlock(nn.Module):
    def __init__(self, n_feats):
        super().__init__()
        self.conv1 = nn.Conv2d(n_feats, n_feats, 3, 1, 1, bias=False)
        self.in1 = nn.BatchNorm2d(n_feats, affine=True)
        self.relu = nn.PReLU()
        self.conv2 = nn.Conv2d(n_feats, n_feats, 3, 1, 1, bias=False)
        self.in2 = nn.BatchNorm2d(n_feats, affine=True)

    def forward(self, x):
        return self.in2(self.conv2(self.relu(self.in1(self.conv1(x))))) + x


class SRResNetDDTBRef(nn.Module):
    """DDTB ``model/bnsrresnet_org.py`` (64 channels, 16 blocks there); input and output in [0, rgb_range]."""

    def __init__(self, n_resblocks=16, n_feats=64, scale=4, n_colors=3):
        super().__init__()
        self.conv_input = nn.Conv2d(n_colors, n_feats, 9, 1, 4, bias=False)
        self.relu = nn.PReLU()
        self.residual = nn.Sequential(*[_DDTBResBlock(n_feats) for _ in range(n_resblocks)])
        self.conv_mid = nn.Conv2d(n_feats, n_feats, 3, 1, 1, bias=False)
        self.bn_mid = nn.BatchNorm2d(n_feats, affine=True)
        self.upscale = _edsr_upsampler(scale, n_feats, bias=False, act='prelu')
        self.conv_output = nn.Conv2d(n_feats, n_colors, 9, 1, 4, bias=False)

    def forward(self, x):
        out = self.relu(self.conv_input(x))
        out = self.bn_mid(self.conv_mid(self.residual(out))) + out
        return self.conv_output(self.upscale(out))


def build_reference(conv, rgb_range=255.):
    """The source-layout network that fits a :class:`Conversion` (FP, eval mode)."""
    o = conv.arch_opts
    if conv.arch == 'EDSR':
        ref = EDSRPyTorchRef(o['num_block'], o['num_feat'], o['upscale'], rgb_range, o['num_in_ch'],
                             o['res_scale'], o['rgb_mean'])
    elif conv.arch == 'RDN':
        ref = RDNRef(o['upscale'], o['num_feat'], o['num_block'], o['num_layer'], o['growth'], o['num_in_ch'])
    elif conv.layout == 'daq':
        ref = SRResNetDAQRef(o['num_block'], o['num_feat'], o['upscale'], rgb_range, o['num_in_ch'])
    else:
        ref = SRResNetDDTBRef(o['num_block'], o['num_feat'], o['upscale'], o['num_in_ch'])
    return ref.eval()


def check(source_state, conv, rgb_range=255., size=16, seed=0, reference=None):
    """Max |ours(x) - ref(x * rgb_range) / rgb_range| over a random image in [0, 1] (both FP, eval mode).

    ``reference``: the source-layout network to compare with (default: built from the conversion's options and
    loaded with ``source_state``).
    """
    if reference is None:
        ref = build_reference(conv, rgb_range)
        source_state = {k: v for k, v in unwrap_state_dict(source_state).items() if k not in conv.dropped
                        or k.startswith(('sub_mean.', 'add_mean.'))}
        missing, unexpected = ref.load_state_dict(source_state, strict=False)
        missing = [k for k in missing if not k.startswith(('sub_mean.', 'add_mean.'))
                   and not k.endswith('num_batches_tracked')]
        if missing or unexpected:
            raise ConversionError(f'--check: the input does not fit the reference {type(ref).__name__}: '
                                  f'missing {missing[:6]}, unexpected {unexpected[:6]}')
    else:
        ref = reference.eval()
    ours = ARCH_REGISTRY.get(conv.arch)(**conv.arch_opts).eval()
    ours.load_state_dict(conv.state_dict, strict=True)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(1, conv.arch_opts['num_in_ch'], size, size, generator=gen)
    with torch.no_grad():
        expected = ref(x * rgb_range) / rgb_range
        got = ours(x)
    if expected.shape != got.shape:
        raise ConversionError(f'--check: output shapes differ: reference {tuple(expected.shape)}, '
                              f'ours {tuple(got.shape)}')
    return (expected - got).abs().max().item()


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('input', help='EDSR-PyTorch / DAQ / DDTB checkpoint (.pt)')
    parser.add_argument('output', help='BasicSR checkpoint to write (.pth), {"params": state_dict}')
    parser.add_argument('--arch', choices=('auto',) + ARCHS, default='auto',
                        help='expected architecture (default: recognised from the keys)')
    parser.add_argument('--rgb-range', type=float, default=255.,
                        help='the source\'s --rgb_range (default 255); becomes img_range')
    parser.add_argument('--res-scale', type=float, default=None,
                        help='EDSR residual scaling (default 1; 0.1 for the 32-block 256-channel EDSR)')
    parser.add_argument('--drop', action='append', default=[], metavar='REGEX',
                        help='drop source keys matching REGEX (repeatable), e.g. quantizer entries')
    parser.add_argument('--check', action='store_true',
                        help='compare the outputs of the source-layout network and ours on a random image')
    parser.add_argument('--check-size', type=int, default=16, help='--check input size in pixels (default 16)')
    parser.add_argument('--tol', type=float, default=1e-4, help='--check tolerance on the [0, 1] scale')
    parser.add_argument('--trust', action='store_true',
                        help='load the input with weights_only=False (only for files from a trusted source)')
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        source = load_source(args.input, trust=args.trust)
        conv = convert(source, arch=args.arch, rgb_range=args.rgb_range, res_scale=args.res_scale,
                       drop=args.drop)
        print(f'{args.input}: {conv.arch} ({conv.layout} layout), {len(conv.state_dict)} entries, '
              f'{sum(v.numel() for k, v in conv.state_dict.items() if v.is_floating_point()):,} values')
        for note in conv.notes:
            print(f'  note: {note}')
        if conv.dropped:
            print(f'  dropped {len(conv.dropped)} source entries: {", ".join(conv.dropped[:6])}'
                  f'{", ..." if len(conv.dropped) > 6 else ""}')
        if args.check:
            diff = check(source, conv, args.rgb_range, size=args.check_size)
            status = 'ok' if diff <= args.tol else 'FAILED'
            print(f'  check: max |ours - source| = {diff:.3g} on the [0, 1] scale (tolerance {args.tol:g}): '
                  f'{status}')
            if diff > args.tol:
                return 1
    except ConversionError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 1
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save({'params': conv.state_dict}, args.output)
    print(f'wrote {args.output}\nnetwork_g:\n  type: Quantized\n  arch: {conv.network_yaml()}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
