"""DWA-KD: Soft-DTW against a per-cell reference, band and weights by hand, response-only DTW, gradient routing."""

import math

import pytest
import torch
import torch.nn.functional as F

from dskd_pipe.pipeline.objectives.divergences import skewed_reverse_kl
from dskd_pipe.pipeline.objectives.dskd import TeacherHead, chunked_fkl_over_head, dskd_cma_loss, teacher_logits
from dskd_pipe.pipeline.objectives.dwa import (
    attention_band,
    build_dwa_projectors,
    chunked_fkl_rows_over_head,
    cosine_cost,
    divergence_rows,
    dtw_gamma,
    dwa_kd_loss,
    gather_rows,
    kd_warmup,
    normalized_soft_dtw,
    rescale_per_sequence,
    response_order,
    soft_dtw,
    student_entropy_weights,
    _entropy,
    teacher_confidence_weights,
)

# ----------------------------------------------------------------------------------------------------------
# Soft-DTW
# ----------------------------------------------------------------------------------------------------------


def _ref_soft_dtw(cost, gamma):
    """Per-cell recursion on one [n, m] cost matrix (float64), straight from Cuturi & Blondel (2017)."""
    n, m = cost.shape
    inf = torch.tensor(float("inf"), dtype=cost.dtype)
    r = [[inf] * (m + 1) for _ in range(n + 1)]
    r[0][0] = torch.zeros((), dtype=cost.dtype)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            prev = torch.stack([r[i - 1][j - 1], r[i - 1][j], r[i][j - 1]])
            r[i][j] = cost[i - 1, j - 1] - gamma * torch.logsumexp(-prev / gamma, 0)
    return r[n][m]


@pytest.mark.parametrize("gamma", [0.1, 0.8, 2.0])
@pytest.mark.parametrize("shape,lx,ly", [
    ((1, 4, 4), [4], [4]),
    ((3, 5, 4), [5, 2, 3], [4, 4, 1]),
    ((4, 3, 6), [3, 1, 2, 3], [6, 2, 5, 1]),
])
def test_soft_dtw_matches_per_cell_reference_value_and_gradient(gamma, shape, lx, ly):
    torch.manual_seed(0)
    cost = torch.rand(*shape, dtype=torch.float64) * 2
    cost.requires_grad_(True)
    got = soft_dtw(cost, gamma, torch.tensor(lx), torch.tensor(ly))
    weights = torch.arange(1, shape[0] + 1, dtype=torch.float32)  # distinct upstream grads per sequence
    (g_got,) = torch.autograd.grad((got * weights).sum(), cost)

    ref = torch.stack([_ref_soft_dtw(cost[b, : lx[b], : ly[b]], gamma) for b in range(shape[0])])
    (g_ref,) = torch.autograd.grad((ref * weights.double()).sum(), cost)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_got.float(), g_ref.float(), rtol=1e-4, atol=1e-5)
    # cells past a sequence's lengths get no gradient
    for b in range(shape[0]):
        assert g_got[b, lx[b]:].abs().sum() == 0 and g_got[b, :, ly[b]:].abs().sum() == 0


def test_soft_dtw_small_gamma_tends_to_hard_dtw_and_zero_length_is_zero():
    cost = torch.tensor([[[0.0, 5.0, 5.0], [5.0, 0.0, 0.0]]])  # best path 0 -> 0 -> 0
    assert abs(float(soft_dtw(cost, 1e-3))) < 1e-2
    out = soft_dtw(torch.rand(2, 3, 3), 1.0, torch.tensor([0, 3]), torch.tensor([2, 0]))
    assert out.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="gamma must be > 0"):
        soft_dtw(cost, 0.0)


