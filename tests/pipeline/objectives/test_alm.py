"""ALM (pipeline/objectives/alm.py) as tokenkit defines it: chunk likelihoods, debiased by the next token's word-start
probability and merged by the teacher's, matched by binary cross-entropy at the binarisation temperature, averaged
over chunks. Checked against a loop over hand-cut chunks written from the formula (values and gradients, each
debiasing mode), and on the cases the formula implies."""
import math

import pytest
import torch
import torch.nn.functional as F

from dskd_pipe.pipeline.objectives.alm import alm_loss, binary_cross_entropy, log1mexp
from dskd_pipe.pipeline.objectives.dskd import TeacherHead
from dskd_pipe.pipeline.probes import chunk_ids

# "The apple pie." cut two ways (label positions; -100 rows are the prompt): the teacher splits "apple" in two, the
# student cuts " pie." as one token; the EOS (empty span at the end) is its own chunk on both sides.
STUDENT_SPANS = [(0, 0), (0, 3), (3, 9), (9, 14), (14, 14)]
TEACHER_SPANS = [(0, 0), (0, 3), (3, 6), (6, 9), (9, 13), (13, 14), (14, 14)]
CHUNKS = [([1], [1]), ([2], [2, 3]), ([3], [4, 5]), ([4], [6])]  # (student rows, teacher rows), by hand
VS, VT = 11, 13
WORD_START_S = torch.tensor([i % 3 == 0 for i in range(VS)])
WORD_START_T = torch.tensor([i % 4 == 1 for i in range(VT)])


def _batch(seed: int, dt: int = 6):
    g = torch.Generator().manual_seed(seed)
    s, t = len(STUDENT_SPANS), len(TEACHER_SPANS)
    labels = torch.randint(0, VS, (1, s), generator=g)
    labels[0, 0] = -100
    teacher_labels = torch.randint(0, VT, (1, t), generator=g)
    teacher_labels[0, 0] = -100
    t_chunk, s_chunk = chunk_ids(TEACHER_SPANS, STUDENT_SPANS, teacher_labels[0] != -100, labels[0] != -100)
    logits = (2 * torch.randn(1, s, VS, generator=g)).requires_grad_()
    hidden = torch.randn(1, t, dt, generator=g)
    head = TeacherHead(torch.randn(VT, dt, generator=g))
    return logits, labels, hidden, teacher_labels, head, t_chunk[None], s_chunk[None]


def _reference(logits, labels, hidden, teacher_labels, head, tau, debias, threshold=0.1):
    """One chunk at a time: log p(c) along the gold path; with debiasing + log sigma(c), the word-start mass of the
    softmax at the position after the chunk's last one (0 where there is none); with merging, chunks joined until
    one whose teacher sigma > threshold. Then the mean of -[a log b + (1 - a) log(1 - b)], a = exp(lt / tau - 1e-6),
    b = exp(ls / tau - 1e-6)."""
    ls = F.log_softmax(logits[0].float(), -1)
    lt = F.log_softmax(hidden[0] @ head.weight.T, -1)

    def sigma(lp, row, start, lab):
        if row + 1 >= lp.shape[0] or lab[row + 1] == -100:
            return torch.zeros(())
        return torch.logsumexp(lp[row + 1][start], -1)

    chunks = []
    for s_rows, t_rows in CHUNKS:
        s_gold = sum(ls[j, labels[0, j]] for j in s_rows)
        t_gold = sum(lt[i, teacher_labels[0, i]] for i in t_rows)
        chunks.append([s_gold, t_gold, sigma(ls, s_rows[-1], WORD_START_S, labels[0]),
                       sigma(lt, t_rows[-1], WORD_START_T, teacher_labels[0])])
    if debias == "space+merge":
        merged, current = [], None
        for c in chunks:
            current = c if current is None else [current[0] + c[0], current[1] + c[1], c[2], c[3]]
            if math.exp(float(c[3])) > threshold:
                merged.append(current)
                current = None
        if current is not None:
            merged.append(current)
        chunks = merged
    total = 0.0
    for s_gold, t_gold, s_sigma, t_sigma in chunks:
        log_b, log_a = (s_gold + s_sigma, t_gold + t_sigma) if debias != "none" else (s_gold, t_gold)
        a = torch.exp(log_a / tau - 1e-6)
        log_b = log_b / tau - 1e-6
        total = total - (a * log_b + (1 - a) * torch.log(1 - torch.exp(log_b)))
    return total / len(chunks), len(chunks)


def test_the_chunks_are_the_ones_cut_by_hand():
    *_, t_chunk, s_chunk = _batch(0)
    want_t, want_s = torch.full((7,), -1), torch.full((5,), -1)
    for n, (s_rows, t_rows) in enumerate(CHUNKS):
        want_s[s_rows], want_t[t_rows] = n, n
    assert torch.equal(t_chunk[0], want_t) and torch.equal(s_chunk[0], want_s)


@pytest.mark.parametrize("debias", ["none", "space", "space+merge"])
@pytest.mark.parametrize("tau", [1.0, 100.0])
def test_values_and_gradients_equal_a_loop_over_chunks(tau, debias):
    for seed in range(4):  # several seeds: merging joins different chunks depending on the teacher's sigma
        logits, labels, hidden, teacher_labels, head, t_chunk, s_chunk = _batch(seed)
        out = alm_loss(logits, labels, hidden, teacher_labels, head, s_chunk, t_chunk, tau=tau, debias=debias,
                       student_word_start=WORD_START_S, teacher_word_start=WORD_START_T, merge_threshold=0.1)
        ref, n = _reference(logits, labels, hidden, teacher_labels, head, tau, debias)
        torch.testing.assert_close(out.loss, ref.float(), rtol=1e-5, atol=1e-7)
        assert int(out.chunks) == n
        (got,) = torch.autograd.grad(out.loss, logits)
        (want,) = torch.autograd.grad(ref, logits)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-8)


