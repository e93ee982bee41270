"""Checkpoints: read one into a network, write one safely. Every loader of the plugin goes through here.

Plain PyTorch (no BasicSR, OpenCV or SciPy), so a deployed model or a script of yours can use it alone.

* :func:`load_checkpoint` reads a file on the CPU with ``weights_only=True``; :func:`select_state_dict` picks the
  network's state dict in it (``params_ema``, ``params`` or a bare state dict), with the wrapper prefixes removed
  from its keys (:func:`canonical_state_dict`: ``module.`` of DataParallel / DDP, ``_orig_mod.`` of
  ``torch.compile``).
* :func:`compare` says how a state dict fits a network: the quantizer and offset entries an FP checkpoint lacks are
  expected; anything else missing, unexpected or differently shaped is a mismatch. :func:`load_state` loads it
  (strictly: a mismatch is a :class:`CheckpointMismatchError` naming the file and the keys).
* :func:`load_weights` does all of that for a file and, where the caller asks, refuses a state holding NaN / Inf
  (:class:`~odm_basicsr.guards.NonFiniteError`) or a quantized network left uncalibrated
  (:class:`UncalibratedError`).
* :func:`atomic_save` writes through a temporary file and a rename: a crash never leaves half a checkpoint.
"""
import os
from dataclasses import dataclass, field

import torch

from odm_basicsr.guards import check_finite

#: Prefixes that wrappers add to every key: DataParallel / DDP, torch.compile.
WRAPPER_PREFIXES = ('module.', '_orig_mod.')
#: How many keys an error message names (the rest are counted).
SHOWN_KEYS = 8


class CheckpointError(Exception):
    """A checkpoint that cannot be used. ``str(e)`` is the message (also for the ``KeyError`` kind)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ''


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No such file."""


class UnreadableCheckpointError(CheckpointError, RuntimeError):
    """Not loadable with ``weights_only=True`` (not a checkpoint, or it pickles more than tensors and plain values)."""


class MissingEntryError(CheckpointError, KeyError):
    """The checkpoint has none of the entries asked for."""


class NotAStateDictError(CheckpointError, TypeError):
    """The selected entry is not a state dict."""


class CheckpointMismatchError(CheckpointError, RuntimeError):
    """The state dict does not fit the network (missing, unexpected or differently shaped keys)."""


class UncalibratedError(CheckpointError, RuntimeError):
    """The quantized network would run with activation ranges that no calibration set."""


def load_checkpoint(path):
    """Load ``path`` on the CPU with ``weights_only=True``.

    Raises:
        CheckpointNotFoundError: no such file.
        UnreadableCheckpointError: it does not load with ``weights_only=True``.
    """
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f'checkpoint file not found: {path}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and friends
        raise UnreadableCheckpointError(f'cannot load {path} with weights_only=True (it must hold only tensors and '
                                        f'plain Python values, as BasicSR checkpoints do): {e}') from e


