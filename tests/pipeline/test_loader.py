"""pipeline/loader.py: order from (seed, epoch), the rank split, both tokenisations, collate padding, workers."""
import numpy as np
import pytest
import torch

from dskd_pipe.cache.reader import open_store
from dskd_pipe.pipeline.loader import (Collate, DistillDataset, Side, StoreSource, epoch_order, make_loader,
                                       rank_positions, teacher_hidden)
from dskd_pipe.pipeline.config import CacheConfig
from dskd_pipe.pipeline.data import build_sequence
from dskd_pipe.pipeline.models import eos_token_id, load_tokenizer, pad_token_id, save_tiny_model

TOK = "tests/fixtures/tokenizers"
DATA = "tests/fixtures/data/dolly_train_40.jsonl"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from dskd_pipe.stages.cache_teacher import run

    tmp = tmp_path_factory.mktemp("streaming")
    teacher = save_tiny_model(tmp / "teacher", "qwen2", load_tokenizer(f"{TOK}/qwen2"), d_model=32, layers=1)
    return run(CacheConfig(teacher=str(teacher), data=DATA, out=str(tmp / "store"), limit=10, max_length=64,
                           device="cpu"))


@pytest.fixture(scope="module")
def student_side():
    tok = load_tokenizer(f"{TOK}/gpt2")
    return Side(tok, eos_token_id(tok), pad_token_id(tok), 256, 64)


def test_order_is_a_function_of_seed_and_epoch():
    assert np.array_equal(epoch_order(50, 1, 0), epoch_order(50, 1, 0))
    assert not np.array_equal(epoch_order(50, 1, 0), epoch_order(50, 1, 1))
    assert not np.array_equal(epoch_order(50, 1, 0), epoch_order(50, 2, 0))
    assert sorted(epoch_order(50, 3, 7).tolist()) == list(range(50))


@pytest.mark.parametrize("n,world,rank_batch,start", [(12, 3, 1, 0), (10, 3, 2, 0), (7, 2, 3, 0), (5, 1, 2, 0),
                                                      (23, 2, 4, 8)])
def test_rank_split_is_disjoint_and_covering(n, world, rank_batch, start):
    parts = [rank_positions(n, r, world, rank_batch, start).tolist() for r in range(world)]
    assert sorted(sum(parts, [])) == list(range(start, n))  # nothing repeated, nothing left out


