"""MinED and ULD against hand-checked values and straightforward re-implementations of spec/other_methods.md."""

import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dskd_pipe.pipeline.alignment import EtaPairs
from dskd_pipe.pipeline.models import load_tokenizer
from dskd_pipe.pipeline.objectives import baselines
from dskd_pipe.pipeline.objectives.baselines import (
    UNMAPPED_LOGIT,
    edit_distance_matrix,
    first_teacher_per_student,
    mined_alignment,
    mined_loss,
    mined_pairs_for_batch,
    mined_token_map,
    uld_loss,
)
from dskd_pipe.pipeline.objectives.dskd import TeacherHead

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "tokenizers"


def _levenshtein(a: bytes, b: bytes) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


# ----------------------------------------------------------------------------------------------------------
# Edit distance and the token map
# ----------------------------------------------------------------------------------------------------------


def test_edit_distance_matrix_equals_plain_levenshtein():
    rng = random.Random(0)
    words = [bytes(rng.choice(b"abcd") for _ in range(rng.randint(0, 7))) for _ in range(40)]
    got = edit_distance_matrix(words[:20], words[20:])
    for i, a in enumerate(words[:20]):
        for j, b in enumerate(words[20:]):
            assert got[i, j] == _levenshtein(a, b), (a, b)
    assert edit_distance_matrix([b"kitten"], [b"sitting", b"kitten", b""]).tolist() == [[3, 0, 6]]


def test_bucketed_search_finds_the_minimum_within_the_first_byte_bucket():
    students = [b"", b"international", b"intern", b"xinternationalization", b"i", b"interna"]
    ids, dist = baselines._search_candidates([b"internationalization", b"intern"], students)
    # "international" (13 bytes) is 7 edits away: outside the first +-2 length window, found by the widening pass
    assert ids.tolist() == [1, 2] and dist.tolist() == [7, 0]


@pytest.fixture(scope="module")
def llama2_gpt2(tmp_path_factory):
    cache = tmp_path_factory.mktemp("mined")
    teacher, student = load_tokenizer(str(FIXTURES / "llama2")), load_tokenizer(str(FIXTURES / "gpt2"))
    return teacher, student, cache, mined_token_map(teacher, student, cache_dir=cache)


def test_token_map_llama_to_gpt2_hand_checked(llama2_gpt2):
    teacher, student, _, table = llama2_gpt2
    assert table.shape == (len(teacher),) and table.dtype == torch.long and int(table.min()) >= 0

    def mapped(tok):
        return student.convert_ids_to_tokens(int(table[teacher.convert_tokens_to_ids(tok)]))

    assert mapped("▁the") == "Ġthe"  # "▁" and "Ġ" both decode to a space
    assert mapped("the") == "the"
    assert mapped("</s>") == "<|endoftext|>"  # EOS -> EOS
    assert mapped("<0x0A>") == "Ċ"  # byte fallback "\n" == byte-level "\n"
    s_strings = baselines.TokenStrings(student)
    t_strings = baselines.TokenStrings(teacher)
    for tok in ("▁Washington", "ing", "▁hello"):
        t_id = teacher.convert_tokens_to_ids(tok)
        assert s_strings.eta_one(int(table[t_id])) == t_strings.eta_one(t_id)  # exact normalised match exists


def test_token_map_cache_is_reused(llama2_gpt2, monkeypatch):
    teacher, student, cache, table = llama2_gpt2
    files = list(cache.glob("mined_token_map_*.safetensors"))
    assert len(files) == 1

    def no_search(*args, **kwargs):
        raise AssertionError("the cached map should have been loaded, not recomputed")

    monkeypatch.setattr(baselines, "_search_candidates", no_search)
    again = mined_token_map(teacher, student, cache_dir=cache)
    assert torch.equal(again, table)


def test_token_map_qwen_and_gpt2_share_byte_level_strings(tmp_path):
    # gpt2 -> qwen2 is all exact matches (fast); qwen2 -> gpt2 takes ~35 s and is measured in bench, not here.
    teacher, student = load_tokenizer(str(FIXTURES / "gpt2")), load_tokenizer(str(FIXTURES / "qwen2"))
    table = mined_token_map(teacher, student)
    for tok in ("Ġthe", "the", "ĠWashington", "Ċ"):
        assert student.convert_ids_to_tokens(int(table[teacher.convert_tokens_to_ids(tok)])) == tok
    assert int(table[teacher.eos_token_id]) == student.eos_token_id


def test_first_teacher_per_student():
    token_map = torch.tensor([2, 0, 2, 1, 0])
    assert first_teacher_per_student(token_map, 4).tolist() == [1, 3, 0, -1]