def canonical_key(key):
    """``key`` without leading wrapper prefixes and without ``_orig_mod.`` of a compiled submodule."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key.replace('._orig_mod.', '.')


def canonical_state_dict(state):
    """``state`` with :func:`canonical_key` keys, in the same order."""
    return {canonical_key(k): v for k, v in state.items()}


def _is_bare_state_dict(obj):
    return isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def select_state_dict(ckpt, param_key='params', fallback='params', source='checkpoint'):
    """Pick the network state dict inside a loaded checkpoint, with canonical keys.

    Tries ``ckpt[param_key]``, then ``ckpt[fallback]`` (None: no fallback), then ``ckpt`` itself when it is a bare
    state dict (all values tensors).

    Returns:
        tuple[str | None, dict]: The key used (None for a bare state dict) and the state dict.

    Raises:
        MissingEntryError: no such entry; the message names ``source`` and the keys found.
        NotAStateDictError: the selected entry is not a dict.
    """
    if isinstance(ckpt, dict) and param_key is not None and param_key in ckpt:
        key = param_key
    elif isinstance(ckpt, dict) and fallback is not None and fallback in ckpt:
        key = fallback
    elif _is_bare_state_dict(ckpt):
        return None, canonical_state_dict(ckpt)
    else:
        found = list(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        wanted = f'"{param_key}"' + (f' or "{fallback}"' if fallback not in (None, param_key) else '')
        raise MissingEntryError(f'{source} has no {wanted} entry (found: {found})')
    state = ckpt[key]
    if not isinstance(state, dict):
        raise NotAStateDictError(f'{source} [{key}] is not a state dict')
    return key, canonical_state_dict(state)


def read_state(path, param_key='params', fallback='params', finite=None):
    """``(key, state dict)`` of the checkpoint file ``path`` (:func:`load_checkpoint`, :func:`select_state_dict`).

    Args:
        finite (str | None): Refuse a state holding NaN / Inf with this hint (e.g. ``'refusing to load it'``):
            :class:`~odm_basicsr.guards.NonFiniteError`. None: not checked.
    """
    key, state = select_state_dict(load_checkpoint(path), param_key, fallback, source=f'checkpoint {path}')
    if finite is not None:
        check_finite(state, describe(path, key), finite)
    return key, state


def describe(path, key):
    """``'checkpoint <path> [<key>]'`` (no brackets for a bare state dict): how messages name a state."""
    return f'checkpoint {path}' + (f' [{key}]' if key else '')


def _quantizer_state_keys(net):
    from odm_basicsr.quant.layer_selection import quantizer_state_keys

    return set(quantizer_state_keys(net))


def _shown(keys):
    return ', '.join(keys[:SHOWN_KEYS]) + (', ...' if len(keys) > SHOWN_KEYS else '')


@dataclass
class Fit:
    """How a state dict fits a network; key lists are sorted."""

    missing: list = field(default_factory=list)  # network entries the state lacks (quantizer entries excluded)
    unexpected: list = field(default_factory=list)  # state entries the network lacks
    mismatched: list = field(default_factory=list)  # entries of both with different shapes
    quantizer_missing: list = field(default_factory=list)  # quantizer / offset entries the state lacks
    shapes: dict = field(default_factory=dict)  # mismatched key -> (network shape, state shape)

    @property
    def ok(self):
        """True when only quantizer entries are missing (what an FP checkpoint of the network gives)."""
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self):
        """``'2 missing (a, b); 1 shape mismatch (c)'``."""
        parts = [f'{len(keys)} {label} ({_shown(keys)})'
                 for label, keys in (('missing', self.missing), ('unexpected', self.unexpected),
                                     ('shape mismatch', self.mismatched)) if keys]
        return '; '.join(parts)


def compare(net, state):
    """The :class:`Fit` of ``state`` to ``net`` (offsets the state carries are not created: see :func:`load_state`)."""
    own = net.state_dict()
    quant = _quantizer_state_keys(net)
    absent = set(own) - set(state)
    shapes = {k: (tuple(own[k].shape), tuple(state[k].shape)) for k in sorted(set(own) & set(state))
              if own[k].shape != state[k].shape}
    return Fit(missing=sorted(absent - quant), unexpected=sorted(set(state) - set(own)), mismatched=list(shapes),
               quantizer_missing=sorted(absent & quant), shapes=shapes)


def load_state(net, state, strict=True, source='checkpoint', hint=''):
    """Load ``state`` into ``net``; the quantizer and offset entries it lacks stay as they are.

    Offsets and output quantizers that ``state`` carries and ``net`` lacks are created first (offsets are attached
    at calibration, so a fresh network has none, and so are the output quantizers ``output_quant: auto`` adds for
    them). Not strict: mismatched entries are skipped and the rest is loaded.

    Args:
        source (str): How messages name the state, e.g. :func:`describe`'s ``'checkpoint a.pth [params]'``.
        hint (str): Appended to the mismatch message (what the user can do).

    Returns:
        Fit: How the state fitted.

    Raises:
        CheckpointMismatchError: ``strict`` and a mismatch, or offsets in ``state`` that ``net`` cannot carry.
    """
    from odm_basicsr.quant.offsets import ensure_offsets_from_state
    from odm_basicsr.quant.output_quantizers import ensure_output_quantizers_from_state

    name = type(net).__name__
    try:
        ensure_offsets_from_state(net, state)
        ensure_output_quantizers_from_state(net, state)
    except ValueError as e:
        raise CheckpointMismatchError(f'{source} does not fit network {name}: {e}') from e
    fit = compare(net, state)
    if strict and not fit.ok:
        raise CheckpointMismatchError(f'{source} does not fit network {name}: {fit.describe()}.'
                                      + (f' {hint}' if hint else ''))
    if fit.mismatched:
        state = {k: v for k, v in state.items() if k not in fit.shapes}
    net.load_state_dict(state, strict=False)
    return fit


def check_calibrated(net, source='checkpoint', fit=None):
    """Refuse a quantized network whose activation quantizers no calibration initialised.

    Args:
        fit (Fit | None): The :func:`load_state` result, to name an FP checkpoint (every quantizer entry missing)
            as such.

    Raises:
        UncalibratedError: the message names ``source`` and the layers.
    """
    from odm_basicsr.quant import quantized_layers

    name = type(net).__name__
    if fit is not None and fit.quantizer_missing and fit.ok:
        raise UncalibratedError(
            f'{source} has no quantizer state for {name} ({len(fit.quantizer_missing)} quantizer entries missing: '
            'an FP checkpoint?); its activation quantizers would be calibrated on the test data. Calibrate/fine-tune '
            'it first (odm-train) and evaluate that checkpoint.')
    uninit = [n for n, m in quantized_layers(net)
              if getattr(m, 'act_quant', None) is not None and not bool(m.act_quant.initialized)]
    if uninit:
        shown = ', '.join(uninit[:5]) + (', ...' if len(uninit) > 5 else '')
        raise UncalibratedError(
            f'{source} leaves {len(uninit)} activation quantizer(s) uninitialised ({shown}); evaluating would '
            'calibrate them on the test data. Evaluate a calibrated checkpoint instead.')


@dataclass
class Loaded:
    """What :func:`load_weights` loaded: the checkpoint entry (None: a bare state dict) and the fit."""

    key: str | None
    fit: Fit


def load_weights(net, path, param_key='params', fallback='params', strict=True, finite=None, calibrated=False,
                 hint=''):
    """Load the checkpoint file ``path`` into ``net``: the one checkpoint loader of the plugin.

    Args:
        net (nn.Module): The network (its quantizer entries may be absent from the file: an FP checkpoint).
        param_key (str | None): Entry to load; ``fallback`` is tried next, then a bare state dict.
        strict (bool): A mismatch (other than absent quantizer entries) is an error.
        finite (str | None): Refuse NaN / Inf values with this hint (:func:`read_state`).
        calibrated (bool): Refuse an FP checkpoint or uninitialised activation quantizers
            (:func:`check_calibrated`).
        hint (str): Appended to a mismatch message.

    Returns:
        Loaded: The entry used and the :class:`Fit`.

    Raises:
        CheckpointError: see the classes above; NonFiniteError with ``finite``.
    """
    key, state = read_state(path, param_key, fallback, finite)
    source = f'checkpoint {path} [{key}]'
    fit = load_state(net, state, strict, source, hint)
    if calibrated:
        check_calibrated(net, source, fit)
    return Loaded(key, fit)


def atomic_save(obj, path):
    """``torch.save`` to a temporary file in the same folder, then rename it over ``path``."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