def test_merging_follows_the_teachers_word_start_probability():
    """With threshold 0 every chunk closes a group (nothing merged); above every sigma all chunks become one."""
    logits, labels, hidden, teacher_labels, head, t_chunk, s_chunk = _batch(1)
    kw = dict(tau=100.0, debias="space+merge", student_word_start=WORD_START_S, teacher_word_start=WORD_START_T)
    assert int(alm_loss(logits, labels, hidden, teacher_labels, head, s_chunk, t_chunk, merge_threshold=0.0,
                        **kw).chunks) == 4
    assert int(alm_loss(logits, labels, hidden, teacher_labels, head, s_chunk, t_chunk, merge_threshold=1.0,
                        **kw).chunks) == 1
    unmerged = alm_loss(logits, labels, hidden, teacher_labels, head, s_chunk, t_chunk, merge_threshold=0.0, **kw)
    spaced = alm_loss(logits, labels, hidden, teacher_labels, head, s_chunk, t_chunk, tau=100.0, debias="space",
                      student_word_start=WORD_START_S, teacher_word_start=WORD_START_T)
    torch.testing.assert_close(unmerged.loss, spaced.loss)


def test_a_student_with_the_teachers_probabilities_is_at_the_minimum():
    """Same tokenization, the student's logits equal to the teacher's: every chunk has a == b, where BCE is at its
    minimum over b (the teacher's binary entropy), so the gradient is 0."""
    logits, labels, hidden, _, head, _, _ = _batch(5)
    hidden = hidden[:, :len(STUDENT_SPANS)]
    same = (hidden @ head.weight.T).detach().requires_grad_()
    t_chunk, s_chunk = chunk_ids(STUDENT_SPANS, STUDENT_SPANS, labels[0] != -100, labels[0] != -100)
    labels_t = labels.clamp_max(VT - 1)
    for debias in ("none", "space+merge"):
        out = alm_loss(same, labels_t, hidden, labels_t, head, s_chunk[None], t_chunk[None], tau=100.0,
                       debias=debias, student_word_start=WORD_START_T, teacher_word_start=WORD_START_T)
        (grad,) = torch.autograd.grad(out.loss, same)
        assert float(grad.abs().max()) < 1e-6


def test_a_student_above_the_teacher_is_pulled_down():
    """CE only ever raises the gold probability; ALM lowers it where the student is surer than the teacher."""
    vocab, dt = 4, 4
    head = TeacherHead(torch.eye(vocab, dt))
    hidden = torch.zeros(1, 2, dt)  # uniform teacher: pT(gold) = 0.25
    labels = torch.tensor([[-100, 0]])
    logits = torch.tensor([[[0.0] * vocab, [4.0, 0.0, 0.0, 0.0]]], requires_grad=True)  # pS(gold) ~ 0.95
    chunk = torch.tensor([[-1, 0]])
    out = alm_loss(logits, labels, hidden, labels, head, chunk, chunk, tau=1.0, debias="none")
    (grad,) = torch.autograd.grad(out.loss, logits)
    assert float(grad[0, 1, 0]) > 0  # a descent step lowers the gold logit
    a, b = 0.25 * math.exp(-1e-6), math.exp(4) / (math.exp(4) + 3) * math.exp(-1e-6)
    assert out.loss.item() == pytest.approx(-(a * math.log(b) + (1 - a) * math.log(1 - b)), rel=1e-5)


def test_at_tau_100_a_rare_chunk_still_pulls():
    """A chunk the teacher gives 1e-4 and the student 1e-6: at tau 1 the pull on the student's log-probability is
    the probability gap (1e-4), at tau 100 it compares the log-probabilities and is 30x larger."""
    grads = {}
    for tau in (1.0, 100.0):
        log_b = torch.tensor(math.log(1e-6), requires_grad=True)
        loss = binary_cross_entropy(torch.tensor(math.log(1e-4)), log_b, tau)
        (grads[tau],) = torch.autograd.grad(loss, log_b)
    assert -2e-4 < float(grads[1.0]) < 0 and float(grads[100.0]) < 30 * float(grads[1.0])


def test_no_chunk_gives_a_zero_loss_with_a_gradient_path():
    logits, labels, hidden, teacher_labels, head, t_chunk, s_chunk = _batch(2)
    out = alm_loss(logits, labels, hidden, teacher_labels, head, torch.full_like(s_chunk, -1),
                   torch.full_like(t_chunk, -1), debias="none")
    assert out.loss.item() == 0.0 and int(out.chunks) == 0 and out.loss.requires_grad


def test_log1mexp_is_accurate_at_both_ends():
    x = torch.tensor([-1e-8, -1e-3, -0.5, -0.7, -5.0, -40.0], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), torch.log(-torch.expm1(x)))
    assert torch.isfinite(log1mexp(torch.tensor([-1e-6]))).all()


def test_unknown_modes_name_the_choices():
    logits, labels, hidden, teacher_labels, head, t_chunk, s_chunk = _batch(2)
    with pytest.raises(ValueError, match="mean_over 'chunk': choose one of chunks, released"):
        alm_loss(logits, labels, hidden, teacher_labels, head, s_chunk, t_chunk, debias="none", mean_over="chunk")
    with pytest.raises(ValueError, match="debias 'merge': choose one of space\\+merge, space, none"):
        alm_loss(logits, labels, hidden, teacher_labels, head, s_chunk, t_chunk, debias="merge")
