"""Select layers of a network by name and swap them for quantized twins."""
import fnmatch
import re

from .layers import QUANTIZABLE_TYPES, QUANTIZED_TYPES


def quantizable_layers(model):
    """Names of the ``nn.Conv2d`` / ``nn.Linear`` modules of ``model`` (exact types), in registration order."""
    return [name for name, m in model.named_modules() if type(m) in QUANTIZABLE_TYPES]


def quantized_layers(model):
    """``(name, module)`` pairs of the quantized layers of ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QUANTIZED_TYPES)]


def _matches(pattern, name):
    if pattern.startswith('re:'):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _check_patterns(patterns, what):
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f'{what} must be a list of glob patterns or "re:<regex>" strings, got {patterns!r}')
    for p in patterns:
        if p.startswith('re:'):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ValueError(f'{what}: invalid regular expression {p!r}: {e}') from None
    return list(patterns)


def select_layers(model, patterns, exclude=(), model_name=None):
    """Names of the quantizable layers that match any of ``patterns`` and none of ``exclude``.

    Patterns are shell globs on the full module name (``body.*.conv1``) or regular expressions prefixed with
    ``re:`` (``re:body\\.\\d+\\.conv[12]``), matched against the whole name.

    Raises:
        ValueError: if a pattern matches no layer; the message lists the candidates.
    """
    model_name = model_name or type(model).__name__
    patterns = _check_patterns(patterns, 'layers')
    exclude = _check_patterns(exclude, 'exclude') if exclude else []
    candidates = quantizable_layers(model)
    for p in patterns + exclude:
        if not any(_matches(p, n) for n in candidates):
            listing = ', '.join(candidates) if len(candidates) <= 60 else ', '.join(candidates[:60]) + ', ...'
            raise ValueError(f'layer pattern {p!r} matches no Conv2d/Linear layer of {model_name}. '
                             f'Candidate layers ({len(candidates)}): {listing}')
    return [n for n in candidates
            if any(_matches(p, n) for p in patterns) and not any(_matches(p, n) for p in exclude)]


def names_matching(names, patterns, what='patterns'):
    """The ``names`` (in their order) that match any of ``patterns`` (globs or ``re:`` regexes, see
    :func:`select_layers`); a pattern that matches none of them is a ValueError listing the names."""
    patterns = _check_patterns(patterns, what)
    for p in patterns:
        if not any(_matches(p, n) for n in names):
            raise ValueError(f'{what}: pattern {p!r} matches none of {", ".join(names)}')
    return [n for n in names if any(_matches(p, n) for p in patterns)]


def swap_layers(model, names, w_bits, a_bits, act_options=None, weight_options=None):
    """Replace the named modules of ``model`` by their quantized twins, in place. Returns ``model``."""
    modules = dict(model.named_modules())
    for name in names:
        parent_name, _, child = name.rpartition('.')
        parent = modules[parent_name] if parent_name else model
        fp = modules[name]
        q = QUANTIZABLE_TYPES[type(fp)].from_float(fp, w_bits, a_bits, act_options, weight_options)
        setattr(parent, child, q)
    return model


def quantizer_state_keys(model):
    """State-dict keys of ``model`` that belong to quantizers or offsets, not to the FP network."""
    keys = []
    for name, m in quantized_layers(model):
        for sub in ('act_quant', 'weight_quant', 'offset', 'out_quant'):
            part = getattr(m, sub, None)
            if part is not None:
                prefix = f'{name}.{sub}.' if name else f'{sub}.'
                keys.extend(prefix + k for k in part.state_dict())
    return keys
