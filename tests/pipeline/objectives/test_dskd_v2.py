"""DSKDv2: ideal init, same-vocabulary and ETA losses against a straightforward re-implementation, gradient routing."""

import pytest
import torch
import torch.nn.functional as F

from dskd_pipe.pipeline.alignment import EtaPairs
from dskd_pipe.pipeline.objectives.dskd import TeacherHead
from dskd_pipe.pipeline.objectives.dskd_v2 import (
    dskd_v2_eta_loss,
    dskd_v2_same_vocab_loss,
    head_columns,
    ideal_projector_init,
    s2t_matrix,
)


def _kl(p_logits, q_logits, tau, kind):
    """Reference D(student q, teacher p) per row."""
    lp, lq = F.log_softmax(p_logits / tau, -1), F.log_softmax(q_logits / tau, -1)
    if kind == "fkl":
        return (lp.exp() * (lp - lq)).sum(-1)
    return (lq.exp() * (lq - lp)).sum(-1)  # rkl


def test_ideal_init_logit_equivalence():
    torch.manual_seed(0)
    dt, ds, vt, vs, k = 6, 8, 11, 13, 5  # K <= ds and K <= dt: both pseudo-inverses are exact left inverses
    wt, ws = torch.randn(vt, dt), torch.randn(vs, ds)
    t_ids, s_ids = torch.tensor([0, 2, 3, 7, 10]), torch.tensor([1, 4, 5, 9, 12])
    proj = ideal_projector_init(wt, ws, t_ids, s_ids)
    assert proj.t2s.bias is None and proj.t2s.weight.shape == (ds, dt)
    ht, hs = torch.randn(4, dt), torch.randn(4, ds)
    wt_k, ws_k = head_columns(wt, t_ids), head_columns(ws, s_ids)  # [dt, K], [ds, K]
    torch.testing.assert_close(proj.t2s(ht) @ ws_k, ht @ wt_k, atol=1e-4, rtol=1e-4)
    s2t = proj.s2t(ws)
    torch.testing.assert_close(s2t, s2t_matrix(ws_k, torch.linalg.pinv(wt_k)))
    torch.testing.assert_close(hs @ s2t @ wt_k, hs @ ws_k, atol=1e-4, rtol=1e-4)
    # s2t follows the current student head and never carries gradient into it
    ws_train = ws.clone().requires_grad_(True)
    assert not proj.s2t(ws_train).requires_grad
    assert set(proj.state_dict()) == {"t2s.weight", "student_ids", "teacher_pinv"}


def _setup(same_vocab, seed=0):
    torch.manual_seed(seed)
    b, s, t, ds, dt, vs, vt = 2, 6, 7, 8, 6, 10, 12
    hs = torch.randn(b, s, ds, requires_grad=True)
    ws = torch.randn(vs if not same_vocab else vt, ds, requires_grad=True)
    wt = torch.randn(vt, dt, requires_grad=True)
    zs = hs @ ws.detach().T * 1.0  # student logits built from Hs so KD_t2s reaches Hs too
    ht = torch.randn(b, s if same_vocab else t, dt, requires_grad=True)
    labels = torch.randint(0, zs.shape[-1], (b, s))
    labels[0, :2] = -100
    labels[1, :3] = -100
    ids = torch.arange(min(8, zs.shape[-1]))
    proj = ideal_projector_init(wt, ws, ids, ids)
    with torch.no_grad():  # move t2s off the ideal point so some positions agree and some do not
        proj.t2s.weight.add_(0.5 * torch.randn_like(proj.t2s.weight))
    return hs, ws, wt, zs, ht, labels, proj


def _reference_terms(zs_rows, hs_rows, ht_rows, target, t_arg, ws, wt, proj, div, tau):
    zt2s = proj.t2s(ht_rows) @ ws.detach().T
    ce = F.cross_entropy(zt2s, target, reduction="mean")
    agree = zt2s.argmax(-1) == target
    kd_t2s = _kl(zt2s.detach()[agree], zs_rows[agree], tau, div).sum() / max(int(agree.sum()), 1)
    s2t = head_columns(ws, proj.student_ids) @ proj.teacher_pinv
    zs2t = hs_rows @ s2t @ wt.detach().T
    kd_s2t = _kl(ht_rows @ wt.detach().T, zs2t, tau, div).mean()
    return ce, kd_t2s, kd_s2t, agree


@pytest.mark.parametrize("div", ["fkl", "rkl"])
def test_same_vocab_matches_reference(div):
    hs, ws, wt, zs, ht, labels, proj = _setup(same_vocab=True)
    out = dskd_v2_same_vocab_loss(hs, zs, labels, ws, ht, TeacherHead(wt), proj, divergence=div, kd_rate=0.3,
                                  tau=2.0, chunk_tokens=3)
    ms = labels != -100
    n = int(ms.sum())
    t_arg = (ht[ms] @ wt.T).argmax(-1)
    ce, kd_t2s, kd_s2t, agree = _reference_terms(zs[ms], hs[ms], ht[ms], t_arg, t_arg, ws, wt, proj, div, 2.0)
    assert 0 < int(agree.sum()) < n  # the test covers both agreeing and disagreeing positions
    ce_s = F.cross_entropy(zs[ms], labels[ms], reduction="sum")
    torch.testing.assert_close(out.ce_student, ce_s)
    torch.testing.assert_close(out.ce_t2s, ce * n)
    torch.testing.assert_close(out.kd_t2s, kd_t2s * n)
    torch.testing.assert_close(out.kd_s2t, kd_s2t * n, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, 0.7 * ce_s + 0.3 * n * (ce + kd_t2s + kd_s2t), atol=1e-4, rtol=1e-5)
    assert int(out.t2s_correct) == int(agree.sum()) == int(out.t2s_kd_tokens) and int(out.n_student) == n


