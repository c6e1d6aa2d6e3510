"""pipeline/probes.py: ground-truth chunks on real tokenizer pairs, alignment accuracy on hand-checked matrices,
and cma_attention equal to the attention inside dskd_cma_loss."""
import math

import pytest
import torch

from dskd_pipe.pipeline.data import build_sequence
from dskd_pipe.pipeline.models import eos_token_id, load_tokenizer
from dskd_pipe.pipeline.objectives.dskd import build_projectors, cross_model_attention
from dskd_pipe.pipeline.probes import alignment_accuracy, alignment_counts, chunk_alignment, cma_attention, \
    label_offsets

TOK = "tests/fixtures/tokenizers"
PROMPT, RESPONSE = "Say it:", " Unbelievable weather, isn't it?"


def _seq(name):
    tok = load_tokenizer(f"{TOK}/{name}")
    return build_sequence(tok, PROMPT, RESPONSE, eos_token_id(tok))


def _mask(seq):
    _, labels = seq.inputs_and_labels()
    return torch.tensor(labels) != -100


def _blocks(chunks):
    """The chunk structure as (student label positions, teacher label positions) per block, in order."""
    out, seen = [], set()
    for i in range(chunks.shape[0]):
        cols = tuple(torch.nonzero(chunks[i]).flatten().tolist())
        if cols and cols not in seen:
            seen.add(cols)
            rows = tuple(torch.nonzero(chunks[:, list(cols)].all(-1)).flatten().tolist())
            out.append((rows, cols))
    return out


def test_chunks_gpt2_student_qwen2_teacher():
    # gpt2:  Say| it|:| Un|bel|iev|able| weather|,| isn|'t| it|?|EOS   (label k = token k+1; response from label 2)
    # qwen2: Say| it|:| Un|belie|vable| weather|,| isn|'t| it|?|EOS
    s, t = _seq("gpt2"), _seq("qwen2")
    chunks = chunk_alignment(label_offsets(t.offsets), label_offsets(s.offsets), _mask(t), _mask(s))
    assert chunks.shape == (13, 12)
    expected = [((2,), (2,)),            # " Un"
                ((3, 4, 5), (3, 4)),     # "bel iev able" x "belie vable"
                ((6,), (5,)), ((7,), (6,)), ((8,), (7,)), ((9,), (8,)), ((10,), (9,)), ((11,), (10,)),
                ((12,), (11,))]          # EOS with EOS
    assert _blocks(chunks) == expected
    assert int(chunks.sum()) == 1 + 6 + 7
    assert not chunks[:2].any() and not chunks[:, :2].any()  # prompt label positions never take part


def test_chunks_gpt2_student_llama2_teacher():
    # llama2 splits "'t" into "'" and "t": one gpt2 token x two llama tokens; the rest is one to one.
    s, t = _seq("gpt2"), _seq("llama2")
    chunks = chunk_alignment(label_offsets(t.offsets), label_offsets(s.offsets), _mask(t), _mask(s))
    assert chunks.shape == (13, 14)
    expected = [((k,), (k,)) for k in range(2, 9)] + [((9,), (9, 10)), ((10,), (11,)), ((11,), (12,)),
                                                      ((12,), (13,))]
    assert _blocks(chunks) == expected


def test_chunks_edge_cases():
    on = torch.ones(4, dtype=torch.bool)
    # Byte-split character: two teacher tokens with the same span (2, 3) join the chunk ending at 3.
    chunks = chunk_alignment([[0, 2], [2, 3], [2, 3], [3, 3]], [[0, 3], [3, 4], [4, 4], [4, 4]][:4], on, on)
    assert chunks[0].tolist() == [True, True, True, False]
    # A truncated tail (ends never meet) gets no chunk; the masked-out position is skipped.
    chunks = chunk_alignment([[0, 2], [2, 5], [5, 7], [7, 9]], [[0, 2], [2, 4], [9, 9], [4, 6]],
                             on, torch.tensor([True, True, False, True]))
    assert chunks.tolist() == [[True, False, False, False], [False, False, False, False],
                               [False, False, False, False], [False, False, False, False]]


def test_alignment_accuracy_by_hand():
    attn = torch.tensor([[0.7, 0.2, 0.1],
                         [0.5, 0.3, 0.2],
                         [0.1, 0.1, 0.8],
                         [0.3, 0.3, 0.4]])
    chunks = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 1, 1], [0, 0, 1]], dtype=torch.bool)
    mask = torch.tensor([True, True, True, False])  # row 3 is not a response token
    acc, mass = alignment_accuracy(attn, chunks, mask)
    # argmax hits: row0 col0 yes, row1 col0 no, row2 col2 yes -> 2/3; mass (0.7 + 0.5 + 0.9) / 3
    assert acc == pytest.approx(2 / 3)
    assert mass == pytest.approx(0.7, abs=1e-6)
    assert alignment_counts(attn, chunks, mask) == (2, pytest.approx(2.1), 3)
    no_chunk = torch.zeros_like(chunks)
    assert all(math.isnan(x) for x in alignment_accuracy(attn, no_chunk, mask))


def test_cma_attention_is_the_loss_attention():
    torch.manual_seed(0)
    b, s, t, ds, dt, vs, vt = 2, 5, 6, 8, 12, 20, 30
    labels = torch.tensor([[-100, 3, 4, 5, -100], [-100, -100, 7, 8, 9]])
    t_labels = torch.tensor([[-100, 1, 2, 3, 4, -100], [-100, -100, 5, 6, 7, 8]])
    batch = {"input_ids": torch.randint(0, vs, (b, s)), "labels": labels,
             "teacher_input_ids": torch.randint(0, vt, (b, t)), "teacher_labels": t_labels,
             "teacher_hidden": torch.randn(b, t, dt), "teacher_attention_mask": torch.tensor([[1] * 6, [1] * 5 + [0]])}
    hs, es, et = torch.randn(b, s, ds), torch.randn(vs, ds), torch.randn(vt, dt)
    proj = build_projectors(ds, dt, with_query=True)
    got = cma_attention(batch, hs, es, et, proj)
    ref = cross_model_attention(hs, labels, batch["input_ids"], es, batch["teacher_input_ids"], t_labels,
                                batch["teacher_hidden"], et, proj,
                                teacher_attention_mask=batch["teacher_attention_mask"].bool()).a_t2s
    assert got.shape == (b, s, t) and torch.equal(got, ref.detach())
    padded = cross_model_attention(hs, labels, batch["input_ids"], es, batch["teacher_input_ids"], t_labels,
                                   batch["teacher_hidden"], et, proj).a_t2s  # a run trained with --cma-std padded
    assert torch.equal(cma_attention(batch, hs, es, et, proj, cma_std="padded"), padded.detach())
    assert not torch.equal(got, padded.detach())
    rows = got[labels != -100]
    assert torch.allclose(rows.sum(-1), torch.ones(rows.shape[0]))
    assert float(got[0][labels[0] != -100][:, t_labels[0] == -100].max()) < 1e-30  # masked teacher columns
