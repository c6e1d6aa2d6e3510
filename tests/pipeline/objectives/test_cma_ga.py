"""CMA-GA: discriminator, its losses by hand, and which parameters each loss moves."""

import copy

import pytest
import torch
import torch.nn.functional as F

from dskd_pipe.pipeline.objectives.cma_ga import (
    build_discriminator,
    build_discriminator_optimizer,
    discriminator_accuracy,
    discriminator_loss,
    generator_loss,
    generator_term,
    reachable_keys,
    released_kq_term,
    response_tokens,
)
from dskd_pipe.pipeline.objectives.dskd import TeacherHead, build_projectors, dskd_cma_loss


def _by_hand(disc, x):
    """D(x) written out from spec/cma_ga.md step 2 (eval mode: dropout is the identity)."""
    gate_lin, _, lin1, _, lin2 = disc
    h = gate_lin.proj(x)
    s = torch.sigmoid(h)
    x = s * torch.relu(h) + (1 - s) * x
    return lin2(F.leaky_relu(lin1(x), 0.1)).squeeze(-1)


@pytest.fixture
def disc():
    torch.manual_seed(0)
    return build_discriminator(12, hidden=16)


def test_discriminator_shape_dtype_and_math(disc):
    x = torch.randn(5, 12)
    disc.eval()
    assert disc(x).shape == (5, 1) and disc(x).dtype == torch.float32
    torch.testing.assert_close(disc(x).squeeze(-1), _by_hand(disc, x))
    default = build_discriminator(12)
    assert default[2].out_features == 768 and default[1].p == 0.1


def test_losses_by_hand(disc):
    disc.eval()
    k, q = torch.randn(6, 12), torch.randn(4, 12)
    dk, dq = _by_hand(disc, k), _by_hand(disc, q)
    want_d = -torch.log(torch.sigmoid(dk)).mean() - torch.log(1 - torch.sigmoid(dq)).mean()
    torch.testing.assert_close(discriminator_loss(disc, k, q), want_d)
    torch.testing.assert_close(generator_loss(disc, q), -torch.log(torch.sigmoid(dq)).mean())
    torch.testing.assert_close(
        generator_loss(disc, q, mode="gradient_reversal"), -torch.log(1 - torch.sigmoid(dq)).mean()
    )
    acc_real, acc_fake = discriminator_accuracy(disc, k, q)
    assert acc_real.item() == pytest.approx((dk > 0).float().mean().item())
    assert acc_fake.item() == pytest.approx((dq < 0).float().mean().item())


def test_discriminator_loss_over_parts_with_the_whole_counts_is_the_loss_of_the_whole(disc):
    """Micro-batches of one step, each divided by the step's token counts, add up to the step's L_D."""
    disc.eval()
    k, q = torch.randn(7, 12), torch.randn(5, 12)
    parts = [(k[:3], q[:1]), (k[3:], q[1:4]), (k[:0], q[4:])]  # one part without real tokens
    summed = sum(discriminator_loss(disc, kp, qp, counts=(7.0, 5.0)) for kp, qp in parts)
    torch.testing.assert_close(summed, discriminator_loss(disc, k, q))


def test_accuracy_turns_dropout_off_and_restores_mode(disc):
    disc.train()
    k, q = torch.randn(50, 12), torch.randn(50, 12)
    first = discriminator_accuracy(disc, k, q)
    assert disc.training
    assert discriminator_accuracy(disc, k, q) == first  # deterministic: no dropout inside


def test_gradient_reversal_negates_the_query_gradient(disc):
    disc.eval()
    q = torch.randn(4, 12, requires_grad=True)
    (g_rev,) = torch.autograd.grad(generator_loss(disc, q, mode="gradient_reversal"), q)
    fake_loss = F.binary_cross_entropy_with_logits(disc(q).squeeze(-1), torch.zeros(4))
    (g_fake,) = torch.autograd.grad(fake_loss, q)
    torch.testing.assert_close(g_rev, -g_fake)