# ----------------------------------------------------------------------------------------------------------
# DTW alignment
# ----------------------------------------------------------------------------------------------------------


def test_mined_alignment_hand_example():
    # teacher: "inter" "national" "ly" "</s>"; student: "international" "ly" "</s>"
    teacher = [b"inter", b"national", b"ly", b"</s>"]
    student = [b"international", b"ly", b"<|endoftext|>"]
    # DTW path (0,0) (1,0) (2,1) (3,2): student 0 is matched twice, so only (2,1) and (3,2) are 1-to-1
    assert mined_alignment(teacher, student) == [(2, 1), (3, 2)]
    assert mined_alignment([b"a", b"b"], [b"a", b"b"]) == [(0, 0), (1, 1)]
    assert mined_alignment([], [b"a"]) == []


def test_mined_pairs_for_batch_uses_label_positions():
    teacher = load_tokenizer(str(FIXTURES / "llama2"))
    student = load_tokenizer(str(FIXTURES / "gpt2"))
    t_ids = teacher("Hello world", add_special_tokens=False)["input_ids"] + [teacher.eos_token_id]
    s_ids = student("Hello world", add_special_tokens=False)["input_ids"] + [student.eos_token_id]
    t_labels = [[-100] * 2 + t_ids]
    s_labels = [[-100] * 3 + s_ids]
    pairs = mined_pairs_for_batch(t_labels, s_labels, teacher, student)
    b, tp, sp = pairs.flat()
    assert len(tp) == len(s_ids) == len(t_ids)  # same segmentation here: every token aligns 1-to-1
    assert tp.tolist() == [2 + k for k in range(len(t_ids))]
    assert sp.tolist() == [3 + k for k in range(len(s_ids))]


# ----------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------


def _naive_fkl(p_logits, q_logits, tau):
    p = torch.softmax(p_logits.double() / tau, -1)
    log_q = torch.log_softmax(q_logits.double() / tau, -1)
    log_p = torch.log_softmax(p_logits.double() / tau, -1)
    return float(torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum())


def _mined_setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    vs, vt, dt = 6, 9, 4
    zs = torch.randn(2, 5, vs, generator=g, requires_grad=True)
    labels = torch.tensor([[-100, 1, 2, 3, 5], [-100, -100, 4, 0, -100]])
    ht = torch.randn(2, 6, dt, generator=g, requires_grad=True)
    wt = torch.randn(vt, dt, generator=g, requires_grad=True)
    bt = torch.randn(vt, generator=g)
    t_labels = torch.tensor([[-100, -100, 3, 4, 7, 8], [-100, 6, 0, 1, -100, -100]])
    token_map = torch.tensor([0, 4, 0, 1, 2, 2, 4, 3, 5])  # teacher id -> student id; student 0 <- teacher 0 and 2
    pairs = EtaPairs(torch.tensor([[2, 3, 4, 5], [1, 2, 3, -1]]), torch.tensor([[1, 2, 3, 4], [2, 3, 4, -1]]))
    return zs, labels, ht, wt, bt, t_labels, token_map, pairs


def test_mined_loss_matches_a_plain_reimplementation():
    zs, labels, ht, wt, bt, t_labels, token_map, pairs = _mined_setup()
    head = TeacherHead(wt, bt, logit_scale=0.5)
    tau, lam = 2.0, 0.3
    out = mined_loss(zs, labels, ht, t_labels, head, pairs, token_map, kd_rate=lam, tau=tau, chunk_tokens=1)

    vs = zs.shape[-1]
    first = {}
    for t, s in enumerate(token_map.tolist()):
        first.setdefault(s, t)
    aligned = {}
    for b in range(2):
        for a in range(pairs.teacher_pos.shape[1]):
            i, j = int(pairs.teacher_pos[b, a]), int(pairs.student_pos[b, a])
            if i < 0 or labels[b, j] < 0 or t_labels[b, i] < 0:
                continue
            if int(token_map[t_labels[b, i]]) == int(labels[b, j]):
                aligned[(b, j)] = i
    # by hand: (0,1)<-(0,2): map[3]=1==1 yes; (0,2)<-(0,3): map[4]=2==2 yes; (0,3)<-(0,4): map[7]=3==3 yes;
    # (0,4)<-(0,5): map[8]=5==5 yes; (1,2)<-(1,1): map[6]=4==4 yes; (1,3)<-(1,2): map[0]=0==0 yes; (1,4): label -100
    assert len(aligned) == 6
    kd, ce = 0.0, 0.0
    for b in range(2):
        for j in range(5):
            y = int(labels[b, j])
            if y < 0:
                continue
            ce += -float(torch.log_softmax(zs[b, j].detach().double(), -1)[y])
            if (b, j) in aligned:
                zt = ((ht[b, aligned[(b, j)]] @ wt.T + bt) * 0.5).detach()
                target = torch.tensor([float(zt[first[s]]) if s in first else UNMAPPED_LOGIT for s in range(vs)])
            else:
                target = torch.full((vs,), UNMAPPED_LOGIT)
                target[y] = 0.0
            kd += _naive_fkl(target, zs[b, j].detach(), tau)
    assert int(out.aligned) == 6 and int(out.n_student) == 6
    assert math.isclose(float(out.ce_student.detach()), ce, rel_tol=1e-5)
    assert math.isclose(float(out.kd.detach()), kd, rel_tol=1e-5)
    assert math.isclose(float(out.loss.detach()), (1 - lam) * ce + lam * kd, rel_tol=1e-5)


