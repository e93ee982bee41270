"""Feature regularisation losses of ODM: variance (METHOD.md 4.1) and mismatch (METHOD.md 6, version 2).

Either is ODMModel's regulariser ``train.reg_opt`` (formerly ``var_opt``), logged as ``l_reg``.

Both losses act on the list of inputs ``X_i`` of the quantized layers and also give their gradient with respect
to one feature in closed form (:meth:`feature_grad`), which the ``feature`` cooperation mode
(:func:`odm_basicsr.odm.cooperative_feature`) adds to the reconstruction gradient during the single backward pass.

Feature layouts: 4-D ``(B, C, H, W)`` conv inputs (channel dim 1), 3-D ``(B, N, C)`` token inputs of linear layers
(SwinIR; channel dim last) and 2-D ``(N, C)`` inputs (channel dim last).
"""
import torch
from basicsr.utils.registry import LOSS_REGISTRY
from torch import nn

VARIANCE_REDUCTIONS = ('channel', 'layer', 'image')
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check_loss_weight(loss_weight):
    if isinstance(loss_weight, str):
        raise ValueError(f'loss_weight must be a number >= 0, got the string {loss_weight!r} '
                         '(YAML reads 1e-4 as a string: write 1.0e-4 or !!float 1e-4)')
    if isinstance(loss_weight, bool) or not isinstance(loss_weight, (int, float)) or not loss_weight >= 0:
        raise ValueError(f'loss_weight must be a number >= 0, got {loss_weight!r}')
    return float(loss_weight)


def _as_feature_list(features, name='features'):
    """Accept one tensor or a list/tuple of tensors; return a list."""
    if isinstance(features, torch.Tensor):
        return [features]
    if not isinstance(features, (list, tuple)):
        raise TypeError(f'{name} must be a Tensor or a list/tuple of Tensors, got {type(features).__name__}')
    return list(features)


def _upcast(x):
    """Reductions of float16/bfloat16 features run in float32 (sums of squares overflow float16)."""
    return x.float() if x.dtype in _LOW_PRECISION else x


def channel_dim(x):
    """Channel dimension of a feature: 1 for 4-D ``(B, C, H, W)``, last for 3-D ``(B, N, C)`` and 2-D ``(N, C)``.

    Raises:
        ValueError: For any other number of dimensions.
    """
    if x.dim() == 4:
        return 1
    if x.dim() in (2, 3):
        return x.dim() - 1
    raise ValueError(f'channel reduction needs a 2-D, 3-D or 4-D feature, got shape {tuple(x.shape)}')


def variance_dims(x, reduction):
    """The dimensions the variance of ``x`` is taken over, for one reduction.

    Args:
        x (Tensor): One feature (see the module docstring for the layouts).
        reduction (str): 'channel' (all dims but the channel dim), 'layer' (all dims) or 'image' (all dims but 0).

    Returns:
        tuple[int]: Dimensions to reduce; the variance is then averaged over the remaining one (if any).
    """
    if x.numel() == 0:
        raise ValueError(f'cannot take the variance of an empty feature of shape {tuple(x.shape)}')
    if reduction == 'layer':
        return tuple(range(x.dim()))
    if reduction == 'image':
        if x.dim() < 2:
            raise ValueError(f'image reduction needs a feature with an image dim 0 and more, got {tuple(x.shape)}')
        return tuple(range(1, x.dim()))
    if reduction == 'channel':
        ch = channel_dim(x)
        return tuple(d for d in range(x.dim()) if d != ch)
    raise ValueError(f'reduction must be one of {VARIANCE_REDUCTIONS}, got {reduction!r}')


def feature_variance(x, reduction='channel'):
    """Population variance (divide by N) of one feature, reduced as in METHOD.md 4.1.

    Args:
        x (Tensor): One feature (see the module docstring for the layouts).
        reduction (str): 'channel': mean over channels of the variance over all other dims; 'layer': variance
            over all elements; 'image': mean over dim 0 of the variance over all other dims. Default: 'channel'.

    Returns:
        Tensor: 0-d, differentiable; float32 for float16/bfloat16 inputs, else the dtype of ``x``.
    """
    dims = variance_dims(x, reduction)
    x = _upcast(x)
    centred = x - x.mean(dim=dims, keepdim=True)  # about 5x faster than torch.var on CPU
    return centred.square().mean(dim=dims).mean()


def feature_variance_grad(x, reduction='channel'):
    """Closed-form ``d feature_variance(x, reduction) / dx``.

    For every reduction this is ``2 * (x - mean) / x.numel()``, where ``mean`` is taken over the reduced dims:
    e.g. for 'channel', ``2 * (x - mu_c) / (N_c * C)`` with ``N_c`` elements per channel and ``C`` channels.

    Args:
        x (Tensor): One feature.
        reduction (str): As in :func:`feature_variance`. Default: 'channel'.

    Returns:
        Tensor: Same shape and dtype as ``x``.
    """
    dims = variance_dims(x, reduction)
    xf = _upcast(x)
    return (xf - xf.mean(dim=dims, keepdim=True)).mul_(2.0 / x.numel()).to(x.dtype)


