"""prefix-kd (pipeline/objectives/prefix_kd.py): next-text distributions summed by event and matched at the shared
boundaries. Against a loop over hand-cut cases (values and gradients), on real tokenizers (the boundaries are where
both sides predict the same next character), and the cases the formula implies."""
import pytest
import torch
import torch.nn.functional as F

from dskd_pipe.pipeline.alignment import blank_mask, next_text_events
from dskd_pipe.pipeline.data import build_sequence
from dskd_pipe.pipeline.models import eos_token_id, load_tokenizer
from dskd_pipe.pipeline.objectives.dskd import TeacherHead
from dskd_pipe.pipeline.objectives.prefix_kd import event_log_probs, prefix_kd_loss, shared_boundaries
from dskd_pipe.pipeline.probes import chunk_ids, label_offsets

TOK = "tests/fixtures/tokenizers"
# 6 teacher tokens, 5 student tokens over 3 events; teacher token 5 and student token 4 belong to none (-1)
TEACHER_EVENTS = torch.tensor([0, 1, 1, 2, 2, -1])
STUDENT_EVENTS = torch.tensor([0, 1, 2, 2, -1])


def test_shared_boundaries_by_hand():
    """The first non-blank label position of every chunk on each side; a chunk blank on one side gives none."""
    teacher_chunk = torch.tensor([[-1, 0, 0, 1, 2, 2, 3], [-1, -1, 0, 1, 1, -1, -1]])
    student_chunk = torch.tensor([[-1, 0, 1, 1, 2, 3], [-1, 0, 1, -1, -1, -1]])
    teacher_blank = torch.zeros(2, 7, dtype=torch.bool)
    teacher_blank[0, 1] = True  # chunk 0 of example 0 starts with a newline token on the teacher side
    teacher_blank[0, 3] = True  # chunk 1: the teacher's only token is whitespace: no boundary
    student_blank = torch.zeros(2, 6, dtype=torch.bool)
    t, s = shared_boundaries(teacher_chunk, student_chunk, teacher_blank, student_blank)
    assert t.tolist() == [[0, 2], [0, 4], [0, 6], [1, 2], [1, 3]]
    assert s.tolist() == [[0, 1], [0, 4], [0, 5], [1, 1], [1, 2]]


def _event_probs_loop(logits, events, n_events, tau):
    p = F.softmax(logits.double() / tau, -1)
    out = torch.zeros(logits.shape[0], n_events, dtype=torch.float64)
    for v, e in enumerate(events.tolist()):
        if e >= 0:
            out[:, e] += p[:, v]
    return out / out.sum(-1, keepdim=True)