@pytest.mark.parametrize("mode", ["non_saturating", "gradient_reversal"])
@pytest.mark.parametrize("spectral_norm", [False, True])
def test_generator_loss_gives_no_gradient_to_d(mode, spectral_norm):
    torch.manual_seed(1)
    d = build_discriminator(12, hidden=16, spectral_norm=spectral_norm)
    q = torch.randn(4, 12, requires_grad=True)
    generator_loss(d, q, mode=mode).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.parameters())


def test_discriminator_loss_detaches_its_inputs(disc):
    k = torch.randn(6, 12, requires_grad=True)
    q = torch.randn(4, 12, requires_grad=True)
    discriminator_loss(disc, k, q).backward()
    assert k.grad is None and q.grad is None
    assert all(p.grad is not None for p in disc.parameters())


def test_normalize_directions_ignores_token_norms(disc):
    disc.eval()
    k, q = torch.randn(6, 12), torch.randn(4, 12)
    scale_k, scale_q = torch.rand(6, 1) * 10 + 0.1, torch.rand(4, 1) * 10 + 0.1
    for fn in (discriminator_loss, discriminator_accuracy):
        a = fn(disc, k, q, normalize_directions=True)
        b = fn(disc, k * scale_k, q * scale_q, normalize_directions=True)
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(
        generator_loss(disc, q, normalize_directions=True), generator_loss(disc, q * scale_q, normalize_directions=True)
    )


def test_generator_term_scale():
    assert generator_term(torch.tensor(0.7), 20, lambda_ga=0.1).item() == pytest.approx(1.4)


def test_unknown_mode_names_the_choices(disc):
    with pytest.raises(ValueError, match="unknown generator mode 'minimax'; expected one of: non_saturating, gradient_reversal"):
        generator_loss(disc, torch.randn(2, 12), mode="minimax")


def test_response_tokens():
    k, q = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    mt = torch.tensor([[0, 1, 1], [1, 0, 0]], dtype=torch.bool)
    ms = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    kr, qr = response_tokens(k, q, mt, ms)
    assert torch.equal(kr, torch.stack([k[0, 1], k[0, 2], k[1, 0]]))
    assert torch.equal(qr, torch.stack([q[0, 2], q[0, 3], q[1, 1]]))


# ----------------------------------------------------------------------------------------------------------
# With DSKD-CMA: which parameters L_G and L_D move
# ----------------------------------------------------------------------------------------------------------


def _cma_setup(seed=0, vs=6, vt=7, ds=4, dt=6, s=6, t=7):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    student = torch.nn.Linear(ds, ds)  # stands in for the student network producing Hs
    proj = build_projectors(ds, dt, with_query=True)
    disc = build_discriminator(2 * dt, hidden=16)
    data = dict(
        x=torch.randint(0, vs, (2, s), generator=g), y=torch.randint(0, vs, (2, s), generator=g),
        xt=torch.randint(0, vt, (2, t), generator=g), yt=torch.randint(0, vt, (2, t), generator=g),
        Es=torch.randn(vs, ds, generator=g), Ws=torch.randn(vs, ds, generator=g),
        Et=torch.randn(vt, dt, generator=g), Ht=torch.randn(2, t, dt, generator=g),
        h0=torch.randn(2, s, ds, generator=g), head=TeacherHead(torch.randn(vt, dt, generator=g)),
    )
    data["y"][:, :2] = -100
    data["yt"][:, :3] = -100

    def forward():
        hs = student(data["h0"])
        out = dskd_cma_loss(
            hs, hs @ data["Ws"].T, data["y"], data["x"], data["Es"], data["Ws"], data["xt"], data["yt"],
            data["Ht"], data["Et"], data["head"], proj,
        )
        return response_tokens(out.keys, out.queries, out.teacher_mask, out.student_mask)

    return student, proj, disc, forward


