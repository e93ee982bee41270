"""The compact file of a deploy-form network: b-bit weight codes packed into bytes, in safetensors.

Layout of ``model.safetensors`` (metadata key ``odm_deploy`` holds JSON; ``format`` is ``odm-basicsr-deploy``):

* ``<layer>.weight_codes``: uint8, the layer's weight codes as unsigned ``w_bits``-bit indices packed
  little-endian bit after bit (``ceil(numel * w_bits / 8)`` bytes). Index ``j`` is ``(code + 2**b - 1) / 2`` on the
  midrise grid (odd codes) and ``code + 2**(b-1) - 1`` on the midtread grid;
* ``<layer>.weight_scale`` float32 (out_channels,), or (1,) when every channel shares it (a per-layer weight
  range), ``<layer>.bias_codes`` int32, ``<layer>.in_step`` float32 (1,),
  ``<layer>.pre_param`` float32 (channels,) for an offset, ``<layer>.out_step`` float32 (1,) for an output quantizer;
* every other state entry of the network (the full-precision layers) under its own key, float32, or float16 with
  ``fp16=True`` (integer-layer scales always stay float32: they define the grids);
* metadata: the FP arch (``arch_class`` ``module:Class`` and its options), each integer layer's spec (bits, grids,
  lowest codes, conv geometry), the folded residual scalings, and the storage dtype.

:func:`load` rebuilds the network from the file alone: its output is bit-identical to the deploy form that was saved
(with ``fp16=True``: to the deploy form whose float layers were rounded to float16, :func:`round_float_layers`).

Plain PyTorch and safetensors: no BasicSR import. (An arch that BasicSR defines is imported from BasicSR when the
file is loaded.)
"""
import importlib
import json
import math
import os

import torch

from .convert import DeployError
from .integer_layers import build_integer_layer, integer_layers, layer_kind

FORMAT = 'odm-basicsr-deploy'
VERSION = 1
METADATA_KEY = 'odm_deploy'
_LAYER_BUFFERS = ('weight_scale', 'bias_codes', 'in_step', 'pre_param', 'out_step')


def code_offset(bits, grid):
    """``(offset, divisor)`` with ``index = (code + offset) // divisor`` in ``0 .. 2**bits - 1``."""
    return (2**bits - 1, 2) if grid == 'midrise' else (2**(bits - 1) - 1, 1)


def pack_bits(values, bits):
    """Pack unsigned ``bits``-bit integers (any shape, values ``< 2**bits``) into uint8, little-endian.

    Returns:
        Tensor: uint8, ``ceil(numel * bits / 8)`` bytes.
    """
    flat = values.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f'pack_bits: values must be in 0..{2**bits - 1}')
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)  # bit i of value k at position k * bits + i
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).view(-1, 8)
    return (stream << torch.arange(8, dtype=torch.int64)).sum(1).to(torch.uint8)


def unpack_bits(packed, count, bits):
    """Inverse of :func:`pack_bits`: ``count`` values of ``bits`` bits, int64 (count,)."""
    need = math.ceil(count * bits / 8)
    if packed.numel() != need:
        raise ValueError(f'unpack_bits: {packed.numel()} bytes for {count} values of {bits} bits (expected {need})')
    stream = ((packed.to(torch.int64).unsqueeze(1) >> torch.arange(8, dtype=torch.int64)) & 1).reshape(-1)
    stream = stream[:count * bits].view(count, bits)
    return (stream << torch.arange(bits, dtype=torch.int64)).sum(1)


