"""Gradient cooperation (METHOD.md 2 and 4.2): sign gate, param/cosine rules, the feature-mode autograd Function."""
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
from odm_helpers import run_on_gloo_ranks
from torch import nn

from odm_basicsr.losses.variance_loss import FeatureVarianceLoss, MismatchLoss
from odm_basicsr.odm import (
    COOPERATION_MODES,
    all_reduce_mean_,
    coop_agree,
    cooperative_feature,
    cosine_combine,
    gate_param_grads,
    sign_gate,
)
from odm_basicsr.quant import fake_quantize


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


def test_modes_are_checked_by_the_option_schema():
    """One mode validation: ``train.cooperation`` in the option schema, against COOPERATION_MODES."""
    from odm_basicsr.option_schema import ODM_TRAIN
    for mode in COOPERATION_MODES:
        train = {'cooperation': mode, 'reg_opt': {'type': 'FeatureVarianceLoss'}}
        assert ODM_TRAIN.validate(train)['cooperation'] == mode
    assert COOPERATION_MODES == ('feature', 'param', 'cosine', 'naive', 'off')
    with pytest.raises(ValueError, match="'feature', 'param', 'cosine', 'naive', 'off'.*'sign'"):
        ODM_TRAIN.validate({'cooperation': 'sign'})


def test_sign_gate_exact():
    g_r = _t([1, -1, 2, -2, 0])
    g_v = _t([0.5, 0.5, -0.5, -0.5, 0.3])
    combined, agree = sign_gate(g_r, g_v)
    assert torch.equal(combined, _t([1.5, -1, 2, -2.5, 0]))  # g_r == 0 never agrees with g_v != 0
    assert agree.dim() == 0 and agree.dtype == torch.float32
    assert agree.item() == pytest.approx(2 / 5)


def test_sign_gate_counts_only_nonzero_regulariser_gradient():
    g_r = _t([1, -1, 2, -2, 0, 3, -4])
    g_v = _t([0.5, 0.5, 0, 0, 0, -1, -1])
    combined, agree = sign_gate(g_r, g_v)
    assert torch.equal(combined, _t([1.5, -1, 2, -2, 0, 3, -5]))
    assert agree.item() == pytest.approx(2 / 4)  # 4 elements with g_v != 0, of which 2 agree
    combined, agree = sign_gate(g_r, torch.zeros_like(g_r))
    assert torch.equal(combined, g_r) and agree.item() == 0.0 and not torch.isnan(agree)


def test_sign_gate_random_against_numpy_and_dtype():
    g = torch.Generator().manual_seed(0)
    g_r = torch.randn(4, 8, 5, 5, generator=g)
    g_v = torch.randn(4, 8, 5, 5, generator=g, dtype=torch.float64)  # cast to g_r's dtype
    combined, agree = sign_gate(g_r, g_v)
    r, v = g_r.numpy(), g_v.float().numpy()
    mask = np.sign(r) == np.sign(v)
    assert combined.dtype == torch.float32 and combined.shape == g_r.shape
    np.testing.assert_array_equal(combined.numpy(), r + v * mask)
    assert agree.item() == pytest.approx(mask.mean(), abs=1e-7)
    with pytest.raises(ValueError, match='shape'):
        sign_gate(g_r, g_v[:1])


def test_gate_param_grads_with_none_entries():
    grads_r = [_t([1, -1, 2]), None, _t([[3, 4]]), None, _t([5.0])]
    grads_v = [_t([0.5, 0.5, 1]), _t([0.2, -0.2]), None, None, _t([-1.0])]
    combined, agree = gate_param_grads(grads_r, grads_v)
    assert torch.equal(combined[0], _t([1.5, -1, 3]))
    assert torch.equal(combined[1], _t([0, 0]))  # g_r None -> zeros: g_v never agrees with 0
    assert combined[2] is grads_r[2]  # g_v None -> g_r untouched
    assert combined[3] is None
    assert torch.equal(combined[4], _t([5.0]))
    # Element-weighted over all parameters: agreeing 2 (param 0) of 3 + 2 + 1 elements with g_v != 0.
    assert agree.item() == pytest.approx(2 / 6)
    # Not the mean of the per-parameter fractions (2/3, 0, 0 -> 2/9).
    assert agree.item() != pytest.approx(2 / 9)
    _, none_agree = gate_param_grads([_t([1.0])], [None])
    assert none_agree.item() == 0.0
    with pytest.raises(ValueError, match='1 reconstruction gradients but 2'):
        gate_param_grads([_t([1.0])], [_t([1.0]), _t([1.0])])