def test_normalized_soft_dtw_of_identical_sequences_is_zero_and_positive_otherwise():
    torch.manual_seed(1)
    x = torch.randn(3, 6, 4)
    lx = torch.tensor([6, 4, 2])
    same = normalized_soft_dtw(x, x.clone(), 1.0, lx, lx)
    torch.testing.assert_close(same, torch.zeros(3), atol=1e-5, rtol=0)
    # scaled copies have the same cosines: still 0
    torch.testing.assert_close(normalized_soft_dtw(x, 3.0 * x, 1.0, lx, lx), torch.zeros(3), atol=1e-5, rtol=0)
    y = torch.randn(3, 5, 4)
    ly = torch.tensor([5, 5, 3])
    diff = normalized_soft_dtw(x, y, 0.1, lx, ly)
    assert (diff > 0).all()
    # definition, term by term
    want = soft_dtw(cosine_cost(x, y), 0.1, lx, ly) - 0.5 * (
        soft_dtw(cosine_cost(x, x), 0.1, lx, lx) + soft_dtw(cosine_cost(y, y), 0.1, ly, ly))
    torch.testing.assert_close(diff, want)
    # the band penalty adds to the cross term only
    outside = torch.zeros(3, 6, 5, dtype=torch.bool)
    outside[:, 0, 0] = True  # every path starts at cell (0, 0), once: + 1 exactly
    torch.testing.assert_close(normalized_soft_dtw(x, y, 0.1, lx, ly, outside), want + 1.0)
    # an empty side gives 0 (not minus half the other side's self term)
    empty = normalized_soft_dtw(x, y, 0.1, torch.tensor([6, 0, 2]), torch.tensor([0, 5, 3]))
    assert empty[:2].tolist() == [0.0, 0.0] and empty[2] == diff[2]


def test_attention_band_by_hand():
    # one sequence, n = 2 student rows, m = 4 teacher columns (plus one invalid column)
    attn = torch.zeros(1, 2, 5)
    attn[0, 0, 0] = 1.0  # one-hot: expected j = 0, entropy 0
    attn[0, 1, :4] = 0.25  # uniform over 4: expected j = 1.5, entropy log 4
    attn[0, 1, 4] = 7.0  # beyond m_b: ignored
    out = attention_band(attn, torch.tensor([2]), torch.tensor([4]), alpha=0.7, base_width=0.5, entropy_scale=0.5)
    # row 0: c = 0.7 * 0 + 0.3 * 0 * 4/2 = 0; w = 0.5 -> inside j = 0 only
    assert out[0, 0].tolist() == [False, True, True, True, True]
    # row 1: c = 0.7 * 1.5 + 0.3 * 1 * 2 = 1.65; w = 0.5 + 0.5 log 4 = 1.193 -> inside j in {1, 2}
    assert out[0, 1].tolist() == [True, False, False, True, True]
    # default width 5 + 2 H covers a short sequence completely
    assert not attention_band(attn, torch.tensor([2]), torch.tensor([4]))[0, :, :4].any()


def test_gamma_and_warmup_schedules():
    # item 15: the code's schedule, 2.0 -> 0.8 over 3,570 steps (step + 1), then 0.8
    assert dtw_gamma(0) == pytest.approx(2.0 - 1.2 / 3570) and dtw_gamma(3569) == pytest.approx(0.8)
    assert dtw_gamma(1784) == pytest.approx(1.4) and dtw_gamma(10**6) == pytest.approx(0.8)
    assert dtw_gamma(4, anneal_steps=10) == pytest.approx(1.4)  # over the whole run: the run's steps
    assert dtw_gamma(0, 1, start=3.0, end=1.0) == 1.0
    with pytest.raises(ValueError, match="anneal_steps must be >= 1, got 0"):
        dtw_gamma(0, 0)
    assert kd_warmup(0, 300) == pytest.approx(1 / 300) and kd_warmup(299, 300) == 1.0 and kd_warmup(10**6) == 1.0
    assert kd_warmup(0, 0) == 1.0


# ----------------------------------------------------------------------------------------------------------
# Weights and per-row terms
# ----------------------------------------------------------------------------------------------------------


def test_response_order_keeps_order_and_ignores_prompt():
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    idx, lengths = response_order(mask)
    assert lengths.tolist() == [3, 1]
    assert idx[0].tolist() == [1, 2, 4] and idx[1, 0] == 0
    x = torch.arange(10.0).view(2, 5, 1)
    assert gather_rows(x, idx)[0, :, 0].tolist() == [1.0, 2.0, 4.0]


