"""Regularisation losses: variance (METHOD.md 4.1) and mismatch (METHOD.md 6) values and closed-form gradients."""
import numpy as np
import pytest
import torch
from basicsr.losses import build_loss
from basicsr.utils.registry import LOSS_REGISTRY

from odm_basicsr.losses.variance_loss import (
    VARIANCE_REDUCTIONS,
    FeatureVarianceLoss,
    MismatchLoss,
    feature_variance,
)
from odm_basicsr.quant import fake_quantize


def _feature(shape, seed=0):
    """Float64 feature whose channels (last dim unless 4-D) have very different means and scales."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    c = shape[1] if len(shape) == 4 else shape[-1]
    view = (1, c, 1, 1) if len(shape) == 4 else (1,) * (len(shape) - 1) + (c,)
    scale = torch.linspace(0.2, 3.0, c, dtype=torch.float64).view(view)
    shift = torch.linspace(-2.0, 5.0, c, dtype=torch.float64).view(view)
    return x * scale + shift


def _numpy_variance(a, reduction):
    """Reference with numpy (np.var divides by N by default)."""
    a = np.asarray(a)
    if reduction == 'layer':
        return np.var(a)
    if reduction == 'image':
        return np.var(a.reshape(a.shape[0], -1), axis=1).mean()
    ch = 1 if a.ndim == 4 else a.ndim - 1
    return np.var(np.moveaxis(a, ch, 0).reshape(a.shape[ch], -1), axis=1).mean()


def _direct_variance(x, reduction):
    """Reference straight from the definitions, one channel/image at a time."""
    def pop_var(v):
        v = v.reshape(-1)
        return ((v - v.sum() / v.numel()) ** 2).sum() / v.numel()

    if reduction == 'layer':
        return pop_var(x)
    if reduction == 'image':
        return sum(pop_var(x[b]) for b in range(x.shape[0])) / x.shape[0]
    ch = 1 if x.dim() == 4 else x.dim() - 1
    return sum(pop_var(x.select(ch, c)) for c in range(x.shape[ch])) / x.shape[ch]


SHAPES = [(2, 5, 6, 7), (3, 10, 6), (12, 4)]


@pytest.mark.parametrize('reduction', VARIANCE_REDUCTIONS)
@pytest.mark.parametrize('shape', SHAPES)
def test_variance_value_matches_formula_and_numpy(reduction, shape):
    x = _feature(shape)
    value = feature_variance(x, reduction)
    assert value.dim() == 0 and value.dtype == torch.float64
    assert value.item() == pytest.approx(_direct_variance(x, reduction).item(), rel=1e-12)
    assert value.item() == pytest.approx(_numpy_variance(x.numpy(), reduction), rel=1e-12)


@pytest.mark.parametrize('reduction', VARIANCE_REDUCTIONS)
def test_variance_loss_sums_layers_and_weights(reduction):
    feats = [_feature((2, 4, 5, 5), seed=1), _feature((2, 16, 8), seed=2), _feature((2, 3, 4, 4), seed=3)]
    loss = FeatureVarianceLoss(loss_weight=0.25, reduction=reduction)
    expected = 0.25 * sum(_numpy_variance(f.numpy(), reduction) for f in feats)
    assert loss(feats).item() == pytest.approx(expected, rel=1e-12)
    assert loss(feats[0]).item() == pytest.approx(0.25 * _numpy_variance(feats[0].numpy(), reduction), rel=1e-12)


def test_reductions_really_differ():
    # Channels with different means: the layer variance sees the spread of the means, the channel variance not.
    x = _feature((2, 5, 6, 7))
    ch, layer, image = (feature_variance(x, r).item() for r in ('channel', 'layer', 'image'))
    assert layer > ch and len({round(ch, 6), round(layer, 6), round(image, 6)}) == 3
    # Constant channels: zero channel variance, positive layer and image variance.
    const = torch.arange(3, dtype=torch.float64).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    assert feature_variance(const, 'channel').item() == 0.0
    assert feature_variance(const, 'layer').item() == pytest.approx(2 / 3)
    assert feature_variance(const, 'image').item() == pytest.approx(2 / 3)


@pytest.mark.parametrize('reduction', VARIANCE_REDUCTIONS)
@pytest.mark.parametrize('shape', SHAPES)
def test_variance_feature_grad_equals_autograd(reduction, shape):
    loss = FeatureVarianceLoss(loss_weight=0.37, reduction=reduction)
    x = _feature(shape, seed=4).requires_grad_(True)
    (auto,) = torch.autograd.grad(loss([x]), x)
    closed = loss.feature_grad(x)
    assert closed.shape == x.shape and closed.dtype == x.dtype and not closed.requires_grad
    torch.testing.assert_close(closed, auto, rtol=1e-10, atol=1e-15)


def test_variance_feature_grad_channel_formula():
    x = _feature((2, 5, 6, 7), seed=5)
    loss = FeatureVarianceLoss(loss_weight=3.0, reduction='channel')
    n_c, c = 2 * 6 * 7, 5
    mu_c = x.mean(dim=(0, 2, 3), keepdim=True)
    torch.testing.assert_close(loss.feature_grad(x), 3.0 * 2 * (x - mu_c) / (n_c * c), rtol=1e-12, atol=0)
    # 3-D tokens: channel is the last dim.
    t = _feature((3, 10, 6), seed=6)
    mu_t = t.mean(dim=(0, 1), keepdim=True)
    torch.testing.assert_close(loss.feature_grad(t), 3.0 * 2 * (t - mu_t) / t.numel(), rtol=1e-12, atol=0)


def test_variance_loss_gradient_lowers_variance():
    x = _feature((2, 4, 6, 6), seed=7)
    loss = FeatureVarianceLoss(loss_weight=1.0)
    before = loss([x]).item()
    after = loss([x - 10.0 * loss.feature_grad(x)]).item()
    assert after < before


def test_variance_low_precision_and_dtypes():
    x = (_feature((2, 4, 8, 8), seed=8) * 100).to(torch.float16)  # squares overflow float16
    loss = FeatureVarianceLoss(loss_weight=1.0, reduction='layer')
    value = loss([x])
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == pytest.approx(_numpy_variance(x.float().numpy(), 'layer'), rel=1e-5)
    g = loss.feature_grad(x)
    assert g.dtype == torch.float16 and torch.isfinite(g).all()


def test_variance_loss_errors_and_empty():
    with pytest.raises(ValueError, match="'pixel'"):
        FeatureVarianceLoss(reduction='pixel')
    with pytest.raises(ValueError, match='-0.5'):
        FeatureVarianceLoss(loss_weight=-0.5)
    with pytest.raises(ValueError, match='!!float'):
        FeatureVarianceLoss(loss_weight='1e-4')
    with pytest.raises(ValueError, match='channel reduction'):
        FeatureVarianceLoss()([torch.zeros(1, 2, 3, 4, 5)])
    with pytest.raises(ValueError, match='empty'):
        FeatureVarianceLoss()([torch.zeros(0, 3)])
    with pytest.raises(TypeError):
        FeatureVarianceLoss()(3.0)
    zero = FeatureVarianceLoss()([])
    assert zero.dim() == 0 and zero.item() == 0.0
    assert FeatureVarianceLoss(loss_weight=0.0)([_feature((2, 3, 4, 4))]).item() == 0.0
    assert 'reduction' in repr(FeatureVarianceLoss())


def test_mismatch_loss_value_and_detached_target():
    feats = [_feature((2, 4, 5, 5), seed=9), _feature((2, 7, 6), seed=10)]
    targets = [fake_quantize(f, torch.tensor(-1.0), torch.tensor(2.0), 2) for f in feats]
    loss = MismatchLoss(loss_weight=1e-3)
    expected = 1e-3 * sum(np.linalg.norm((f - t).numpy().ravel()) for f, t in zip(feats, targets))
    assert loss(feats, targets).item() == pytest.approx(expected, rel=1e-12)
    # The target is a constant: no gradient reaches it.
    x = feats[0].clone().requires_grad_(True)
    t = targets[0].clone().requires_grad_(True)
    loss([x], [t]).backward()
    assert t.grad is None and x.grad is not None


def test_mismatch_feature_grad_equals_autograd():
    loss = MismatchLoss(loss_weight=0.3)
    for shape in SHAPES:
        x = _feature(shape, seed=11).requires_grad_(True)
        t = fake_quantize(x.detach(), torch.tensor(-1.0), torch.tensor(1.0), 3)
        (auto,) = torch.autograd.grad(loss([x], [t]), x)
        closed = loss.feature_grad(x, t)
        torch.testing.assert_close(closed, auto, rtol=1e-10, atol=1e-15)
        diff = (x - t).detach()
        torch.testing.assert_close(closed, 0.3 * diff / diff.norm(), rtol=1e-12, atol=0)
        assert closed.norm().item() == pytest.approx(0.3)  # a unit direction times the weight


def test_mismatch_zero_distance_and_errors():
    x = _feature((2, 3, 4, 4))
    loss = MismatchLoss()
    assert loss.loss_weight == 1e-5
    assert loss([x], [x.clone()]).item() == 0.0
    g = loss.feature_grad(x, x.clone())
    assert torch.equal(g, torch.zeros_like(x))
    xr = x.clone().requires_grad_(True)
    loss([xr], [x]).backward()
    assert torch.equal(xr.grad, torch.zeros_like(x))  # autograd agrees: 0, not nan
    with pytest.raises(ValueError, match='targets'):
        loss([x], None)
    with pytest.raises(ValueError, match='2 targets'):
        loss([x], [x, x])
    with pytest.raises(ValueError, match='shape'):
        loss([x], [x[:1]])
    with pytest.raises(ValueError, match='target'):
        loss.feature_grad(x, None)
    with pytest.raises(ValueError, match='-1'):
        MismatchLoss(loss_weight=-1)
    assert loss([], []).item() == 0.0


def test_registry_and_build_loss():
    assert LOSS_REGISTRY.get('FeatureVarianceLoss') is FeatureVarianceLoss
    assert LOSS_REGISTRY.get('MismatchLoss') is MismatchLoss
    loss = build_loss({'type': 'FeatureVarianceLoss', 'loss_weight': 1e-4, 'reduction': 'image'})
    assert isinstance(loss, FeatureVarianceLoss) and loss.loss_weight == 1e-4 and loss.reduction == 'image'
    x = _feature((2, 3, 4, 4))
    assert loss([x]).item() == pytest.approx(1e-4 * _numpy_variance(x.numpy(), 'image'), rel=1e-12)
    mm = build_loss({'type': 'MismatchLoss', 'loss_weight': 1e-6})
    assert isinstance(mm, MismatchLoss) and mm.loss_weight == 1e-6
    assert not FeatureVarianceLoss.requires_targets and MismatchLoss.requires_targets