def test_cosine_combine_parallel_antiparallel_orthogonal():
    # One cosine over all parameters concatenated: g_r = (3, 4 | 0), norm 5.
    g_r = [_t([3.0, 4.0]), _t([0.0])]
    parallel = [_t([6.0, 8.0]), _t([0.0])]
    combined, w, cos = cosine_combine(g_r, parallel)
    assert cos.item() == 1.0 and w.item() == 1.0
    assert torch.equal(combined[0], _t([9.0, 12.0])) and torch.equal(combined[1], _t([0.0]))

    anti = [_t([-0.3, -0.4]), _t([0.0])]
    combined, w, cos = cosine_combine(g_r, anti)
    assert cos.item() == -1.0 and w.item() == 0.0
    assert torch.equal(combined[0], g_r[0]) and torch.equal(combined[1], g_r[1])

    # Orthogonal only as a whole: each parameter alone is not orthogonal (dot -12 and +12).
    ortho = [_t([4.0, -6.0]), _t([12.0])]
    g_r2 = [_t([3.0, 4.0]), _t([1.0])]
    combined, w, cos = cosine_combine(g_r2, ortho)
    assert cos.item() == 0.0 and w.item() == 0.5
    assert torch.equal(combined[0], _t([5.0, 1.0])) and torch.equal(combined[1], _t([7.0]))


def test_cosine_combine_partial_and_zero_and_none():
    g_r = [_t([1.0, 0.0]), _t([2.0])]
    g_v = [_t([1.0, 1.0]), _t([0.0])]
    combined, w, cos = cosine_combine(g_r, g_v)
    expected_cos = 1.0 / (np.sqrt(5.0) * np.sqrt(2.0))
    assert cos.item() == pytest.approx(expected_cos, rel=1e-14)
    assert w.item() == pytest.approx((expected_cos + 1) / 2, rel=1e-14)
    torch.testing.assert_close(combined[0], _t([1.0, 0.0]) + w * _t([1.0, 1.0]), rtol=0, atol=0)
    # Zero vectors: cos 0, w 0.5, nan-free.
    combined, w, cos = cosine_combine([_t([0.0, 0.0])], [_t([1.0, 2.0])])
    assert cos.item() == 0.0 and w.item() == 0.5 and torch.equal(combined[0], _t([0.5, 1.0]))
    combined, w, cos = cosine_combine([_t([1.0, 2.0])], [torch.zeros(2, dtype=torch.float64)])
    assert cos.item() == 0.0 and torch.equal(combined[0], _t([1.0, 2.0]))
    # None entries count as zeros.
    combined, w, cos = cosine_combine([_t([3.0]), None, None], [_t([1.0]), _t([2.0]), None])
    assert cos.item() == pytest.approx(1 / np.sqrt(5.0), rel=1e-14)
    assert torch.equal(combined[0], _t([3.0]) + w * _t([1.0]))
    assert torch.equal(combined[1], w * _t([2.0])) and combined[2] is None
    with pytest.raises(ValueError, match='shape'):
        cosine_combine([_t([1.0, 2.0])], [_t([1.0])])


def test_cooperative_feature_gates_incoming_gradient():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    var_loss = FeatureVarianceLoss(loss_weight=0.5)
    record = []
    h = cooperative_feature(x, var_loss.feature_grad, record)
    assert torch.equal(h, x) and h.requires_grad
    (h**3 * w).sum().backward()  # f(h) = sum(w h^3): g_r = 3 w h^2
    xn = x.detach().numpy()
    g_r = 3 * w.numpy() * xn**2
    g_v = 0.5 * 2 * (xn - xn.mean(axis=(0, 2, 3), keepdims=True)) / xn.size
    agree = np.sign(g_r) == np.sign(g_v)
    np.testing.assert_allclose(x.grad.numpy(), g_r + g_v * agree, rtol=1e-13, atol=1e-16)
    assert 0 < agree.mean() < 1  # both branches exercised
    assert len(record) == 1 and record[0].shape == (4,) and not record[0].requires_grad
    coop, agree_frac = coop_agree(record[0])
    assert float(agree_frac) == pytest.approx(agree.mean(), abs=1e-7)
    assert float(coop) == pytest.approx(np.abs(g_v * agree).sum() / np.abs(g_v).sum(), rel=1e-6)


def test_cooperative_feature_in_a_conv_network_matches_manual_gating():
    torch.manual_seed(2)
    conv1, conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 3, 3, padding=1)
    lq, gt = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    var_loss = FeatureVarianceLoss(loss_weight=1e-2, reduction='image')

    # Gated run through cooperative_feature.
    record = []
    x1 = torch.relu(conv1(lq))
    out = conv2(cooperative_feature(x1, var_loss.feature_grad, record))
    nn.functional.l1_loss(out, gt).backward()
    gated = [p.grad.clone() for p in conv1.parameters()]
    second = [p.grad.clone() for p in conv2.parameters()]

    # Manual: reconstruction gradient at x1, gate it by hand, push it further back.
    for p in list(conv1.parameters()) + list(conv2.parameters()):
        p.grad = None
    x1 = torch.relu(conv1(lq))
    x1_leaf = x1.detach().requires_grad_(True)
    nn.functional.l1_loss(conv2(x1_leaf), gt).backward()
    g_r, g_v = x1_leaf.grad, var_loss.feature_grad(x1)
    mask = torch.sign(g_r) == torch.sign(g_v)
    x1.backward(g_r + g_v * mask)
    for a, b in zip(gated, conv1.parameters()):
        torch.testing.assert_close(a, b.grad, rtol=1e-6, atol=1e-9)
    for a, b in zip(second, conv2.parameters()):  # layers after the marked input are untouched
        torch.testing.assert_close(a, b.grad, rtol=1e-6, atol=1e-9)
    nz = g_v != 0
    assert float(coop_agree(record[0])[1]) == pytest.approx((mask & nz).sum().item() / nz.sum().item(), abs=1e-6)