def test_mined_loss_mismatched_token_gets_one_hot_and_gradient_only_into_student():
    zs, labels, ht, wt, bt, t_labels, token_map, pairs = _mined_setup(1)
    token_map = token_map.clone()
    token_map[3] = 2  # the pair (0,2)->(0,1) now disagrees: that position falls back to the one-hot target
    out = mined_loss(zs, labels, ht, t_labels, TeacherHead(wt, bt), pairs, token_map)
    assert int(out.aligned) == 5
    out.loss.backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert ht.grad is None and wt.grad is None


def test_uld_sorted_distribution_by_hand():
    # one student position, Vs = 2; one teacher position, Vt = 3; tau 1
    zs = torch.log(torch.tensor([[[0.3, 0.7]]])).requires_grad_(True)  # p_s sorted: [0.7, 0.3]
    labels = torch.tensor([[1]])
    ht = torch.eye(3)[None, :1]  # [1, 1, 3]: logits = row 0 of W^T
    wt = torch.log(torch.tensor([0.2, 0.5, 0.3]))[:, None] * torch.tensor([[1.0, 0.0, 0.0]])  # [3, 3]
    t_labels = torch.tensor([[2]])
    out = uld_loss(zs, labels, ht, t_labels, TeacherHead(wt), kd_rate=0.5)
    # p_t sorted [0.5, 0.3, 0.2]; |0.7-0.5| + |0.3-0.3| + |0-0.2| = 0.4
    assert math.isclose(float(out.kd.detach()), 0.4, abs_tol=1e-6)
    ce = -math.log(0.7)
    assert math.isclose(float(out.loss.detach()), 0.5 * ce + 0.5 * 0.4, rel_tol=1e-6)


def test_uld_matches_a_plain_reimplementation_and_chunks():
    g = torch.Generator().manual_seed(3)
    zs = torch.randn(2, 6, 5, generator=g, requires_grad=True)
    labels = torch.tensor([[-100, -100, 1, 2, 3, -100], [-100, 4, 0, 1, 2, 3]])
    ht = torch.randn(2, 7, 3, generator=g, requires_grad=True)
    wt = torch.randn(8, 3, generator=g, requires_grad=True)
    t_labels = torch.tensor([[-100, 5, 6, 7, 1, 2, 0], [-100, -100, -100, -100, 3, 4, -100]])
    head = TeacherHead(wt)
    out = uld_loss(zs, labels, ht, t_labels, head, kd_rate=0.25, chunk_tokens=2)
    full = uld_loss(zs, labels, ht, t_labels, head, kd_rate=0.25, chunk_tokens=1000)
    want = 0.0
    for b in range(2):
        s_pos = [k for k in range(6) if labels[b, k] != -100]
        t_pos = [k for k in range(7) if t_labels[b, k] != -100]
        for k in range(min(len(s_pos), len(t_pos))):
            ps = sorted(torch.softmax(zs[b, s_pos[k]].double(), -1).tolist(), reverse=True)
            pt = sorted(torch.softmax((ht[b, t_pos[k]] @ wt.T).double(), -1).tolist(), reverse=True)
            ps += [0.0] * (len(pt) - len(ps))
            want += sum(abs(x - y) for x, y in zip(ps, pt))
    assert int(out.kd_positions) == 3 + 2
    assert math.isclose(float(out.kd.detach()), want, rel_tol=1e-5)
    torch.testing.assert_close(out.loss, full.loss)
    ce = float(F.cross_entropy(zs.detach().reshape(-1, 5), labels.reshape(-1), ignore_index=-100, reduction="sum"))
    assert math.isclose(float(out.loss.detach()), 0.75 * ce + 0.25 * want, rel_tol=1e-5)
    out.loss.backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert ht.grad is None and wt.grad is None