@pytest.mark.parametrize("world,b,k", [(2, 2, 1), (2, 1, 3), (3, 2, 2), (4, 1, 1)])
def test_a_step_takes_the_same_examples_whatever_the_split(world, b, k):
    """N processes x micro-batch b x accumulation k: the examples of each optimizer step are those of one process
    with micro-batch b x accumulation N k, also in the short last step (23 examples)."""
    n, g = 23, world * b * k
    one = rank_positions(n, 0, 1, g)
    ranks = [rank_positions(n, r, world, b * k) for r in range(world)]
    for step in range(-(-n // g)):
        per_rank = [p[step * b * k:(step + 1) * b * k].tolist() for p in ranks]
        assert sum(per_rank, []) == one[step * g:(step + 1) * g].tolist()


def test_items_carry_both_tokenisations_of_the_stored_text(store, student_side):
    reader = open_store(str(store))
    ds = DistillDataset(StoreSource(reader), student_side, seed=3, epoch=1)
    assert [int(i) for i in ds.indices] == epoch_order(10, 3, 1).tolist()
    item = ds[0]
    rec = reader.read(int(ds.indices[0]))
    assert item["ids"] == rec["ids"].tolist() and item["hidden"].shape == (len(item["ids"]), 32)
    want = build_sequence(student_side.tokenizer, rec["prompt"], rec["response"], student_side.eos_id, 256, 64)
    assert item["student_ids"] == want.ids and item["student_prompt_len"] == want.prompt_len
    assert item["ids"] != item["student_ids"]  # qwen2 vs gpt2: the tokenisations differ


def test_resume_start_and_rank_split_of_the_dataset(store, student_side):
    src = StoreSource(open_store(str(store)))
    full = DistillDataset(src, student_side, seed=0, epoch=2)
    tail = DistillDataset(src, student_side, seed=0, epoch=2, start=4)
    assert tail.indices.tolist() == full.indices[4:].tolist()
    halves = [DistillDataset(src, student_side, seed=0, epoch=2, rank=r, world=2).indices.tolist() for r in (0, 1)]
    assert not set(halves[0]) & set(halves[1]) and sorted(halves[0] + halves[1]) == list(range(10))


def test_collate_pads_both_views(store, student_side):
    reader = open_store(str(store))
    ds = DistillDataset(StoreSource(reader), student_side, seed=0, epoch=0)
    items = [ds[0], ds[1], ds[2]]
    batch = Collate(student_side.pad_id, reader.manifest.pad_id)(items)
    hidden = teacher_hidden(batch)  # [B, T, d]
    assert hidden.shape[:2] == batch["teacher_input_ids"].shape
    for b, it in enumerate(items):
        s_len, t_len = len(it["student_ids"]) - 1, len(it["ids"]) - 1
        assert batch["attention_mask"][b].sum() == s_len and batch["teacher_attention_mask"][b].sum() == t_len
        assert (batch["input_ids"][b, s_len:] == student_side.pad_id).all()
        assert (batch["teacher_input_ids"][b, t_len:] == reader.manifest.pad_id).all()
        assert (batch["labels"][b, s_len:] == -100).all() and (batch["teacher_labels"][b, t_len:] == -100).all()
        assert (batch["labels"][b, :it["student_prompt_len"] - 1] == -100).all()
        assert batch["labels"][b, s_len - 1] == student_side.eos_id or s_len + 1 == 64  # EOS unless cut
        torch.testing.assert_close(hidden[b, :t_len], it["hidden"][:t_len])
        assert (hidden[b, t_len:] == 0).all()
    # only the real rows travel: example after example
    assert batch["teacher_hidden_rows"].shape[0] == batch["teacher_attention_mask"].sum()
    first = len(items[0]["ids"]) - 1
    torch.testing.assert_close(batch["teacher_hidden_rows"][first:first + 3], items[1]["hidden"][:3])


def test_workers_stream_the_same_batches(store, student_side):
    reader = open_store(str(store))
    collate = Collate(student_side.pad_id, reader.manifest.pad_id)
    ds = DistillDataset(StoreSource(reader), student_side, seed=5, epoch=0)
    plain = list(make_loader(ds, 3, collate, num_workers=0))
    workers = list(make_loader(ds, 3, collate, num_workers=2))
    assert len(plain) == len(workers) == 4
    assert not any(t.is_shared() for t in plain[0].values())  # made in the training process: private memory
    for a, b in zip(plain, workers):
        assert type(b) is dict and a.keys() == b.keys() and "teacher_hidden_rows" in b
        for k in a:
            assert torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype
        # a worker's batch arrives as one shared buffer (one descriptor to receive), every tensor a view of it
        assert len({t.untyped_storage().data_ptr() for t in b.values()}) == 1
        assert all(t.is_shared() for t in b.values())


def test_a_micro_batch_queues_its_store_reads_first(store, student_side, monkeypatch):
    """The DataLoader asks DistillDataset for a whole micro-batch (__getitems__): its examples' reads are queued at
    once (StoreReader.prefetch of every array they touch), then read; the items are those of __getitem__."""
    from dskd_pipe.cache import shards

    reader = open_store(str(store))
    queued, prefetched = [], []
    monkeypatch.setattr(shards.LocalFiles, "willneed", lambda self, path, off, n: queued.append(path))
    real = reader.prefetch
    monkeypatch.setattr(reader, "prefetch", lambda ids: prefetched.append(list(ids)) or real(ids))
    ds = DistillDataset(StoreSource(reader), student_side, seed=5, epoch=0)
    collate = Collate(student_side.pad_id, reader.manifest.pad_id)
    batches = list(make_loader(ds, 3, collate, num_workers=0))
    assert prefetched == [[int(i) for i in ds.indices[k:k + 3]] for k in range(0, len(ds), 3)]
    assert any("/part-00000/hidden/c/" in p for p in queued)
    assert [int(i) for b in batches for i in b["example_ids"]] == [int(i) for i in ds.indices]
    ks = [4, 1, 7]
    for got, want in zip(ds.__getitems__(ks), [ds[k] for k in ks]):
        assert got["example_id"] == want["example_id"] and torch.equal(got["hidden"], want["hidden"])


def test_a_shared_batch_pickles_as_one_buffer():
    """Collate in a worker fills one shared-memory buffer; pickled as a worker's queue does, it is one storage and
    comes back as a plain dict of equal tensors (bool, int64, bf16, empty ones included)."""
    import io
    import pickle
    from multiprocessing.reduction import ForkingPickler

    from dskd_pipe.pipeline import loader as streaming

    shapes = {"ids": ((2, 3), torch.long), "gold": ((2,), torch.bool), "rows": ((5, 4), torch.bfloat16),
              "none": ((0, 7), torch.long)}
    batch = streaming.shared_batch(shapes)
    batch["ids"].copy_(torch.arange(6).view(2, 3))
    batch["gold"].copy_(torch.tensor([True, False]))
    batch["rows"].copy_(torch.randn(5, 4).to(torch.bfloat16))
    ptrs = {t.untyped_storage().data_ptr() for t in batch.values()}
    assert len(ptrs) == 1 and batch["rows"].is_shared()
    assert all(t.data_ptr() % 64 == 0 for t in batch.values() if t.numel())
    buf = io.BytesIO()
    ForkingPickler(buf).dump(batch)
    back = pickle.loads(buf.getvalue())
    assert type(back) is dict and list(back) == list(shapes)
    for k in shapes:
        assert back[k].shape == shapes[k][0] and back[k].dtype == shapes[k][1] and torch.equal(back[k], batch[k])


def test_auto_num_workers(monkeypatch):
    from dskd_pipe.pipeline.loader import auto_num_workers

    assert auto_num_workers("cpu") == 0  # workers would take the training step's cores
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert auto_num_workers("cuda") == 8 and auto_num_workers("cuda:1") == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 processes share the 16 cores: 4 each, one for the loop
    assert auto_num_workers("cuda") == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert auto_num_workers("cuda") == 1


def test_loader_advice():
    from dskd_pipe.pipeline.loader import loader_advice

    assert loader_advice([0.01] * 20, 2) is None and loader_advice([], 2) is None
    assert loader_advice([0.05, 0.07] * 10, 3) == (
        "the data loader held up 6% of the step time over 20 steps with 3 worker(s): pass --num-workers 6 (or more, "
        "up to the free CPU cores), or raise --prefetch-factor if the wait comes in bursts.")