def _snapshot(*modules):
    return [copy.deepcopy(m.state_dict()) for m in modules]


def _changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


@pytest.mark.parametrize("mode", ["non_saturating", "gradient_reversal"])
def test_generator_loss_moves_only_the_query_projector(mode):
    student, proj, disc, forward = _cma_setup()
    s0, p0, d0 = _snapshot(student, proj, disc)
    everything = list(student.parameters()) + list(proj.parameters()) + list(disc.parameters())
    opt = torch.optim.AdamW(everything, lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        _, qr = forward()
        generator_loss(disc, qr, mode=mode).backward()
        opt.step()
    assert _changed(p0, proj) == {"query.weight", "query.bias"}
    assert _changed(s0, student) == set()
    assert _changed(d0, disc) == set()


def test_discriminator_loss_moves_only_d_and_learns():
    student, proj, disc, forward = _cma_setup()
    s0, p0, d0 = _snapshot(student, proj, disc)
    opt_d = build_discriminator_optimizer(disc, lr=1e-2)
    everything = torch.optim.AdamW(list(student.parameters()) + list(proj.parameters()), lr=1e-2)
    kr, qr = forward()
    loss_start = discriminator_loss(disc, kr, qr).item()
    for _ in range(30):
        opt_d.zero_grad()
        everything.zero_grad()
        kr, qr = forward()
        discriminator_loss(disc, kr, qr).backward()
        opt_d.step()
        everything.step()
    assert _changed(p0, proj) == set() and _changed(s0, student) == set()
    assert _changed(d0, disc) == set(disc.state_dict())
    assert discriminator_loss(disc, kr, qr).item() < loss_start
    acc_real, acc_fake = discriminator_accuracy(disc, kr, qr)
    assert (acc_real + acc_fake).item() / 2 > 0.5


# ----------------------------------------------------------------------------------------------------------
# --ga-mode released (the released DSKD-KQ code) and fp32
# ----------------------------------------------------------------------------------------------------------


def test_released_kq_term_by_hand(disc):
    """Fidelity item 5: L_KQ = BCE(D(Q), 1) + BCE(D(K), 0) over EVERY position (prompt and pads too), queries
    behind a gradient reversal, added unscaled (lambda * L_KQ); D gets no gradient."""
    disc.eval()
    q = torch.randn(2, 5, 12, requires_grad=True)  # [B, S, 2dt], all positions
    k = torch.randn(2, 7, 12)
    term, l_kq = released_kq_term(disc, q, k, lambda_ga=0.3)
    dq, dk = _by_hand(disc, q.reshape(-1, 12)), _by_hand(disc, k.reshape(-1, 12))
    want = -torch.log(torch.sigmoid(dq)).mean() - torch.log(1 - torch.sigmoid(dk)).mean()
    torch.testing.assert_close(l_kq, want)
    torch.testing.assert_close(term, 0.3 * want)
    (g_q,) = torch.autograd.grad(term, q, retain_graph=True)
    (g_plain,) = torch.autograd.grad(-0.3 * torch.log(torch.sigmoid(dq)).mean(), q)
    torch.testing.assert_close(g_q, -g_plain)  # reversed: the queries ASCEND BCE(D(Q), 1)
    term.backward()
    assert all(p.grad is None for p in disc.parameters())  # D is never trained in this mode


def test_released_kq_term_keeps_dropout_in_train_mode(disc):
    """The release calls D with its dropout on while training; the same RNG state gives the same draw."""
    disc.train()
    q, k = torch.randn(3, 4, 12), torch.randn(3, 6, 12)
    torch.manual_seed(5)
    first = released_kq_term(disc, q, k)[1]
    torch.manual_seed(5)
    assert released_kq_term(disc, q, k)[1] == first
    disc.eval()
    assert released_kq_term(disc, q, k)[1] != first


def test_discriminator_runs_fp32_under_autocast(disc):
    """Fidelity item 6: D's step (and L_G, accuracy) is fp32 under bf16 autocast: same numbers as without it."""
    disc.eval()
    k, q = torch.randn(6, 12), torch.randn(4, 12, requires_grad=True)
    want_d, want_g = discriminator_loss(disc, k, q), generator_loss(disc, q)
    want_kq = released_kq_term(disc, q[None], k[None])[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_d, got_g = discriminator_loss(disc, k, q), generator_loss(disc, q)
        got_kq = released_kq_term(disc, q[None], k[None])[1]
        acc = discriminator_accuracy(disc, k, q)
        plain = F.binary_cross_entropy_with_logits(disc(k).squeeze(-1), torch.ones(6))  # what autocast gives
    assert got_d.dtype == got_g.dtype == torch.float32
    assert got_d == want_d and got_g == want_g and got_kq == want_kq
    assert acc == discriminator_accuracy(disc, k, q)
    assert plain != discriminator_loss(disc, k, q[:0])  # without the fp32 region D would run in bf16


def test_reachable_keys_lie_where_queries_can_go():
    """Keys are projected onto {W x + b} of a narrow query projector (2ds < 2dt): every projected key is W x + b for
    some x, a projected key and any query stay as they are, the part removed is orthogonal to W's columns, and no
    gradient reaches the projector."""
    torch.manual_seed(0)
    query = torch.nn.Linear(3, 6)  # 2ds = 3 -> 2dt = 6
    keys = torch.randn(10, 6)
    reached = reachable_keys(keys, query)
    W, b = query.weight.detach(), query.bias.detach()
    x = torch.linalg.lstsq(W, (reached - b).T).solution
    torch.testing.assert_close((W @ x).T + b, reached, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reachable_keys(reached, query), reached, atol=1e-5, rtol=1e-5)
    queries = query(torch.randn(4, 3)).detach()
    torch.testing.assert_close(reachable_keys(queries, query), queries, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(W.T @ (keys - reached).T, torch.zeros(3, 10), atol=1e-5, rtol=0)
    assert (keys - reached).norm() > 0.5  # random keys do leave the 3-dimensional span
    assert not reachable_keys(keys.requires_grad_(), query).requires_grad


def test_reachable_keys_are_the_keys_when_the_queries_span_everything():
    query = torch.nn.Linear(8, 6)  # 2ds >= 2dt: W has full row rank
    keys = torch.randn(5, 6)
    torch.testing.assert_close(reachable_keys(keys, query), keys, atol=1e-5, rtol=1e-5)


def test_a_discriminator_shown_reachable_keys_loses_the_dimensions_no_query_has():
    """Keys that differ from the queries only outside the query span: a D trained on whole keys separates them, one
    trained on reachable keys cannot: held-out accuracy at chance (BENCHMARKS.md "Why the discriminator wins")."""
    torch.manual_seed(0)
    query = torch.nn.Linear(4, 8)
    queries = query(torch.randn(800, 4)).detach()
    W = query.weight.detach()
    off_span = torch.linalg.svd(W, full_matrices=True)[0][:, 4:]  # [8, 4], orthogonal to W's columns
    keys = query(torch.randn(800, 4)).detach() + torch.randn(800, 4) @ off_span.T * 3.0

    def held_out_accuracy(k):
        d = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
        opt = torch.optim.Adam(d.parameters(), lr=1e-2)
        for _ in range(300):
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(d(k[:400]).squeeze(-1), torch.ones(400)) + \
                F.binary_cross_entropy_with_logits(d(queries[:400]).squeeze(-1), torch.zeros(400))
            loss.backward()
            opt.step()
        with torch.no_grad():
            return 0.5 * (float((d(k[400:]) > 0).float().mean()) + float((d(queries[400:]) <= 0).float().mean()))

    assert held_out_accuracy(keys) > 0.95
    assert held_out_accuracy(reachable_keys(keys, query)) < 0.6
