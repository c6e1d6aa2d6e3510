"""ALM (pipeline/objectives/alm.py): chunk likelihoods matched as Bernoulli probabilities, against a loop over
chunks written from the formula; zero when the student gives every chunk the teacher's probability; a student
above the teacher is pulled down."""
import math

import pytest
import torch
import torch.nn.functional as F

from dskd_pipe.pipeline.objectives.alm import chunk_likelihood_loss, log1mexp
from dskd_pipe.pipeline.objectives.dskd import TeacherHead
from dskd_pipe.pipeline.probes import chunk_alignment

# "The apple pie." cut two ways (label positions; -100 rows are the prompt): the teacher splits "apple" in two, the
# student cuts " pie." as one token; the EOS (empty span at the end) is its own chunk on both sides.
STUDENT_SPANS = [(0, 0), (0, 3), (3, 9), (9, 14), (14, 14)]
TEACHER_SPANS = [(0, 0), (0, 3), (3, 6), (6, 9), (9, 13), (13, 14), (14, 14)]
CHUNKS = [([1], [1]), ([2], [2, 3]), ([3], [4, 5]), ([4], [6])]  # (student rows, teacher rows), by hand


def _batch(seed: int, vs: int = 11, vt: int = 13, dt: int = 6):
    g = torch.Generator().manual_seed(seed)
    s, t = len(STUDENT_SPANS), len(TEACHER_SPANS)
    labels = torch.randint(0, vs, (1, s), generator=g)
    labels[0, 0] = -100
    teacher_labels = torch.randint(0, vt, (1, t), generator=g)
    teacher_labels[0, 0] = -100
    chunks = chunk_alignment(TEACHER_SPANS, STUDENT_SPANS, teacher_labels[0] != -100, labels[0] != -100)[None]
    logits = (2 * torch.randn(1, s, vs, generator=g)).requires_grad_()
    hidden = torch.randn(1, t, dt, generator=g)
    head = TeacherHead(torch.randn(vt, dt, generator=g))
    return logits, labels, hidden, teacher_labels, head, chunks


def _reference(logits, labels, hidden, teacher_labels, head, tau):
    """Sum over CHUNKS of a log(a/b) + (1-a) log((1-a)/(1-b)), a = pT^(1/tau), b = pS^(1/tau), one chunk at a time."""
    ls = F.log_softmax(logits[0].float(), -1)
    lt = F.log_softmax(hidden[0] @ head.weight.T, -1)
    total = 0.0
    for s_rows, t_rows in CHUNKS:
        log_b = sum(ls[j, labels[0, j]] for j in s_rows) / tau
        log_a = sum(lt[i, teacher_labels[0, i]] for i in t_rows) / tau
        a, b = torch.exp(log_a), torch.exp(log_b)
        total = total + a * (log_a - log_b) + (1 - a) * (torch.log(1 - a) - torch.log(1 - b))
    return total


def test_the_chunks_are_the_ones_cut_by_hand():
    *_, chunks = _batch(0)
    want = torch.zeros_like(chunks[0])
    for s_rows, t_rows in CHUNKS:
        for j in s_rows:
            want[j, t_rows] = True
    assert torch.equal(chunks[0], want)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_values_and_gradients_equal_a_loop_over_chunks(tau):
    logits, labels, hidden, teacher_labels, head, chunks = _batch(3)
    out = chunk_likelihood_loss(logits, labels, hidden, teacher_labels, head, chunks, kd_rate=0.25, tau=tau)
    ref = _reference(logits, labels, hidden, teacher_labels, head, tau)
    ce = F.cross_entropy(logits[0], labels[0], ignore_index=-100, reduction="sum")
    torch.testing.assert_close(out.kd, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.ce_student, ce, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss, 0.75 * ce + 0.25 * ref, rtol=1e-5, atol=1e-6)
    assert int(out.chunks) == len(CHUNKS)
    (got,) = torch.autograd.grad(out.kd, logits)
    (want,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_student_with_the_teachers_chunk_probabilities_adds_nothing():
    """Same tokenization, the student's logits equal to the teacher's: every chunk has a == b, so ALM is 0."""
    logits, labels, hidden, _, head, _ = _batch(5, vs=13, vt=13)
    hidden = hidden[:, :len(STUDENT_SPANS)]
    same = (hidden @ head.weight.T).detach().requires_grad_()
    chunks = chunk_alignment(STUDENT_SPANS, STUDENT_SPANS, labels[0] != -100, labels[0] != -100)[None]
    out = chunk_likelihood_loss(same, labels, hidden, labels, head, chunks, kd_rate=1.0)
    assert int(out.chunks) == 4 and abs(out.kd.item()) < 1e-6
    (grad,) = torch.autograd.grad(out.kd, same)
    assert float(grad.abs().max()) < 1e-5


def test_a_student_above_the_teacher_is_pulled_down():
    """CE only ever raises the gold probability; ALM lowers it where the student is surer than the teacher."""
    vocab, dt = 4, 4
    head = TeacherHead(torch.eye(vocab, dt))
    hidden = torch.zeros(1, 2, dt)  # uniform teacher: pT(gold) = 0.25
    labels = torch.tensor([[-100, 0]])
    logits = torch.tensor([[[0.0] * vocab, [4.0, 0.0, 0.0, 0.0]]], requires_grad=True)  # pS(gold) ~ 0.95
    chunks = torch.tensor([[[False, False], [False, True]]])
    out = chunk_likelihood_loss(logits, labels, hidden, labels, head, chunks, kd_rate=1.0)
    (grad,) = torch.autograd.grad(out.kd, logits)
    assert float(grad[0, 1, 0]) > 0  # a descent step lowers the gold logit
    b = math.exp(4) / (math.exp(4) + 3)
    want = 0.25 * math.log(0.25 / b) + 0.75 * math.log(0.75 / (1 - b))
    assert out.kd.item() == pytest.approx(want, rel=1e-5)


def test_log1mexp_is_accurate_at_both_ends():
    x = torch.tensor([-1e-8, -1e-3, -0.5, -0.7, -5.0, -40.0], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), torch.log(-torch.expm1(x)))
    assert torch.isfinite(log1mexp(torch.tensor([-1e-6]))).all()