@LOSS_REGISTRY.register()
class FeatureVarianceLoss(nn.Module):
    """Variance regularisation of the inputs of the quantized layers (METHOD.md 4.1).

    ``loss = loss_weight * sum_i Lvar(X_i)`` with ``Lvar`` the population variance reduced per ``reduction``.

    Args:
        loss_weight (float): ``lambda_var``; must be >= 0. Default: 1.0.
        reduction (str): 'channel' (default), 'layer' or 'image'; see :func:`feature_variance`.
    """

    requires_targets = False

    def __init__(self, loss_weight=1.0, reduction='channel'):
        super().__init__()
        if reduction not in VARIANCE_REDUCTIONS:
            raise ValueError(f'reduction must be one of {VARIANCE_REDUCTIONS}, got {reduction!r}')
        self.loss_weight = _check_loss_weight(loss_weight)
        self.reduction = reduction

    def forward(self, features, targets=None):
        """Weighted sum of the feature variances.

        Args:
            features (list[Tensor] | Tensor): The quantized layers' inputs ``X_i``, any of the supported layouts.
            targets: Ignored (present so that both regularisation losses share one call signature).

        Returns:
            Tensor: 0-d loss; a float32 zero on the CPU for an empty list.
        """
        total = None
        for x in _as_feature_list(features):
            v = feature_variance(x, self.reduction)
            total = v if total is None else total + v
        if total is None:
            return torch.zeros(())
        return total * self.loss_weight

    def feature_grad(self, x, target=None):
        """Closed-form ``d(loss_weight * Lvar(x)) / dx`` for ONE feature: ``loss_weight * 2 (x - mean) / numel``.

        Args:
            x (Tensor): One feature.
            target: Ignored.

        Returns:
            Tensor: Same shape and dtype as ``x``; not part of any graph.
        """
        with torch.no_grad():
            return feature_variance_grad(x.detach(), self.reduction).mul_(self.loss_weight)

    def extra_repr(self):
        return f'loss_weight={self.loss_weight}, reduction={self.reduction!r}'


@LOSS_REGISTRY.register()
class MismatchLoss(nn.Module):
    """Mismatch regularisation of ODM version 2 (METHOD.md 6): ``loss_weight * sum_i ||X_i - T_i||_2``.

    ``T_i`` is the quantized feature ``q(X_i)``, held constant (detached here). The norm is the Frobenius norm of
    the whole tensor (not a mean), so its gradient ``(X - T) / ||X - T||`` has unit norm whatever the feature size.

    Args:
        loss_weight (float): Must be >= 0. Default: 1e-5 (the paper's EDSR value; 1e-6 for RDN).
    """

    requires_targets = True

    def __init__(self, loss_weight=1e-5):
        super().__init__()
        self.loss_weight = _check_loss_weight(loss_weight)

    @staticmethod
    def _check_pair(x, t):
        if t is None:
            raise ValueError('MismatchLoss needs a target (the quantized feature) for every feature')
        if x.shape != t.shape:
            raise ValueError(f'feature shape {tuple(x.shape)} and target shape {tuple(t.shape)} differ')

    def forward(self, features, targets):
        """Weighted sum of the distances between features and their quantized versions.

        Args:
            features (list[Tensor] | Tensor): The quantized layers' inputs ``X_i``.
            targets (list[Tensor] | Tensor): ``T_i = q(X_i)``, same shapes; detached here.

        Returns:
            Tensor: 0-d loss; float32 for float16/bfloat16 features; a float32 CPU zero for an empty list.
        """
        features = _as_feature_list(features)
        if targets is None:
            raise ValueError('MismatchLoss needs targets (the quantized features)')
        targets = _as_feature_list(targets, 'targets')
        if len(features) != len(targets):
            raise ValueError(f'got {len(features)} features but {len(targets)} targets')
        total = None
        for x, t in zip(features, targets):
            self._check_pair(x, t)
            d = torch.linalg.vector_norm(_upcast(x) - _upcast(t.detach()))
            total = d if total is None else total + d
        if total is None:
            return torch.zeros(())
        return total * self.loss_weight

    def feature_grad(self, x, target):
        """Closed-form ``d(loss_weight * ||x - target||_2) / dx = loss_weight * (x - t) / ||x - t||`` (0 if x == t).

        Args:
            x (Tensor): One feature.
            target (Tensor): Its quantized version, same shape.

        Returns:
            Tensor: Same shape and dtype as ``x``; not part of any graph.
        """
        self._check_pair(x, target)
        with torch.no_grad():
            diff = _upcast(x.detach()) - _upcast(target.detach())
            norm = torch.linalg.vector_norm(diff).clamp_min(torch.finfo(diff.dtype).tiny)  # diff == 0 -> grad 0
            return diff.div_(norm).mul_(self.loss_weight).to(x.dtype)

    def extra_repr(self):
        return f'loss_weight={self.loss_weight}'