@pytest.mark.parametrize("tau,temper", [(1.0, "events"), (2.0, "events"), (2.0, "tokens")])
def test_values_and_gradients_equal_a_loop_over_boundaries(tau, temper):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 4, 5, generator=g)).requires_grad_()
    hidden = torch.randn(2, 5, 3, generator=g)
    head = TeacherHead(torch.randn(6, 3, generator=g))
    t_pos = torch.tensor([[0, 1], [0, 3], [1, 0]])
    s_pos = torch.tensor([[0, 0], [0, 2], [1, 3]])
    out = prefix_kd_loss(logits, hidden, head, t_pos, s_pos, TEACHER_EVENTS, STUDENT_EVENTS, 3, tau=tau,
                         temper=temper)
    want = 0.0
    for (tb, ti), (sb, si) in zip(t_pos.tolist(), s_pos.tolist()):
        token_tau = tau if temper == "tokens" else 1.0
        pt = _event_probs_loop((hidden[tb, ti] @ head.weight.T)[None], TEACHER_EVENTS, 3, token_tau)[0]
        ps = _event_probs_loop(logits[sb, si][None], STUDENT_EVENTS, 3, token_tau)[0]
        if temper == "events":  # P(e)^(1/tau), renormalised
            pt, ps = pt ** (1 / tau) / (pt ** (1 / tau)).sum(), ps ** (1 / tau) / (ps ** (1 / tau)).sum()
        want = want + (pt * (pt.log() - ps.log())).sum()
    torch.testing.assert_close(out.kd, want.float(), rtol=1e-5, atol=1e-6)
    assert int(out.boundaries) == 3
    (got,) = torch.autograd.grad(out.kd, logits)
    (ref,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(got, ref.float(), rtol=1e-4, atol=1e-6)
    assert got[1, :3].abs().max() == 0 and got[0, 1].abs().max() == 0  # positions that are no boundary: no gradient


def test_event_log_probs_are_stable_far_apart_and_renormalised():
    """Logits 1000 apart: a naive exp under- and overflows; excluded tokens (-1) carry no mass."""
    logits = torch.tensor([[1000.0, 0.0, -1000.0, 5.0, 2000.0]])
    lp = event_log_probs(logits, STUDENT_EVENTS, 3)
    assert torch.isfinite(lp[0, :2]).all() and lp[0, 0] == 0.0 and lp[0, 1] < -999
    torch.testing.assert_close(lp.exp().sum(), torch.tensor(1.0))


def test_a_student_with_the_teachers_event_distribution_adds_nothing():
    """Different vocabularies, the same distribution over events: KL 0 and no gradient."""
    g = torch.Generator().manual_seed(3)
    hidden, head = torch.randn(1, 2, 3, generator=g), TeacherHead(torch.randn(6, 3, generator=g))
    pt = _event_probs_loop(hidden[0] @ head.weight.T, TEACHER_EVENTS, 3, 1.0)  # [2, 3]
    # student: one token per event 0 and 1, two equal tokens for event 2, token 4 outside (any logit)
    zs = torch.stack([pt[:, 0].log(), pt[:, 1].log(), (pt[:, 2] / 2).log(), (pt[:, 2] / 2).log(),
                      torch.full((2,), 7.0, dtype=torch.float64)], -1).float()[None].requires_grad_()
    pos = torch.tensor([[0, 0], [0, 1]])
    out = prefix_kd_loss(zs, hidden, head, pos, pos, TEACHER_EVENTS, STUDENT_EVENTS, 3)
    assert abs(out.kd.item()) < 1e-5
    (grad,) = torch.autograd.grad(out.kd, zs)
    assert float(grad.abs().max()) < 1e-5


def test_events_are_the_next_text_whatever_the_marker():
    """GPT-2's "Ġweather", Llama-2's "▁weather" are one event (and "Ġsunny" / "▁sun" at 3 bytes); EOS is the event 0 on both sides; whitespace-only
    tokens belong to none; every event has tokens on both sides."""
    gpt2, llama = load_tokenizer(f"{TOK}/gpt2"), load_tokenizer(f"{TOK}/llama2")
    vg, vl = gpt2.get_vocab(), llama.get_vocab()
    for chars in (1, 3):
        ev = next_text_events(gpt2, llama, chars)
        assert ev.teacher[vg["Ġweather"]] == ev.student[vl["▁weather"]] >= 1
        assert ev.names[int(ev.teacher[vg["Ġweather"]])] == b"weather"[:chars]
        assert ev.teacher[vg["Ġsunny"]] == ev.student[vl["▁sun"]] != ev.teacher[vg["Ġweather"]]
        assert ev.teacher[gpt2.eos_token_id] == 0 and ev.student[llama.eos_token_id] == 0
        assert ev.teacher[vg["Ġ"]] == -1 and ev.teacher[vg["Ċ"]] == -1 and ev.student[vl["<0x0A>"]] == -1
        for table in (ev.teacher, ev.student):
            assert torch.equal(torch.unique(table[table >= 0]), torch.arange(ev.size))
    assert blank_mask(gpt2)[vg["ĊĊ"]] and not blank_mask(gpt2)[vg["Ġsunny"]]


def test_real_boundaries_predict_the_same_next_character():
    """On a real pair (GPT-2 teacher, Llama-2 student) every boundary's label tokens start at the same non-space
    character of the text, and every chunk of the response gives one."""
    prompt, response = "Say it:\n", " Unbelievable weather, isn't it?\nYes.  Very  sunny."
    gpt2, llama = load_tokenizer(f"{TOK}/gpt2"), load_tokenizer(f"{TOK}/llama2")
    seqs = [build_sequence(t, prompt, response, eos_token_id(t)) for t in (gpt2, llama)]
    (_, t_lab), (_, s_lab) = (s.inputs_and_labels() for s in seqs)
    t_lab, s_lab = torch.tensor(t_lab), torch.tensor(s_lab)
    t_off, s_off = (label_offsets(s.offsets) for s in seqs)
    t_chunk, s_chunk = chunk_ids(t_off, s_off, t_lab != -100, s_lab != -100)
    t_blank = blank_mask(gpt2)[t_lab.clamp_min(0)]
    s_blank = blank_mask(llama)[s_lab.clamp_min(0)]
    t_pos, s_pos = shared_boundaries(t_chunk[None], s_chunk[None], t_blank[None], s_blank[None])
    text = prompt + response

    def first_char(offsets, i):
        start, end = offsets[i].tolist()
        while start < end and text[start].isspace():
            start += 1
        return start

    # every chunk with a non-blank token on both sides gives one boundary (whitespace-only chunks give none)
    chunks = [c for c in range(int(t_chunk.max()) + 1)
              if (~t_blank[t_chunk == c]).any() and (~s_blank[s_chunk == c]).any()]
    assert len(t_pos) == len(chunks) > 10
    for (_, i), (_, j) in zip(t_pos.tolist(), s_pos.tolist()):
        assert first_char(t_off, i) == first_char(s_off, j)
