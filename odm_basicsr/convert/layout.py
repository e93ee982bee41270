"""Reading a source checkpoint (EDSR-PyTorch, DAQ, DDTB) and recognising its layout from the keys."""

import torch
from torch import nn

from odm_basicsr.checkpoint import canonical_key

_WRAPPER_KEYS = ('params', 'params_ema', 'state_dict', 'model', 'net', 'network')


class ConversionError(ValueError):
    """The input is not a checkpoint this script can convert; the message says why."""


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
        k = canonical_key(k)  # module. (DataParallel / DDP), _orig_mod. (torch.compile)
        state[k[len('model.'):] if k.startswith('model.') else k] = v
    return state


def load_source(path, trust=False):
    """Load ``path`` on the CPU (``weights_only`` unless ``trust``) and return its state dict."""
    from odm_basicsr.checkpoint import CheckpointNotFoundError, UnreadableCheckpointError, load_checkpoint

    hint = '' if trust else ' If the file comes from a source you trust, retry with --trust.'
    try:
        obj = torch.load(path, map_location='cpu', weights_only=False) if trust else load_checkpoint(path)
    except (FileNotFoundError, CheckpointNotFoundError) as e:
        raise ConversionError(f'{path}: file not found') from e
    except Exception as e:  # unpickling errors come in many types
        cause = e.__cause__ if isinstance(e, UnreadableCheckpointError) and e.__cause__ is not None else e
        raise ConversionError(f'{path}: cannot be read as a PyTorch checkpoint ({type(cause).__name__}: '
                              f'{str(cause).splitlines()[0] if str(cause) else ""}).{hint}') from e
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
