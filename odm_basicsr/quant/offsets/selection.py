"""Mismatch scores of each quantized layer and the choice of the layers that get an offset (METHOD.md 4.3, step 2).

Shift mismatch ``std_c(mu_c) / mean_c(sigma_c)``, scale mismatch ``std_c(sigma_c) / mean_c(sigma_c)``; layers are
selected by top-k fraction or threshold, each with the kind of its larger score.
"""
import math

from .distribution_offset import OFFSET_KINDS, _is_number

SELECT_MODES = ('topk', 'threshold')
KIND_CHOICES = ('auto',) + OFFSET_KINDS
_SCORE_EPS = 1e-12


def channel_mismatch(mean, std):
    """Shift and scale mismatch of one layer from its per-channel means and standard deviations.

    ``shift = std_c(mean_c) / mean_c(std_c)``, ``scale = std_c(std_c) / mean_c(std_c)``, with population standard
    deviations over the channels. The denominator is clamped to 1e-12, so a layer whose channels are all constant
    gets a very large (finite) score if their means differ and 0 if they do not.

    Args:
        mean (Tensor): (C,) per-channel means.
        std (Tensor): (C,) per-channel standard deviations.

    Returns:
        dict[str, float]: ``{'shift': ..., 'scale': ...}``, both >= 0.
    """
    mean, std = mean.double(), std.double()
    denom = std.mean().clamp_min(_SCORE_EPS)
    return {'shift': float(mean.std(unbiased=False) / denom), 'scale': float(std.std(unbiased=False) / denom)}


def mismatch_scores(stats):
    """Mismatch scores of every layer.

    Args:
        stats (dict[str, ChannelStats]): From :func:`channel_statistics`.

    Returns:
        dict[str, dict[str, float]]: ``{layer: {'shift': float, 'scale': float}}``, in the order of ``stats``.
    """
    scores = {}
    for name, s in stats.items():
        try:
            scores[name] = channel_mismatch(s.mean(), s.std())
        except ValueError as e:
            raise ValueError(f'mismatch_scores: layer {name!r}: {e}') from None
    return scores


def select_offset_layers(scores, select='topk', fraction=0.25, threshold=None, kind='auto'):
    """Choose the layers that get an offset, and its kind.

    Layers are ranked by ``max(shift, scale)`` whatever ``kind`` is, so forcing a kind changes only the kind,
    never the layer set (an ablation of the kinds compares the same layers).

    Args:
        scores (dict[str, dict[str, float]]): From :func:`mismatch_scores`.
        select (str): ``'topk'``: the ``ceil(fraction * n)`` layers with the largest score (ties keep the order of
            ``scores``); ``'threshold'``: the layers whose score is >= ``threshold``. Default: 'topk'.
        fraction (float): In [0, 1], used by ``'topk'``. Default: 0.25.
        threshold (float | None): >= 0, required by ``'threshold'`` (ignored by ``'topk'``). Default: None.
        kind (str): ``'auto'`` (per layer the kind with the larger score; ``'shift'`` on a tie), ``'shift'`` or
            ``'scale'``. Default: 'auto'.

    Returns:
        dict[str, str]: Layer name -> ``'shift'`` | ``'scale'``, in the order of ``scores``.

    Raises:
        ValueError: for an invalid option; the message names it.
    """
    if select not in SELECT_MODES:
        raise ValueError(f'select must be one of {list(SELECT_MODES)}, got {select!r}')
    if kind not in KIND_CHOICES:
        raise ValueError(f'kind must be one of {list(KIND_CHOICES)}, got {kind!r}')
    if select == 'topk' and not (_is_number(fraction) and 0.0 <= fraction <= 1.0):
        raise ValueError(f'fraction must be a number in [0, 1], got {fraction!r}')
    if select == 'threshold' and not (_is_number(threshold) and threshold >= 0.0):
        raise ValueError(f'threshold must be a number >= 0 when select is "threshold", got {threshold!r}')
    for name, s in scores.items():
        if not isinstance(s, dict) or not all(k in s for k in OFFSET_KINDS):
            raise ValueError(f'scores[{name!r}] must be a dict with "shift" and "scale", got {s!r}')
    names = list(scores)
    top = {n: max(scores[n]['shift'], scores[n]['scale']) for n in names}
    if select == 'topk':
        k = min(len(names), math.ceil(fraction * len(names) - 1e-9))  # 0.1 * 30 is 3.0000000000000004
        ranked = sorted(names, key=lambda n: -top[n])  # stable: ties keep their order
        chosen = set(ranked[:k])
    else:
        chosen = {n for n in names if top[n] >= threshold}
    selection = {}
    for n in names:
        if n in chosen:
            if kind == 'auto':
                selection[n] = 'shift' if scores[n]['shift'] >= scores[n]['scale'] else 'scale'
            else:
                selection[n] = kind
    return selection