def _eta_inputs():
    hs, ws, wt, zs, ht, labels, proj = _setup(same_vocab=False)
    pairs = EtaPairs(torch.tensor([[2, 3, 5, 6, -1], [3, 4, 5, 1, 6]]), torch.tensor([[2, 3, 4, 5, -1], [3, 4, 5, 2, 5]]))
    vt, vs = wt.shape[0], ws.shape[0]
    token_map = torch.arange(vt) % vs
    return hs, ws, wt, zs, ht, labels, proj, pairs, token_map


@pytest.mark.parametrize("div", ["fkl", "rkl"])
def test_eta_matches_reference(div):
    hs, ws, wt, zs, ht, labels, proj, pairs, token_map = _eta_inputs()
    b, ti, sj = pairs.flat()
    t_arg_all = (ht[b, ti] @ wt.T).argmax(-1)
    token_map[t_arg_all[0]] = -1  # the first pair's teacher argmax has no student string: dropped everywhere
    out = dskd_v2_eta_loss(hs, zs, labels, ws, ht, TeacherHead(wt), proj, pairs, token_map, divergence=div,
                           kd_rate=0.5, tau=2.0, chunk_tokens=2)
    keep = token_map[t_arg_all] >= 0
    b, ti, sj, t_arg = b[keep], ti[keep], sj[keep], t_arg_all[keep]
    ce, kd_t2s, kd_s2t, agree = _reference_terms(zs[b, sj], hs[b, sj], ht[b, ti], token_map[t_arg], t_arg, ws, wt,
                                                 proj, div, 2.0)
    n = int((labels != -100).sum())
    ce_s = F.cross_entropy(zs[labels != -100], labels[labels != -100], reduction="sum")
    torch.testing.assert_close(out.ce_student, ce_s)
    torch.testing.assert_close(out.ce_t2s, ce * n)
    torch.testing.assert_close(out.kd_t2s, kd_t2s * n)
    torch.testing.assert_close(out.kd_s2t, kd_s2t * n, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, 0.5 * ce_s + 0.5 * n * (ce + kd_t2s + kd_s2t), atol=1e-4, rtol=1e-5)
    assert int(out.n_teacher) == int(keep.sum()) < pairs.mask.sum()
    assert int(out.t2s_correct) == int(agree.sum()) > 0


def test_eta_no_pairs_is_ce_only():
    hs, ws, wt, zs, ht, labels, proj, _, token_map = _eta_inputs()
    empty = EtaPairs(torch.full((2, 0), -1), torch.full((2, 0), -1))
    out = dskd_v2_eta_loss(hs, zs, labels, ws, ht, TeacherHead(wt), proj, empty, token_map, kd_rate=0.5)
    assert [float(v.detach()) for v in (out.ce_t2s, out.kd_t2s, out.kd_s2t)] == [0.0, 0.0, 0.0]
    torch.testing.assert_close(out.loss, 0.5 * out.ce_student)
    out.loss.backward()  # the empty terms keep a usable graph


def _grads(loss, tensors):
    gs = torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=True)
    return [g is not None and bool(g.abs().sum() > 0) for g in gs]


@pytest.mark.parametrize("which", ["same", "eta"])
def test_gradient_routing(which):
    if which == "same":
        hs, ws, wt, zs, ht, labels, proj = _setup(same_vocab=True)
        out = dskd_v2_same_vocab_loss(hs, zs, labels, ws, ht, TeacherHead(wt), proj)
    else:
        hs, ws, wt, zs, ht, labels, proj, pairs, token_map = _eta_inputs()
        out = dskd_v2_eta_loss(hs, zs, labels, ws, ht, TeacherHead(wt), proj, pairs, token_map)
    t2s = proj.t2s.weight
    assert int(out.t2s_kd_tokens) > 0
    # [Hs, student head, teacher hidden, teacher head, t2s]; zs is built from Hs, so Zs-terms reach Hs
    assert _grads(out.ce_t2s, [hs, ws, ht, wt, t2s]) == [False, False, False, False, True]
    assert _grads(out.kd_t2s, [hs, ws, ht, wt, t2s]) == [True, False, False, False, False]
    assert _grads(out.kd_s2t, [hs, ws, ht, wt, t2s]) == [True, False, False, False, False]
    assert _grads(out.ce_student, [hs, ws, ht, wt, t2s]) == [True, False, False, False, False]