def pack_weight_codes(layer):
    offset, divisor = code_offset(layer.weight_bits, layer.weight_grid)
    return pack_bits((layer.weight_codes.to(torch.int64) + offset) // divisor, layer.weight_bits)


def unpack_weight_codes(packed, spec):
    shape = spec['weight_shape']
    offset, divisor = code_offset(spec['weight_bits'], spec['weight_grid'])
    index = unpack_bits(packed, math.prod(shape), spec['weight_bits'])
    return (index * divisor - offset).to(torch.int8).view(shape)


def _is_float_entry(t):
    return t.is_floating_point()


@torch.no_grad()
def round_float_layers(net, dtype=torch.float16):
    """Round the float state of the full-precision layers of a deploy-form network to ``dtype`` and back (in
    place): the reference that a file written with ``fp16=True`` reloads to, bit for bit. Returns ``net``."""
    skip = {f'{name}.' for name, _ in integer_layers(net)}
    for key, t in net.state_dict(keep_vars=True).items():
        if not any(key.startswith(s) for s in skip) and _is_float_entry(t):
            t.data.copy_(t.data.to(dtype).float())
    return net


def save(net, path, fp16=False):
    """Write the compact file of a deploy-form network (:func:`odm_basicsr.deploy.to_deploy`).

    Args:
        net (nn.Module): The deploy form (its ``deploy_info`` names the FP arch).
        path (str): Output ``.safetensors`` file (written atomically).
        fp16 (bool): Store the full-precision layers in float16. Default: False.

    Returns:
        int: The file size in bytes.
    """
    from safetensors.torch import save_file

    info = getattr(net, 'deploy_info', None)
    if not info or not info.get('arch'):
        raise DeployError('save: the network is not a deploy form with a known FP arch (use to_deploy)')
    tensors, specs = {}, {}
    layers = integer_layers(net)
    for name, layer in layers:
        specs[name] = dict(layer.spec(), kind=layer_kind(layer))
        tensors[f'{name}.weight_codes'] = pack_weight_codes(layer)
        for buf in _LAYER_BUFFERS:
            t = getattr(layer, buf)
            if t is not None:
                t = t.detach().reshape(-1)
                if buf == 'weight_scale' and bool((t == t[0]).all()):
                    t = t[:1]  # one range per layer: one scale
                tensors[f'{name}.{buf}'] = t.clone().contiguous()
    skip = tuple(f'{name}.' for name, _ in layers)
    for key, t in net.state_dict().items():
        if key.startswith(skip):
            continue
        t = t.detach().cpu()
        tensors[key] = (t.half() if fp16 and _is_float_entry(t) else t).clone().contiguous()
    meta = dict(format=FORMAT, version=VERSION, arch_class=info['arch_class'], arch=info['arch'],
                residual_scales_folded=info.get('residual_scales_folded', {}), integer_layers=specs,
                float_dtype='float16' if fp16 else 'float32')
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        save_file(tensors, tmp, metadata={'format': FORMAT, METADATA_KEY: json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return os.path.getsize(path)


def import_arch_class(spec):
    """The class named ``module:Class``; BasicSR modules get the torchvision compatibility stub first."""
    module_name, _, class_name = spec.partition(':')
    if module_name.split('.')[0] == 'basicsr':
        from odm_basicsr.compat import install_functional_tensor_stub
        install_functional_tensor_stub()
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise DeployError(f'cannot import the network class {spec}: {e}') from e


def read_metadata(path):
    """The ``odm_deploy`` metadata of a compact file, as a dict; clear errors for anything else."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f'deployed model not found: {path}')
    try:
        with safe_open(path, 'pt') as f:
            raw = f.metadata() or {}
    except Exception as e:
        raise DeployError(f'{path} is not a safetensors file: {e}') from e
    if raw.get('format') != FORMAT or METADATA_KEY not in raw:
        raise DeployError(f'{path} is not an odm-basicsr deployed model (no "{FORMAT}" metadata); write one with '
                          'odm-export')
    meta = json.loads(raw[METADATA_KEY])
    if meta.get('version') != VERSION:
        raise DeployError(f'{path}: deployed-model format version {meta.get("version")}, this odm-basicsr reads '
                          f'version {VERSION}')
    return meta


def load(path, device='cpu'):
    """Rebuild the deploy-form network stored in ``path`` (see the module docstring).

    Args:
        path (str): A file written by :func:`save` (``odm-export``).
        device (str | torch.device): Where to put the network. Default: 'cpu'.

    Returns:
        nn.Module: The network in eval mode, float32 (taking and giving what the trained network takes and gives).
    """
    from safetensors import safe_open

    meta = read_metadata(path)
    cls = import_arch_class(meta['arch_class'])
    options = {k: v for k, v in meta['arch'].items() if k != 'type'}
    net = cls(**options)
    modules = dict(net.named_modules())
    for name, spec in meta['integer_layers'].items():
        if name not in modules:
            raise DeployError(f'{path}: integer layer {name!r} is not a module of {meta["arch_class"]}')
        parent_name, _, child = name.rpartition('.')
        setattr(modules[parent_name] if parent_name else net, child, build_integer_layer(spec))
    for block in meta['residual_scales_folded']:
        modules[block].res_scale = 1.0
    state, own = {}, net.state_dict()
    with safe_open(path, 'pt') as f:
        for key in f.keys():
            t = f.get_tensor(key)
            layer, _, field = key.rpartition('.')
            if layer in meta['integer_layers'] and field == 'weight_codes':
                t = unpack_weight_codes(t, meta['integer_layers'][layer])
            elif key in own:
                target = own[key]
                if field == 'weight_scale' and t.numel() == 1:
                    t = t.expand(target.shape)
                t = t.to(target.dtype).reshape(target.shape).clone()
            state[key] = t
    net.load_state_dict(state, strict=True)
    net.deploy_info = {k: meta[k] for k in ('arch_class', 'arch', 'residual_scales_folded')}
    return net.to(device).eval()