def test_naive_sum_differs_from_gated_exactly_where_signs_disagree():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64)
    target = torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64)
    var_loss = FeatureVarianceLoss(loss_weight=0.1, reduction='channel')

    def recon(h):
        return ((h - target) ** 2).mean()

    # Naive: the gradient of L_R + L_V, by plain autograd.
    x = x0.clone().requires_grad_(True)
    (recon(x) + var_loss([x])).backward()
    naive = x.grad.clone()
    # Naive through the Function (gate=False) is the same.
    x = x0.clone().requires_grad_(True)
    rec = []
    recon(cooperative_feature(x, var_loss.feature_grad, rec, gate=False)).backward()
    torch.testing.assert_close(x.grad, naive, rtol=1e-12, atol=1e-16)
    assert len(rec) == 1
    # Gated.
    x = x0.clone().requires_grad_(True)
    recon(cooperative_feature(x, var_loss.feature_grad)).backward()
    gated = x.grad
    g_r = 2 * (x0 - target) / x0.numel()
    g_v = var_loss.feature_grad(x0)
    disagree = torch.sign(g_r) != torch.sign(g_v)
    assert disagree.any() and (~disagree).any()
    torch.testing.assert_close(gated[~disagree], naive[~disagree], rtol=1e-12, atol=1e-16)
    torch.testing.assert_close(gated[disagree], g_r[disagree], rtol=1e-12, atol=1e-16)
    assert (gated[disagree] != naive[disagree]).all()


def test_cooperative_feature_with_mismatch_closure_and_dtypes():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 16, 8, generator=g, requires_grad=True)  # (B, N, C) tokens, float32
    mm = MismatchLoss(loss_weight=1e-2)
    t = fake_quantize(x.detach(), torch.tensor(-1.0), torch.tensor(1.0), 2)
    h = cooperative_feature(x, lambda f: mm.feature_grad(f, t))
    (h * 2.0).sum().backward()
    g_v = mm.feature_grad(x, t)
    expected = 2.0 + g_v * (g_v > 0)
    torch.testing.assert_close(x.grad, expected)
    # float16 in, float16 gradient out.
    xh = torch.randn(2, 3, 4, 4, generator=g).half().requires_grad_(True)
    cooperative_feature(xh, FeatureVarianceLoss(1.0).feature_grad).float().sum().backward()
    assert xh.grad.dtype == torch.float16 and torch.isfinite(xh.grad).all()
    # No grad needed: plain identity, nothing recorded.
    rec = []
    out = cooperative_feature(torch.ones(3), FeatureVarianceLoss(1.0).feature_grad, rec)
    assert not out.requires_grad and torch.equal(out, torch.ones(3)) and rec == []


def test_all_reduce_mean_is_noop_without_process_group():
    assert not dist.is_initialized()
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([[3.0]], dtype=torch.float64)
    out = all_reduce_mean_([a, None, b])
    assert out[0] is a and torch.equal(a, torch.tensor([1.0, 2.0])) and torch.equal(b, torch.tensor([[3.0]]))


def _gate_on_rank(rank):
    grads_r = [torch.tensor([1.0, -1.0]) * (rank + 1), torch.full((2, 2), float(rank), dtype=torch.float64)]
    grads_v = [torch.tensor([[1.0, 3.0], [3.0, -1.0]][rank]), None]  # alone, rank 1 would gate [5, -3]
    all_reduce_mean_(grads_r + grads_v)
    combined, agree = gate_param_grads(grads_r, grads_v)
    return {'r': grads_r, 'v': grads_v, 'c': combined, 'agree': agree}


@pytest.mark.slow
def test_all_reduce_mean_two_ranks(tmp_path):
    results = run_on_gloo_ranks(_gate_on_rank, tmp_path)
    assert len(results) == 2
    for res in results:  # every rank averaged the same way and took the same decision
        assert torch.equal(res['r'][0], torch.tensor([1.5, -1.5]))
        assert torch.equal(res['r'][1], torch.full((2, 2), 0.5, dtype=torch.float64))
        assert torch.equal(res['v'][0], torch.tensor([2.0, 1.0]))
        assert res['v'][1] is None
        assert torch.equal(res['c'][0], torch.tensor([3.5, -1.5]))
        assert torch.equal(res['c'][1], res['r'][1])
        assert res['agree'].item() == 0.5
    assert os.path.exists(f'{tmp_path / "res"}.1')
