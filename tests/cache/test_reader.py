"""Round trip through a store built by cache-teacher: ids, offsets, hidden exact; logits rebuilt equal the teacher's."""
import json
import re
import pickle

import numpy as np
import pytest
import torch

from dskd_pipe.cache.format import PARTIAL_MANIFEST, StoreError
from dskd_pipe.cache.reader import open_store
from dskd_pipe.pipeline.objectives.dskd import TeacherHead, teacher_logits
from dskd_pipe.pipeline.data import build_sequence, load_examples
from dskd_pipe.pipeline.models import eos_token_id, load_causal_lm, load_tokenizer

TOL = {"float32": 2e-4, "bfloat16": 6e-2}


@pytest.mark.parametrize("arch,dtype", [("gpt2", "float32"), ("llama", "float32"), ("qwen2", "float32"),
                                        ("gemma3", "float32"), ("llama", "bfloat16")])
def test_logits_rebuilt_from_store_match_teacher(tiny_teacher_dirs, cache_cli, dolly40, tmp_path, arch, dtype):
    teacher = tiny_teacher_dirs[arch]
    out = tmp_path / "t.zarr"
    r = cache_cli("--teacher", teacher, "--data", dolly40, "--out", out, "--limit", 6, "--chunk-tokens", 16,
                  "--batch-tokens", 1024, "--device", "cpu", "--dtype", dtype, "--topk", 3)
    assert r.exit_code == 0, r.output
    store = open_store(str(out))
    assert len(store) == 6 and store.manifest.hidden_dtype == dtype
    tok = load_tokenizer(str(teacher))
    model = load_causal_lm(str(teacher), dtype=getattr(torch, dtype), device="cpu")
    head = store.head()
    assert store.embeddings()["weight"].dtype == getattr(torch, dtype)
    if arch == "gemma3":
        assert head["final_logit_softcap"] == 30.0 and store.embeddings()["embed_scale"] != 1.0
    examples = load_examples(str(dolly40), limit=6)
    for i in range(6):
        rec = store.read(i)
        seq = build_sequence(tok, examples[i].prompt, examples[i].response, eos_token_id(tok))
        np.testing.assert_array_equal(rec["ids"], seq.ids)
        np.testing.assert_array_equal(rec["offsets"], np.asarray(seq.offsets))
        assert rec["prompt_len"] == seq.prompt_len and rec["prompt"] == examples[i].prompt
        assert rec["hidden"].dtype == getattr(torch, dtype)
        with torch.no_grad():
            want = model(torch.tensor([seq.ids])).logits[0].float()  # [L, V], unpadded
        got = teacher_logits(rec["hidden"], TeacherHead(**head))
        torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])
        top = want.topk(3, dim=-1)
        np.testing.assert_allclose(rec["topk_values"], top.values.numpy(), atol=TOL[dtype] * 4, rtol=TOL[dtype])
        np.testing.assert_allclose(rec["logsumexp"], torch.logsumexp(want, -1).numpy(), atol=TOL[dtype] * 4,
                                   rtol=TOL[dtype])
    assert len(store.tokenizer()) == len(tok)
    assert store.tokenizer()(examples[0].prompt)["input_ids"] == tok(examples[0].prompt)["input_ids"]


@pytest.fixture(scope="module")
def gpt2_store(tiny_teacher_dirs, cache_cli, dolly40, tmp_path_factory):
    out = tmp_path_factory.mktemp("s") / "t.zarr"
    r = cache_cli("--teacher", tiny_teacher_dirs["gpt2"], "--data", dolly40, "--out", out, "--limit", 10,
                  "--chunk-tokens", 16, "--device", "cpu")
    assert r.exit_code == 0, r.output
    return out


def test_fsspec_url_reads_the_same(gpt2_store):
    local, url = open_store(str(gpt2_store)), open_store(f"file://{gpt2_store}")
    for i in range(len(local)):
        a, b = local.read(i), url.read(i)
        np.testing.assert_array_equal(a["ids"], b["ids"])
        assert torch.equal(a["hidden"], b["hidden"])


def test_zarr_path_equals_direct_chunk_path(gpt2_store):
    direct = open_store(str(gpt2_store))
    via_zarr = open_store(str(gpt2_store))
    via_zarr._h()["direct"] = False
    for i in range(len(direct)):
        assert torch.equal(direct.read(i)["hidden"], via_zarr.read(i)["hidden"])


def test_reader_pickles_and_reopens(gpt2_store):
    store = open_store(str(gpt2_store))
    first = store.read(3)
    clone = pickle.loads(pickle.dumps(store))
    assert clone._handles is None
    assert torch.equal(clone.read(3)["hidden"], first["hidden"])


def test_expected_fingerprints_checked(gpt2_store):
    with pytest.raises(StoreError, match=r"was built from .*dolly_train_40.jsonl .*not dev.jsonl"):
        open_store(str(gpt2_store), expected={"data": {"path": "dev.jsonl", "sha256": "ab12"}})


def test_unfinished_store_refused(gpt2_store, tmp_path):
    import shutil
    copy = tmp_path / "u.zarr"
    shutil.copytree(gpt2_store, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["complete"] = False
    (copy / PARTIAL_MANIFEST).write_text(json.dumps(m))
    (copy / "manifest.json").unlink()
    with pytest.raises(StoreError, match="unfinished store: run the same cache-teacher command again to finish it"):
        open_store(str(copy))
    with pytest.raises(StoreError, match="no such store"):
        open_store(str(tmp_path / "nope.zarr"))


def _chunk_range(store, i: int, c: int) -> set[int]:
    _, start, n, _ = store.locate(i)
    return set(range(start // c, (start + n - 1) // c + 1))


def test_every_read_checks_its_chunks(gpt2_store, tmp_path):
    """A flipped byte, a short chunk file and a missing one each fail the read that touches them, naming the file;
    examples elsewhere still read. (cache-verify finds the same over the whole store: tests/cache/test_verify.py.)"""
    import shutil

    copy = tmp_path / "c.zarr"
    shutil.copytree(gpt2_store, copy)
    store = open_store(str(copy))
    c = store.manifest.chunk_tokens
    # Three examples of part 0, each damaged in a chunk that only it touches (the middle of its own range).
    ranges = {i: _chunk_range(store, i, c) for i in range(len(store)) if store.locate(i)[0] == 0}
    own = {i: sorted(r - set().union(*(o for j, o in ranges.items() if j != i))) for i, r in ranges.items()}
    victims = [i for i in ranges if own[i]][:3]
    assert len(victims) == 3, "the fixture store should have examples with chunks of their own"
    chunk_dir = copy / "parts" / "part-00000" / "hidden" / "c"
    files = [chunk_dir / str(own[i][len(own[i]) // 2]) / "0" for i in victims]
    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 0x01
    files[0].write_bytes(bytes(data))
    files[1].write_bytes(files[1].read_bytes()[:-10])
    files[2].unlink()

    messages = [f"({files[0]}) is corrupt (crc32c mismatch)", f"({files[1]}) has ", f"chunk file {files[2]} is missing"]
    for i, message in zip(victims, messages):
        with pytest.raises(StoreError, match=re.escape(message)):
            store.read(i)
    damaged = {int(f.parent.name) for f in files}
    intact = [i for i in ranges if not ranges[i] & damaged]
    assert intact
    clean = open_store(str(gpt2_store))
    for i in intact:
        assert torch.equal(store.read(i)["hidden"], clean.read(i)["hidden"])