def test_entropy_weights_by_hand():
    seq = torch.tensor([0, 0, 1])
    # student: row 0 uniform over 2 (H = log 2), row 1 one-hot-ish (H ~ 0), row 2 uniform
    zs = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 0.0]])
    zt2s = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [0.0, 0.0]])  # max prob 0.75, 0.5, 0.5
    w = student_entropy_weights(zs, zt2s, seq, 2)
    # raw = [0.75 log 2, ~0, 0.5 log 2]; sequence 0 sums to 2, sequence 1 (one token) to 1
    torch.testing.assert_close(w, torch.tensor([2.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    assert not w.requires_grad

    # teacher: Vt = 4, entropies 0, log 2, log 4 -> raw 1, 0.5, 0; then 1 - H/log V can't go below 0
    ent = torch.tensor([0.0, math.log(2.0), math.log(4.0), 2 * math.log(4.0)])
    wt = teacher_confidence_weights(ent, 4, torch.tensor([0, 0, 1, 1]), 2)
    torch.testing.assert_close(wt, torch.tensor([4 / 3, 2 / 3, 1.0, 1.0]))  # sequence 1 all zero -> 1s
    torch.testing.assert_close(rescale_per_sequence(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([1, 1, 0]), 3),
                               torch.tensor([0.5, 1.5, 1.0]))


def test_divergence_rows_sum_to_divergences_module():
    torch.manual_seed(2)
    zs, zt = torch.randn(5, 7), torch.randn(5, 7)
    rows = divergence_rows("srkl", zs, zt, tau=2.0)
    torch.testing.assert_close(rows.sum(), skewed_reverse_kl(zs, zt, torch.ones(5, dtype=torch.bool), tau=2.0))
    with pytest.raises(ValueError, match="no per-token form"):
        divergence_rows("akl", zs, zt)


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_weighted_chunked_fkl_rows_equal_unchunked_value_and_gradient(chunk):
    g = torch.Generator().manual_seed(3)
    head = TeacherHead(torch.randn(17, 6, generator=g), torch.randn(17, generator=g), 0.7, 4.0)
    ht = torch.randn(2, 5, 6, generator=g)
    hs = torch.randn(2, 5, 6, generator=g, requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 1, 1]], dtype=torch.bool)
    w = torch.rand(int(mask.sum()), generator=g)

    rows, argmax, entropy = chunked_fkl_rows_over_head(ht, hs, head, mask, tau=2.0, chunk_tokens=chunk)
    (g_got,) = torch.autograd.grad((w * rows).sum(), hs)

    zt = teacher_logits(ht[mask], head)
    log_p = torch.log_softmax(zt / 2.0, -1)
    zs = hs[mask] @ head.weight.T
    log_q = torch.log_softmax(zs / 2.0, -1)
    want = (log_p.exp() * (log_p - log_q)).sum(-1)
    (g_want,) = torch.autograd.grad((w * want).sum(), hs)
    torch.testing.assert_close(rows, want)
    torch.testing.assert_close(g_got, g_want)
    torch.testing.assert_close(entropy, -(zt.softmax(-1) * zt.log_softmax(-1)).sum(-1))
    assert argmax.tolist() == zs.argmax(-1).tolist()
    torch.testing.assert_close(rows.sum(), chunked_fkl_over_head(ht, hs, head, mask, tau=2.0, chunk_tokens=chunk))


# ----------------------------------------------------------------------------------------------------------
# dwa_kd_loss
# ----------------------------------------------------------------------------------------------------------


def make_batch(seed=2, vs=5, vt=7, ds=4, dt=6, s=7, t=8):
    g = torch.Generator().manual_seed(seed)
    b = {}
    b["x"] = torch.randint(0, vs, (2, s), generator=g)
    b["y"] = torch.randint(0, vs, (2, s), generator=g)
    b["y"][0, :2] = -100  # prompt
    b["y"][1, :3] = -100
    b["y"][1, 6:] = -100  # pad
    b["xt"] = torch.randint(0, vt, (2, t), generator=g)
    b["yt"] = torch.randint(0, vt, (2, t), generator=g)
    b["yt"][0, :3] = -100
    b["yt"][1, :2] = -100
    b["yt"][1, 6:] = -100
    b["Es"] = torch.randn(vs, ds, generator=g, requires_grad=True)
    b["Ws"] = torch.randn(vs, ds, generator=g, requires_grad=True)
    b["Et"] = torch.randn(vt, dt, generator=g, requires_grad=True)
    b["Wt"] = torch.randn(vt, dt, generator=g, requires_grad=True)
    b["Ht"] = torch.randn(2, t, dt, generator=g).requires_grad_(True)
    b["Hs"] = torch.randn(2, s, ds, generator=g, requires_grad=True)
    b["Zs"] = b["Hs"] @ b["Ws"].T
    b["head"] = TeacherHead(b["Wt"], torch.randn(vt, generator=g), logit_scale=0.9, final_logit_softcap=5.0)
    return b


def run_dwa(b, proj, **kw):
    return dwa_kd_loss(
        student_hidden=b["Hs"], student_logits=b["Zs"], labels=b["y"], input_ids=b["x"],
        student_embed=b["Es"], student_head=b["Ws"], teacher_input_ids=b["xt"], teacher_labels=b["yt"],
        teacher_hidden=b["Ht"], teacher_embed=b["Et"], teacher_head=b["head"], projectors=proj, **kw,
    )


def _proj(seed=1, ds=4, dt=6):
    torch.manual_seed(seed)
    return build_dwa_projectors(ds, dt)


def test_dwa_terms_and_combination():
    b, proj = make_batch(), _proj()
    out = run_dwa(b, proj, gamma=1.0, kd_scale=0.5, chunk_tokens=3)
    cma = dskd_cma_loss(b["Hs"], b["Zs"], b["y"], b["x"], b["Es"], b["Ws"], b["xt"], b["yt"], b["Ht"], b["Et"],
                        b["head"], proj)
    # CMA part is shared with dskd_cma_loss
    for name in ["ce_student", "ce_t2s", "attention_entropy", "queries", "keys", "s2t_correct", "t2s_correct"]:
        torch.testing.assert_close(getattr(out, name), getattr(cma, name), msg=name)
    assert out.t2s_kd_tokens == out.n_student
    # weights sum to the token counts, so with the published weights the KD sums stay on a per-token scale;
    # the warm-up ramps KD_t2s only (item 16, the code), and the DTW term is sum_b nDTW_b (item 11)
    torch.testing.assert_close(out.loss, 0.5 * out.ce_student + 0.5 * (0.5 * out.kd_t2s + out.kd_s2t + out.ce_t2s)
                               + 0.2 * out.dtw)
    torch.testing.assert_close(out.dtw, out.dtw_hidden + out.dtw_embed)
    both = run_dwa(b, proj, gamma=1.0, kd_scale=0.5, chunk_tokens=3, kd_warmup_terms="both")
    torch.testing.assert_close(both.loss, 0.5 * out.ce_student + 0.5 * (0.5 * (out.kd_t2s + out.kd_s2t) + out.ce_t2s)
                               + 0.2 * out.dtw)
    ms = b["y"] != -100
    n_s = ms.sum(1).float()
    # dtw_reduction="tokens": sum_b n_b nDTW_b; with a single sequence it is n * (hidden + embed)
    one = dict(b, **{k: b[k][:1] for k in ["x", "y", "xt", "yt", "Ht", "Hs"]})
    one["Zs"] = one["Hs"] @ b["Ws"].T
    out1 = run_dwa(one, proj, gamma=1.0, dtw_reduction="tokens")
    torch.testing.assert_close(out1.dtw, n_s[0] * (out1.dtw_hidden + out1.dtw_embed))
    tokens = run_dwa(b, proj, gamma=1.0, dtw_reduction="tokens")
    per_seq = run_dwa(b, proj, gamma=1.0)
    assert not torch.allclose(tokens.dtw, per_seq.dtw)
    assert all(torch.isfinite(getattr(out, n)) for n in ["loss", "kd_t2s", "kd_s2t", "dtw"])
    assert set(out.log_dict()) >= {"loss", "dtw", "dtw_hidden", "dtw_embed", "kd_t2s", "kd_s2t"}


def test_dwa_kd_s2t_is_the_entropy_weighted_forward_kl():
    b, proj = make_batch(), _proj()
    out = run_dwa(b, proj, chunk_tokens=2)
    # rebuild from scratch: a_s2t from the CMA, rows of FKL, weights by hand
    mt = b["yt"] != -100
    k = b["Et"].detach()
    xt = torch.where(mt, b["xt"], 0)
    yt = torch.where(mt, b["yt"], 0)
    kin = torch.cat([k[xt], k[yt]], -1)
    keys = kin / kin.std()
    ht = b["Ht"].detach()
    ms = b["y"] != -100
    es = b["Es"].detach()
    qin = torch.cat([es[torch.where(ms, b["x"], 0)], es[torch.where(ms, b["y"], 0)]], -1)
    q = proj.query(qin)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(12) + (~(ms[:, :, None] & mt[:, None, :])).float() * -1e5
    hs2t = scores.transpose(-1, -2).softmax(-1) @ proj.s2t(b["Hs"])
    zt = teacher_logits(ht, b["head"])[mt]
    zs2t = hs2t[mt] @ b["Wt"].detach().T
    log_p, log_q = (zt / 2).log_softmax(-1), (zs2t / 2).log_softmax(-1)
    rows = (log_p.exp() * (log_p - log_q)).sum(-1)
    ent = -(zt.softmax(-1) * zt.log_softmax(-1)).sum(-1)
    raw = (1 - ent / math.log(7)).clamp(0, 1)
    seq = mt.nonzero()[:, 0]
    w = torch.cat([raw[seq == i] * (seq == i).sum() / raw[seq == i].sum() for i in range(2)])
    torch.testing.assert_close(out.kd_s2t, (w * rows).sum())


def test_dtw_uses_response_positions_only():
    """Changing student/teacher states and target ids at prompt and pad positions leaves the DTW terms unchanged."""
    b, proj = make_batch(), _proj()
    out = run_dwa(b, proj, gamma=0.8)
    hs = b["Hs"].detach().clone()
    hs[b["y"] == -100] = torch.randn_like(hs[b["y"] == -100]) * 50
    ht = b["Ht"].detach().clone()
    masked = (b["yt"] == -100).nonzero().tolist()
    rows = [ht[i, j].clone() for i, j in masked]
    for (i, j), row in zip(masked, rows[1:] + rows[:1]):  # a permutation keeps the scalar std
        ht[i, j] = row
    b2 = dict(b, Hs=hs.requires_grad_(True), Ht=ht)
    b2["Zs"] = b2["Hs"] @ b["Ws"].T
    out2 = run_dwa(b2, proj, gamma=0.8)
    for name in ["dtw", "dtw_hidden", "dtw_embed"]:
        torch.testing.assert_close(getattr(out2, name), getattr(out, name), msg=name)
    # ... while a change at a response position does change it
    hs3 = b["Hs"].detach().clone()
    first = (b["y"][0] != -100).nonzero()[0, 0]
    hs3[0, first] = torch.randn(hs3.shape[-1]) * 10
    out3 = run_dwa(dict(b, Hs=hs3, Zs=hs3 @ b["Ws"].T), proj, gamma=0.8)
    assert not torch.allclose(out3.dtw_hidden, out.dtw_hidden)
    # gradient of the DTW term reaches response positions only
    (g,) = torch.autograd.grad(out.dtw, b["Hs"])
    assert g[b["y"] == -100].abs().sum() == 0 and g[b["y"] != -100].abs().sum() > 0


def _grads(term, params):
    grads = torch.autograd.grad(term, list(params.values()), retain_graph=True, allow_unused=True)
    return {name for name, g in zip(params, grads) if g is not None and g.abs().sum().item() > 0}


def test_dwa_gradient_routing():
    b, proj = make_batch(), _proj()
    out = run_dwa(b, proj, chunk_tokens=4)
    params = {
        "query": proj.query.weight, "t2s": proj.t2s.weight, "s2t": proj.s2t.weight, "embed": proj.embed.weight,
        "Hs": b["Hs"], "Es": b["Es"], "Ws": b["Ws"], "Et": b["Et"], "Wt": b["Wt"], "Ht": b["Ht"],
    }
    expected = {
        "ce_student": {"Hs", "Ws"},
        "ce_t2s": {"query", "t2s"},
        "kd_t2s": {"Hs", "Ws"},
        "kd_s2t": {"query", "s2t", "Hs"},
        "dtw_hidden": {"Hs", "t2s"},
        "dtw_embed": {"Es", "embed"},
        "loss": {"query", "t2s", "s2t", "embed", "Hs", "Es", "Ws"},
    }
    for term, receivers in expected.items():
        assert _grads(getattr(out, term), params) == receivers, term
    out.loss.backward()
    for name in ["Et", "Wt", "Ht"]:
        assert b[name].grad is None, name


def test_dwa_bf16_models_fp32_projectors_run():
    b, proj = make_batch(), _proj()
    for k in ["Hs", "Zs", "Es", "Ws", "Ht", "Et"]:
        b[k] = b[k].detach().to(torch.bfloat16)
    b["Es"].requires_grad_(True)
    b["head"] = TeacherHead(b["head"].weight.detach().to(torch.bfloat16), b["head"].bias, 0.9, 5.0)
    out = run_dwa(b, proj)
    assert all(torch.isfinite(getattr(out, n)) for n in ["loss", "kd_t2s", "kd_s2t", "dtw"])
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert proj.embed.weight.grad is not None and b["Es"].grad.dtype == torch.bfloat16


def test_entropy_equals_minus_sum_p_log_p_with_zero_probabilities():
    torch.manual_seed(0)
    z = torch.randn(6, 5000) * 4
    z[0, :2500] = float("-inf")  # masked entries: probability 0, no contribution
    z[1] = 0.0  # uniform: log V
    p = torch.softmax(z.double(), -1)
    ref = -torch.where(p > 0, p * torch.log_softmax(z.double(), -1), torch.zeros_like(p)).sum(-1)
    got = _entropy(z)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert abs(float(got[1]) - math.log(5000)) < 1e-4


# ----------------------------------------------------------------------------------------------------------
# Fidelity options (items 11-16): per-sequence reduction, weight forms, raw DTW inputs, the code's positions
# ----------------------------------------------------------------------------------------------------------


def _ref_ndtw(x, y, attn, gamma):
    """nDTW of one pair written out: cosine costs, the band from the renormalised attention rows, per-cell sDTW."""
    def cost(a, c):
        return 1 - F.cosine_similarity(a[:, None, :].double(), c[None, :, :].double(), dim=-1)
    a = attn.double() / attn.double().sum(-1, keepdim=True)
    n, m = a.shape
    j = torch.arange(m, dtype=torch.float64)
    centre = 0.7 * (a * j).sum(-1) + 0.3 * torch.arange(n, dtype=torch.float64) * m / n
    width = 5 + 2 * -(torch.special.xlogy(a, a)).sum(-1)
    cxy = cost(x, y) + ((j[None, :] - centre[:, None]).abs() > width[:, None]).double()
    return _ref_soft_dtw(cxy, gamma) - 0.5 * (_ref_soft_dtw(cost(x, x), gamma) + _ref_soft_dtw(cost(y, y), gamma))


def _ref_dtw_terms(b, proj, gamma, inputs, positions):
    from dskd_pipe.pipeline.objectives.dskd import cross_model_attention

    cma = cross_model_attention(b["Hs"], b["y"], b["x"], b["Es"], b["xt"], b["yt"], b["Ht"], b["Et"], proj)
    ms, mt = b["y"] != -100, b["yt"] != -100
    etg = b["Et"].detach()[torch.where(mt, b["yt"], 0)]
    ht = b["Ht"].detach()
    h_in, e_in = (ht, etg) if inputs == "raw" else (ht / ht.std(), etg / etg.std())
    hidden, embed = [], []
    for i in range(b["y"].shape[0]):
        si = ms[i].nonzero()[:, 0] if positions == "response" else torch.arange(int(ms[i].sum()))
        ti = mt[i].nonzero()[:, 0] if positions == "response" else torch.arange(int(mt[i].sum()))
        attn = cma.a_t2s.detach()[i][si][:, ti]
        hidden.append(_ref_ndtw(b["Hs"][i, si], proj.t2s(h_in[i, ti]), attn, gamma))
        es_y = b["Es"][torch.where(ms[i], b["y"][i], 0)]
        embed.append(_ref_ndtw(es_y[si], proj.embed(e_in[i, ti]), attn, gamma))
    return torch.stack(hidden), torch.stack(embed)


@pytest.mark.parametrize("inputs", ["raw", "normalised"])
@pytest.mark.parametrize("positions", ["response", "released"])
def test_dtw_inputs_and_positions_match_a_reference(inputs, positions):
    """Items 13-14: raw teacher inputs (paper and code) or the CMA's std-normalised ones; response positions
    (default) or the code's first n_b positions from index 0. Per-sequence nDTW summed (item 11)."""
    b, proj = make_batch(), _proj()
    out = run_dwa(b, proj, gamma=0.7, dtw_inputs=inputs, dtw_positions=positions)
    ref_h, ref_e = _ref_dtw_terms(b, proj, 0.7, inputs, positions)
    torch.testing.assert_close(out.dtw_hidden.double(), ref_h.sum(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.dtw_embed.double(), ref_e.sum(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.dtw.double(), (ref_h + ref_e).sum(), atol=4e-5, rtol=2e-5)


def test_raw_dtw_inputs_see_the_teacher_scale_and_the_code_positions_see_the_prompt():
    b, proj = make_batch(), _proj()
    scaled = dict(b, Ht=b["Ht"].detach() * 3.0)
    for inputs, invariant in [("normalised", True), ("raw", False)]:
        a = run_dwa(b, proj, dtw_inputs=inputs).dtw_hidden
        c = run_dwa(scaled, proj, dtw_inputs=inputs).dtw_hidden
        assert torch.allclose(a, c, atol=1e-5) == invariant, inputs
    hs = b["Hs"].detach().clone()
    hs[0, 0] += 10.0  # a prompt position of example 0 (its labels start at 2)
    moved = dict(b, Hs=hs, Zs=hs @ b["Ws"].T)
    assert torch.allclose(run_dwa(moved, proj).dtw_hidden, run_dwa(b, proj).dtw_hidden)
    assert not torch.allclose(run_dwa(moved, proj, dtw_positions="released").dtw_hidden,
                              run_dwa(b, proj, dtw_positions="released").dtw_hidden)


def test_student_weight_forms_by_hand():
    """Item 12: paper eq. 12 rescales H*g per sequence; the code rescales H, then multiplies by g."""
    seq = torch.tensor([0, 0, 1])
    zs = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)], [0.0, 0.0]])  # H = log 2, H(0.25, 0.75), log 2
    zt2s = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [0.0, 0.0]])  # g = 0.75, 0.5, 0.5
    h = torch.tensor([math.log(2.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), math.log(2.0)])
    g = torch.tensor([0.75, 0.5, 0.5])
    paper = student_entropy_weights(zs, zt2s, seq, 2)
    hg = h * g
    torch.testing.assert_close(paper, torch.cat([hg[:2] * 2 / hg[:2].sum(), torch.ones(1)]))
    released = student_entropy_weights(zs, zt2s, seq, 2, form="released")
    torch.testing.assert_close(released, torch.cat([h[:2] * 2 / h[:2].sum(), torch.ones(1)]) * g)
    with pytest.raises(ValueError, match="unknown weight form 'x'; expected one of: paper, released"):
        student_entropy_weights(zs, zt2s, seq, 2, form="x")
    b, proj = make_batch(), _proj()
    ms = b["y"] != -100
    out_p, out_r = run_dwa(b, proj), run_dwa(b, proj, weights="released")
    rows = divergence_rows("srkl", b["Zs"][ms], out_p_target(b, proj)[ms])
    seq = ms.nonzero()[:, 0]
    for out, form in [(out_p, "paper"), (out_r, "released")]:
        w = student_entropy_weights(b["Zs"][ms], out_p_target(b, proj)[ms], seq, 2, form=form)
        torch.testing.assert_close(out.kd_t2s, (w * rows).sum())


def out_p_target(b, proj):
    """Zt2s [B, S, Vs] of the batch (the CMA's t2s logits), detached."""
    from dskd_pipe.pipeline.objectives.dskd import cross_model_attention

    cma = cross_model_attention(b["Hs"], b["y"], b["x"], b["Es"], b["xt"], b["yt"], b["Ht"], b["Et"], proj)
    return ((cma.a_t2s @ cma.v_t2s) @ b["Ws"].T).detach()


def test_unknown_option_values_name_the_choices():
    b, proj = make_batch(), _proj()
    with pytest.raises(ValueError, match="unknown dtw_positions 'prompt'; expected one of: response, released"):
        run_dwa(b, proj, dtw_positions="prompt")
