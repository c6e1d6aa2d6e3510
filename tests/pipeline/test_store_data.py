"""pipeline/store_data.py: a Dataset over a store for another tokenizer (the student's sequences as the pipeline
builds them), the collate with a method's alignment extras and the label offsets, DataLoader workers, and the
held-out loss."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from dskd_pipe.pipeline.loader import teacher_hidden
from dskd_pipe.pipeline import methods
from dskd_pipe.pipeline.data import build_sequence
from dskd_pipe.pipeline.models import eos_token_id, load_tokenizer
from dskd_pipe.pipeline.objectives.divergences import cross_entropy_sum
from dskd_pipe.pipeline.store_data import OFFSET_PAD, StoreDataset, held_out_loss, store_collate
from dskd_pipe.pipeline.teacher_store import open_store

@pytest.fixture()
def env(tiny_store):
    """A tiny Llama teacher (Llama-2 tokenizer) cached over 6 examples, and a tiny GPT-2 student."""
    built = tiny_store("llama", "llama2", d_model=16)
    return {"store": open_store(built["store"]), "student": built["student"], "tok": load_tokenizer(built["student"])}


def test_items_carry_both_tokenisations_at_the_stores_lengths(env):
    store, tok = env["store"], env["tok"]
    data = StoreDataset(store, tok, indices=[4, 1])
    assert len(data) == 2
    item = data[0]
    ex = store[4]
    seq = build_sequence(tok, ex.prompt, ex.response, eos_token_id(tok), 256, 48)  # the store's limits
    assert item["example_id"] == 4 and item["ids"] == ex.ids.tolist() and torch.equal(item["hidden"], ex.hidden)
    assert (item["student_ids"], item["student_prompt_len"]) == (seq.ids, seq.prompt_len)
    assert item["student_offsets"] == seq.offsets
    assert len(StoreDataset(store, tok, max_length=20)[0]["student_ids"]) == 20
    assert len(StoreDataset(store, tok)) == 6
    with pytest.raises(IndexError, match="example 9 out of range: .* holds 6 examples"):
        StoreDataset(store, tok, indices=[0, 9])


def test_collate_adds_the_methods_extras_and_the_label_offsets(env):
    store, tok = env["store"], env["tok"]
    data = StoreDataset(store, tok)
    items = [data[k] for k in range(3)]
    batch = store_collate(store, tok, method="alm", offsets=True)(items)
    plain = store_collate(store, tok)(items)
    assert "teacher_chunk" not in plain and "label_offsets" not in plain
    for name, t in plain.items():
        assert torch.equal(batch[name], t), name
    # ALM's chunk ids are the ones `distill --method alm` builds (methods.chunk_id_extras) on the same items.
    want = methods.chunk_id_extras(items, [r.tolist() for r in batch["teacher_labels"]],
                                   [r.tolist() for r in batch["labels"]])
    for name in ("teacher_chunk", "student_chunk"):
        assert torch.equal(batch[name], want[name]) and int((batch[name] >= 0).sum()) > 10
    # label_offsets[b, k]: the span of the token position k is trained to predict (ids[k + 1]), -1 on pads.
    for b, it in enumerate(items):
        n = len(it["student_ids"]) - 1
        assert batch["label_offsets"][b, :n].tolist() == [list(o) for o in it["student_offsets"][1:]]
        assert (batch["label_offsets"][b, n:] == OFFSET_PAD).all()
        m = len(it["ids"]) - 1
        assert batch["teacher_label_offsets"][b, :m].tolist() == it["offsets"][1:].tolist()
    mined = store_collate(store, tok, method="mined")(items)
    assert {"align_teacher_pos", "align_student_pos"} <= mined.keys()
    with pytest.raises(KeyError, match="--method 'nope': choose one of sft, kd"):
        store_collate(store, tok, method="nope")


def test_a_dataloader_with_a_worker_gives_the_same_batches(env):
    store, tok = env["store"], env["tok"]
    data = StoreDataset(store, tok)
    collate = store_collate(store, tok, method="alm")
    here = list(DataLoader(data, batch_size=4, collate_fn=collate))
    there = list(DataLoader(data, batch_size=4, collate_fn=collate, num_workers=1))
    assert len(here) == len(there) == 2
    for a, b in zip(here, there):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name
    hidden = teacher_hidden(here[0])  # [B, T, d], zeros on pads
    assert hidden.shape == (*here[0]["teacher_input_ids"].shape, 16)
    assert torch.equal(hidden[0, :len(data[0]["ids"]) - 1], data[0]["hidden"][:-1])


def test_held_out_loss_is_the_students_cross_entropy_per_supervised_token(env):
    from transformers import AutoModelForCausalLM

    store, tok = env["store"], env["tok"]
    batches = list(DataLoader(StoreDataset(store, tok), batch_size=4, collate_fn=store_collate(store, tok)))
    model = AutoModelForCausalLM.from_pretrained(str(env["student"]))
    model.train()
    with torch.no_grad():
        model.eval()
        total = sum(float(cross_entropy_sum(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                                            .logits, b["labels"])) for b in batches)
        model.train()
    n = sum(int((b["labels"] != -100).sum()) for b in batches)
    assert held_out_loss(model, batches) == pytest.approx(total / n, rel=1e-6)
    assert model.training  # left as it was
