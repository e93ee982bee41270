"""Guards against non-finite (NaN / Inf) networks: found before they are written, loaded or scored.

Plain PyTorch: importing this module needs neither BasicSR nor OpenCV nor SciPy.

* :func:`nonfinite_entries` lists the floating tensors of a state dict (nested dicts, lists and tuples too) that
  hold NaN or Inf values, with how many; :func:`check_finite` raises :class:`NonFiniteError` when there is one.
* :class:`TrainingDivergedError` is raised by a training model when too many steps in a row were non-finite;
  :func:`last_checkpoint` names the newest network checkpoint of a BasicSR ``models`` folder.

``odm-train`` / ``odm-test`` / ``odm-eval`` report both errors as one line and exit with status 3.
"""
import os
import re
from collections.abc import Mapping

import torch

#: How many offending tensors an error message names (the rest are counted).
SHOWN = 5


class NonFiniteError(Exception):
    """A state holds non-finite (NaN / Inf) values; the message names its source and the first offending keys.

    Args:
        what (str): The source, e.g. ``'checkpoint net_g_8.pth [params]'`` or ``'not writing net_g_8.pth: the
            network'``; the message reads ``<what> holds N non-finite values (NaN/Inf) in M tensors: ...``.
        entries (list[tuple[str, int]]): ``(key, count)`` as :func:`nonfinite_entries` returns them. Without
            entries, ``what`` is the whole message.
        hint (str): Appended after ``'; '`` (what was done about it).
    """

    def __init__(self, what, entries=(), hint=''):
        entries = [(str(k), int(c)) for k, c in entries]
        super().__init__(what, entries, hint)  # args rebuild the error (pickling across processes)
        self.what, self.entries, self.hint = what, entries, hint

    def __str__(self):
        if not self.entries:
            message = self.what
        else:
            total = sum(c for _, c in self.entries)
            n = len(self.entries)
            shown = ', '.join(f'{k} ({c})' for k, c in self.entries[:SHOWN])
            more = f', and {n - SHOWN} more' if n > SHOWN else ''
            message = (f'{self.what} holds {total} non-finite value{"s" * (total != 1)} (NaN/Inf) in {n} '
                       f'tensor{"s" * (n != 1)}: {shown}{more}')
        return f'{message}; {self.hint}' if self.hint else message


class TrainingDivergedError(RuntimeError):
    """Training diverged: too many optimisation steps in a row had a non-finite loss or gradients.

    Raised by the training model with a complete message (how many steps, the last good checkpoint from
    :func:`last_checkpoint`); ``odm-train`` prints it as one line and exits with status 3.
    """


def _count(t):
    """Non-finite values of a floating (or complex) tensor; 0 for every other tensor."""
    if not (t.is_floating_point() or t.is_complex()) or t.is_meta or t.numel() == 0:
        return 0
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    finite = torch.isfinite(t)
    return 0 if bool(finite.all()) else int(finite.numel() - finite.sum())


def nonfinite_entries(state, prefix=''):
    """``[(key, count)]`` of the floating tensors in ``state`` holding NaN or Inf values, in iteration order.

    ``state`` may be a tensor, a state dict, or dicts / lists / tuples of them nested (a checkpoint, an optimizer
    state). Keys of nested entries are joined with ``/`` (``'params/conv_first.weight'``, ``'optimizers/0/state/3/
    exp_avg'``); list items are named by their index. Integer and boolean tensors and non-tensor values are ignored.
    """
    found = []
    if torch.is_tensor(state):
        count = _count(state)
        if count:
            found.append((prefix, count))
    elif isinstance(state, Mapping):
        for k, v in state.items():
            found.extend(nonfinite_entries(v, f'{prefix}/{k}' if prefix else str(k)))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            found.extend(nonfinite_entries(v, f'{prefix}/{i}' if prefix else str(i)))
    return found


def check_finite(state, what, hint=''):
    """Raise :class:`NonFiniteError` (naming ``what`` and the offending keys) if ``state`` holds NaN or Inf."""
    entries = nonfinite_entries(state)
    if entries:
        raise NonFiniteError(what, entries, hint)


def last_checkpoint(models_dir, net_label='net_g'):
    """The newest ``<net_label>_<iter>.pth`` (highest iteration) of a BasicSR ``models`` folder, or None.

    ``<net_label>_latest.pth`` (written when a run ends) counts when it is the only one or was written after the
    highest-numbered file (a resumed run may have numbered files newer than an earlier run's ``latest``).
    """
    if not models_dir or not os.path.isdir(models_dir):
        return None
    pattern = re.compile(rf'{re.escape(net_label)}_(\d+)\.pth')
    numbered = []
    for name in os.listdir(models_dir):
        m = pattern.fullmatch(name)
        if m and os.path.isfile(os.path.join(models_dir, name)):
            numbered.append((int(m.group(1)), os.path.join(models_dir, name)))
    newest = max(numbered)[1] if numbered else None
    latest = os.path.join(models_dir, f'{net_label}_latest.pth')
    if os.path.isfile(latest) and (newest is None or os.path.getmtime(latest) > os.path.getmtime(newest)):
        return latest
    return newest