# ----------------------------------------------------------------------------------------------------------
# Fidelity options (items 7-8): the weight of the per-micro-batch means and the released agreement test
# ----------------------------------------------------------------------------------------------------------


def test_mean_weight_scales_the_means_only():
    """Item 7: the means are returned times w (default n_s; the release's per-micro-batch denominator with
    --v2-mean-weighting micro-batch). Same vocabulary: only KD_t2s is a mean over its own positions."""
    hs, ws, wt, zs, ht, labels, proj = _setup(same_vocab=True)
    base = dskd_v2_same_vocab_loss(hs, zs, labels, ws, ht, TeacherHead(wt), proj, chunk_tokens=3)
    n = int((labels != -100).sum())
    heavy = dskd_v2_same_vocab_loss(hs, zs, labels, ws, ht, TeacherHead(wt), proj, chunk_tokens=3, mean_weight=20.0)
    torch.testing.assert_close(heavy.kd_t2s, base.kd_t2s / n * 20.0)
    torch.testing.assert_close(heavy.ce_t2s, base.ce_t2s)
    torch.testing.assert_close(heavy.kd_s2t, base.kd_s2t)
    hs, ws, wt, zs, ht, labels, proj, pairs, token_map = _eta_inputs()
    args = (hs, zs, labels, ws, ht, TeacherHead(wt), proj, pairs, token_map)
    base, heavy = dskd_v2_eta_loss(*args), dskd_v2_eta_loss(*args, mean_weight=20.0)
    n = int((labels != -100).sum())
    for name in ("ce_t2s", "kd_t2s", "kd_s2t"):
        torch.testing.assert_close(getattr(heavy, name), getattr(base, name) / n * 20.0, msg=name)


def test_agreement_threshold_reproduces_the_released_test():
    """Item 8: by default the agreement mask always applies; with agreement_threshold (the release's
    --t2s-agreement 1.0) it is dropped when |agree| / w > threshold, and KD_t2s = sum over ms / w (times w)."""
    hs, ws, wt, zs, ht, labels, proj = _setup(same_vocab=True)
    ms = labels != -100
    head = TeacherHead(wt)
    t_arg = (ht[ms] @ wt.T).argmax(-1)
    zt2s = (proj.t2s(ht[ms]) @ ws.T).detach()
    agree = int((zt2s.argmax(-1) == t_arg).sum())
    all_rows = _kl(zt2s, zs[ms], 2.0, "fkl").sum()
    masked = dskd_v2_same_vocab_loss(hs, zs, labels, ws, ht, head, proj, mean_weight=agree - 1.0)
    released = dskd_v2_same_vocab_loss(hs, zs, labels, ws, ht, head, proj, mean_weight=agree - 1.0,
                                       agreement_threshold=1.0)  # |agree| / w > 1: the release drops the mask
    torch.testing.assert_close(released.kd_t2s, all_rows)
    assert not torch.allclose(masked.kd_t2s, released.kd_t2s)
    kept = dskd_v2_same_vocab_loss(hs, zs, labels, ws, ht, head, proj, mean_weight=float(agree),
                                   agreement_threshold=1.0)  # ratio exactly 1: the mask stays
    torch.testing.assert_close(kept.kd_t2s, masked.kd_t2s / (agree - 1.0) * agree)


def test_v2_s2t_keeps_head_bias_and_t2s_ignores_teacher_temperature():
    """The release's teacher_model.lm_head(s2t_hiddens) has the bias; its t2s target is not divided by T_t."""
    hs, ws, wt, zs, ht, labels, proj = _setup(same_vocab=True)
    ms = labels != -100
    bias = torch.randn(wt.shape[0])
    head = TeacherHead(wt, bias)
    out = dskd_v2_same_vocab_loss(hs, zs, labels, ws, ht, head, proj, divergence="rkl", teacher_temperature=3.0)
    s2t = head_columns(ws, proj.student_ids) @ proj.teacher_pinv
    zs2t = hs[ms] @ s2t @ wt.detach().T + bias
    zt = ht[ms] @ wt.detach().T + bias
    torch.testing.assert_close(out.kd_s2t, _kl(zt, zs2t, 2.0, "rkl").sum(), atol=1e-5, rtol=1e-5)
    fkl = dskd_v2_same_vocab_loss(hs, zs, labels, ws, ht, head, proj, divergence="fkl")
    torch.testing.assert_close(fkl.kd_s2t, _kl(zt, zs2t, 2.0, "fkl").sum(), atol=1e-5, rtol=1e-5)
    plain = dskd_v2_same_vocab_loss(hs, zs, labels, ws, ht, head, proj, teacher_temperature=3.0)
    at_one = dskd_v2_same_vocab_loss(hs, zs, labels, ws, ht, head, proj)
    scaled = dskd_v2_same_vocab_loss(hs, zs, labels, ws, ht, head, proj, teacher_temperature=3.0,
                                     t2s_teacher_temperature=True)
    torch.testing.assert_close(plain.kd_t2s, at_one.kd_t2s)
    assert not torch.allclose(plain.kd_t2s, scaled.kd_t2s)
