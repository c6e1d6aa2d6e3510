"""pipeline/teacher_store.py: an example's teacher view as cache-teacher wrote it, and its full-vocabulary
distribution rebuilt from the stored head equal to the teacher's own (Gemma-3's soft-capping included), in blocks
of at most the rows asked; the same from an fsspec URL; picklable for DataLoader workers."""
from __future__ import annotations

import pickle
from pathlib import Path

import fsspec
import pytest
import torch

from dskd_pipe.pipeline import teacher_store
from dskd_pipe.pipeline.data import build_sequence, load_examples
from dskd_pipe.pipeline.models import eos_token_id, load_causal_lm, load_tokenizer
from dskd_pipe.pipeline.teacher_store import TeacherExample, open_store

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DATA = str(FIXTURES / "data" / "dolly_train_40.jsonl")


@pytest.fixture()
def gemma(tiny_store):
    """A tiny Gemma-3 teacher (final logit soft-capping at 30, embedding scale sqrt(d)) and its store."""
    return tiny_store("gemma3", "gpt2")


def _teacher_log_probs(folder, ids: torch.Tensor) -> torch.Tensor:
    model = load_causal_lm(str(folder), dtype=torch.float32, device="cpu")
    with torch.no_grad():
        return torch.log_softmax(model(ids[None]).logits[0].float(), dim=-1)  # [T, V]


def test_an_example_is_the_teachers_tokenisation_of_the_stored_text(gemma):
    store = open_store(gemma["store"])
    tok = load_tokenizer(str(gemma["teacher"]))
    records = load_examples(DATA, limit=6)
    assert len(store) == 6 and store.lengths == {"max_prompt_length": 256, "max_length": 48}
    for i in (0, 5):
        ex = store[i]
        seq = build_sequence(tok, records[i].prompt, records[i].response, eos_token_id(tok), 256, 48)
        assert isinstance(ex, TeacherExample) and ex.index == i
        assert ex.ids.tolist() == seq.ids and ex.offsets.tolist() == [list(o) for o in seq.offsets]
        assert (ex.prompt, ex.response, ex.prompt_len) == (records[i].prompt, records[i].response, seq.prompt_len)
        assert ex.hidden.shape == (len(seq.ids), 32) and ex.hidden.dtype == torch.float32
        assert ex.text == records[i].prompt + records[i].response  # what the offsets index
    with pytest.raises(IndexError, match=f"example 6 out of range: {gemma['store']} holds 6 examples"):
        store[6]


def test_log_probs_are_the_teachers_own(gemma):
    store = open_store(gemma["store"])
    ex = store[2]
    want = _teacher_log_probs(gemma["teacher"], ex.ids)  # [T, V], the HF model's soft-capped logits
    got = store.log_probs(ex)
    assert got.shape == want.shape == (ex.ids.shape[0], store.vocab_size) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    assert float((got.exp().sum(-1) - 1).abs().max()) < 1e-4
    assert store.head.final_logit_softcap == 30.0 and store.embed_scale == pytest.approx(32 ** 0.5)
    torch.testing.assert_close(store.log_probs(2, rows=[0, 3, 7]), want[[0, 3, 7]], rtol=0, atol=2e-5)
    torch.testing.assert_close(store.log_probs(ex, rows=slice(4, 9), temperature=2.0),
                               torch.log_softmax(store.logits(ex, rows=slice(4, 9)) / 2.0, dim=-1))


def test_blocks_never_exceed_the_rows_asked_and_topk_matches_the_full_distribution(gemma, monkeypatch):
    store = open_store(gemma["store"])
    ex = store[1]
    full = store.log_probs(ex)
    seen = []
    real = teacher_store.teacher_logits

    def recording(hidden, head):
        seen.append(hidden.shape[0])
        return real(hidden, head)

    monkeypatch.setattr(teacher_store, "teacher_logits", recording)
    blocks = list(store.iter_log_probs(ex, max_rows=7))
    assert [start for start, _ in blocks] == list(range(0, ex.ids.shape[0], 7))
    torch.testing.assert_close(torch.cat([b for _, b in blocks]), full, rtol=0, atol=0)
    seen.clear()
    values, ids = store.topk(ex, k=4, max_rows=5)
    assert seen and max(seen) <= 5 and sum(seen) == ex.ids.shape[0]  # never a [T, V] tensor
    want_values, want_ids = full.topk(4, dim=-1)
    torch.testing.assert_close(values, want_values, rtol=0, atol=0)
    assert torch.equal(ids, want_ids) and ids.dtype == torch.int64


def test_an_fsspec_url_reads_the_same_and_the_store_pickles_without_its_head(gemma):
    fs = fsspec.filesystem("memory")
    root = Path(gemma["store"])
    for p in root.rglob("*"):
        if p.is_file():
            fs.pipe(f"/teacher_store_test/{p.relative_to(root)}", p.read_bytes())
    local, remote = open_store(gemma["store"]), open_store("memory://teacher_store_test")
    assert torch.equal(remote[4].hidden, local[4].hidden) and remote[4].prompt == local[4].prompt
    torch.testing.assert_close(remote.log_probs(4, rows=slice(0, 3)), local.log_probs(4, rows=slice(0, 3)),
                               rtol=0, atol=0)
    assert local.head is not None
    copy = pickle.loads(pickle.dumps(local))
    assert copy._head is None and torch.equal(copy[4].ids, local[4].ids)
    assert repr(local).startswith(f"TeacherStore('{gemma['store']}': 6 examples, ")
