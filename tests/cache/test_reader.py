"""Round trip through a store built by cache-teacher: ids, offsets, hidden exact; logits rebuilt equal the teacher's."""
import re
import pickle

import numpy as np
import pytest
import torch

from dskd_pipe.cache.format import StoreError
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
                  "--chunk-tokens", 16, "--shard-tokens", 128, "--topk", 2, "--device", "cpu")
    assert r.exit_code == 0, r.output
    return out


def test_head_and_embeddings_leave_no_file_mapped(gpt2_store):
    """Arrays read whole once (head, embeddings) are unmapped after: a mapped file whose bytes were copied out would
    count its pages in resident memory a second time (a 152k-vocabulary head and table: +0.94 GB peak RSS)."""
    from dskd_pipe.cache import shards

    reader = open_store(str(gpt2_store))
    mapped = []
    real = shards.LocalFiles.map
    files = reader._h()["files"].files
    files.map = lambda path: mapped.append(path) or real(files, path)
    reader.read(0)  # examples' shards stay mapped: they are read again and again
    kept = set(files.maps)
    head, emb = reader.head(), reader.embeddings()
    assert any("/head/" in p for p in mapped) and any("/embed/" in p for p in mapped)  # read through the map
    assert set(files.maps) == kept and kept  # ... and unmapped after, the examples' maps untouched
    again = open_store(str(gpt2_store)).head()
    assert torch.equal(head["weight"], again["weight"]) and emb["weight"].shape[0] == head["weight"].shape[0]


def test_fsspec_url_reads_the_same(gpt2_store):
    local, url = open_store(str(gpt2_store)), open_store(f"file://{gpt2_store}")
    for i in range(len(local)):
        a, b = local.read(i), url.read(i)
        np.testing.assert_array_equal(a["ids"], b["ids"])
        assert torch.equal(a["hidden"], b["hidden"])


def test_memory_filesystem_reads_the_same(gpt2_store):
    """A store copied to another fsspec filesystem (memory:// here, s3:// alike) reads the same bytes through
    byte-range requests (fs.cat_ranges), head and tokenizer included."""
    import fsspec
    fs = fsspec.filesystem("memory")
    for p in gpt2_store.rglob("*"):
        if p.is_file():
            fs.pipe(f"/copy.zarr/{p.relative_to(gpt2_store).as_posix()}", p.read_bytes())
    local, remote = open_store(str(gpt2_store)), open_store("memory://copy.zarr")
    for i in range(len(local)):
        a, b = local.read(i), remote.read(i)
        assert torch.equal(a["hidden"], b["hidden"]) and a["prompt"] == b["prompt"]
        np.testing.assert_array_equal(a["topk_indices"], b["topk_indices"])
    assert torch.equal(local.head()["weight"], remote.head()["weight"])
    assert local.tokenizer_files() == remote.tokenizer_files()


def test_zarr_reads_every_array_the_same(gpt2_store):
    """Any Zarr v3 reader opens the store: zarr's own reads equal ours, array by array."""
    import zarr
    store = open_store(str(gpt2_store))
    group = zarr.open_group(str(gpt2_store), mode="r")
    for path, arr in store.arrays().items():
        np.testing.assert_array_equal(np.asarray(group[path][...]), arr.read(0, arr.shape[0]), err_msg=path)


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
    (copy / "manifest.json").unlink()
    with pytest.raises(StoreError, match="unfinished store: run the same cache-teacher command again to finish it"):
        open_store(str(copy))
    with pytest.raises(StoreError, match="no such store"):
        open_store(str(tmp_path / "nope.zarr"))


def _damage(copy, rel_array, shard=0, where=0.5):
    """Flip one byte of a shard file of an array, inside its stored chunks (not the index)."""
    f = sorted((copy / rel_array / "c").rglob("*"))
    f = [p for p in f if p.is_file()][shard]
    data = bytearray(f.read_bytes())
    data[int((len(data) - 200) * where)] ^= 0x01
    f.write_bytes(bytes(data))
    return f


READS = {
    "parts/part-00000/hidden": lambda s: [s.read(i) for i in range(len(s))],
    "parts/part-00000/tokens": lambda s: s.read(0),
    "parts/part-00000/topk_values": lambda s: [s.read(i) for i in range(len(s))],
    "parts/part-00000/topk_indices": lambda s: [s.read(i) for i in range(len(s))],
    "parts/part-00000/logsumexp": lambda s: [s.read(i) for i in range(len(s))],
    "texts": lambda s: s.read(0),
    "index": lambda s: s.read(0),
    "head/weight": lambda s: s.head(),
    "embed/weight": lambda s: s.embeddings(),
    "tokenizer/tokenizer.json": lambda s: s.tokenizer(),
}


@pytest.mark.parametrize("array", sorted(READS))
def test_every_array_read_checks_its_bytes(gpt2_store, tmp_path, array):
    """A flipped byte anywhere the student's inputs come from is a StoreError naming store, array, shard, inner chunk
    and rows (and examples for per-token arrays), never zarr's raw checksum error or silently wrong data."""
    import shutil
    copy = tmp_path / "c.zarr"
    shutil.copytree(gpt2_store, copy)
    _damage(copy, array)
    with pytest.raises(StoreError) as e:
        READS[array](open_store(str(copy)))
    msg = str(e.value)
    assert msg.startswith(f"{copy}: {array} shard 0 inner chunk "), msg
    assert "is corrupt (crc32c mismatch). Run dskd-pipe cache-verify" in msg and "\n" not in msg
    if array.startswith("parts/"):
        assert re.search(r"\(rows \d+\.\.\d+, examples \[[\d, ]+\]", msg), msg


def test_edited_text_is_caught(gpt2_store, tmp_path):
    """The texts the student tokenises are checksummed too: "moon" -> "mOon" in the stored bytes is refused."""
    import shutil
    copy = tmp_path / "c.zarr"
    shutil.copytree(gpt2_store, copy)
    store = open_store(str(copy))
    prompt = store.read(0)["prompt"]
    word = prompt.split()[3].encode()
    f = next(p for p in (copy / "texts" / "c").rglob("*") if p.is_file())
    data = f.read_bytes()
    assert word in data
    f.write_bytes(data.replace(word, word[:1] + word[1:2].upper() + word[2:], 1))
    with pytest.raises(StoreError, match=r"texts shard 0 inner chunk 0 \(rows 0\.\.\d+, examples \[.*is corrupt"):
        open_store(str(copy)).read(0)


def test_compressed_store_reads_and_checks(tiny_teacher_dirs, cache_cli, dolly40, tmp_path):
    out = tmp_path / "z.zarr"
    r = cache_cli("--teacher", tiny_teacher_dirs["llama"], "--data", dolly40, "--out", out, "--limit", 6,
                  "--chunk-tokens", 8, "--shard-tokens", 64, "--device", "cpu", "--compression", "zstd")
    assert r.exit_code == 0, r.output
    import zarr
    store = open_store(str(out))
    z = zarr.open_group(str(out), mode="r")
    for i in range(6):
        p, start, n, _ = store.locate(i)
        got = store.read(i)["hidden"].numpy()
        np.testing.assert_array_equal(np.asarray(z["parts/part-00000/hidden"][start:start + n]), got)
    _damage(out, "parts/part-00000/hidden", where=0.3)
    with pytest.raises(StoreError, match=r"parts/part-00000/hidden shard 0 inner chunk \d+ .*is corrupt"):
        [open_store(str(out)).read(i) for i in range(6)]


def test_damaged_metadata_is_named(gpt2_store, tmp_path):
    import shutil
    copy = tmp_path / "c.zarr"
    shutil.copytree(gpt2_store, copy)
    meta = copy / "parts" / "part-00000" / "hidden" / "zarr.json"
    meta.write_text(meta.read_text().replace("128", "129", 1))
    with pytest.raises(StoreError, match=r"parts/part-00000/hidden/zarr.json is damaged \(sha256 mismatch\)"):
        open_store(str(copy)).read(0)


def test_damaged_manifest_is_named(gpt2_store, tmp_path):
    import shutil
    copy = tmp_path / "c.zarr"
    shutil.copytree(gpt2_store, copy)
    data = (copy / "manifest.json").read_bytes()
    (copy / "manifest.json").write_bytes(data[:len(data) // 2])
    with pytest.raises(StoreError, match=r"manifest.json is damaged \(\d+ bytes, not a JSON manifest.*Run the same "
                                         r"cache-teacher command again"):
        open_store(str(copy))
    (copy / "manifest.json").write_bytes(data.replace(b'"eos_id": 50256', b'"eos_id": 50257'))
    with pytest.raises(StoreError, match=r"manifest.json is damaged \(its content does not match its checksum\)"):
        open_store(str(copy))


# --- fp8 hidden states (cache-teacher --hidden-storage fp8) ---------------------------------------------------------

def test_fp8_codec_by_hand():
    """s = max|h| / 448 per token; q = h / s rounded to e4m3 (3 mantissa bits, ties to even); h' = q * s."""
    from dskd_pipe.cache.reader import decode_fp8
    from dskd_pipe.cache.writer import encode_fp8

    h = torch.tensor([[448.0, 1.0, -0.5, 0.0],  # s = 1: every value exact in e4m3
                      [896.0, 3.0, 17.0, 19.0],  # s = 2: 1.5 exact; 8.5 and 9.5 are ties between e4m3 neighbours
                      [0.0, 0.0, 0.0, 0.0],  # all zero: s = 1, zeros back
                      [7.0, -3.5, 1.0, 0.1]])  # s = 1/64: 448, -224, 64 exact; 6.4 -> 6.5 (step 0.5 in [4, 8))
    q, s = encode_fp8(h)
    assert q.dtype == np.uint8 and q.shape == (4, 4) and s.dtype == np.float32
    assert s.tolist() == [1.0, 2.0, 1.0, 7.0 / 448]
    back = decode_fp8(q, s, torch.float32)
    assert back[0].tolist() == [448.0, 1.0, -0.5, 0.0]
    # 8.5 = (8 + 9) / 2 -> 8 (mantissa 000, even); 9.5 = (9 + 10) / 2 -> 10 (mantissa 010, even); times s = 2
    assert back[1].tolist() == [896.0, 3.0, 16.0, 20.0]
    assert back[2].tolist() == [0.0] * 4
    torch.testing.assert_close(back[3], torch.tensor([7.0, -3.5, 1.0, 6.5 * 7.0 / 448]), rtol=1e-6, atol=0)
    assert decode_fp8(q, s, torch.bfloat16).dtype == torch.bfloat16


def test_fp8_codec_error_bound_on_wide_ranges():
    from dskd_pipe.cache.reader import decode_fp8
    from dskd_pipe.cache.writer import encode_fp8

    torch.manual_seed(0)
    h = torch.randn(64, 256) * torch.logspace(-6, 4, 64)[:, None]  # rows of very different scales
    q, s = encode_fp8(h)
    back = decode_fp8(q, s, torch.float32)
    amax = h.abs().amax(-1, keepdim=True)
    top = h.abs() == amax
    torch.testing.assert_close(back[top], h[top], rtol=1e-6, atol=0)  # each token's largest value is exact
    scale = amax / 448
    normal = h.abs() >= scale * 2**-6  # e4m3's normal range: 2^-6 .. 448 after scaling
    assert ((back - h).abs() <= h.abs() * 2**-4 * (1 + 1e-6))[normal].all()  # half a unit of a 3-bit mantissa
    assert ((back - h).abs() <= (scale * 2**-10 * (1 + 1e-6)).expand_as(h))[~normal].all()  # half a subnormal step


@pytest.fixture(scope="module")
def fp8_pair(tiny_teacher_dirs, cache_cli, dolly40, tmp_path_factory):
    """The same teacher and data cached exact and with --hidden-storage fp8."""
    root = tmp_path_factory.mktemp("fp8")
    out = {}
    for storage in ("exact", "fp8"):
        out[storage] = root / f"{storage}.zarr"
        r = cache_cli("--teacher", tiny_teacher_dirs["qwen2"], "--data", dolly40, "--out", out[storage], "--limit", 8,
                      "--chunk-tokens", 16, "--shard-tokens", 128, "--device", "cpu", "--hidden-storage", storage)
        assert r.exit_code == 0, r.output
    return out


def test_fp8_store_holds_the_encoded_exact_states(fp8_pair):
    from dskd_pipe.cache.reader import decode_fp8
    from dskd_pipe.cache.verify import store_info, verify_store
    from dskd_pipe.cache.writer import encode_fp8

    exact, fp8 = open_store(str(fp8_pair["exact"])), open_store(str(fp8_pair["fp8"]))
    assert fp8.manifest.hidden_storage == "fp8" and fp8.manifest.hidden_dtype == "float32"
    for i in range(len(exact)):
        a, b = exact.read(i), fp8.read(i)
        np.testing.assert_array_equal(a["ids"], b["ids"])
        assert b["hidden"].dtype == torch.float32
        assert torch.equal(b["hidden"], decode_fp8(*encode_fp8(a["hidden"]), torch.float32))
    assert verify_store(str(fp8_pair["fp8"]))["ok"]
    info_exact, info_fp8 = store_info(str(fp8_pair["exact"])), store_info(str(fp8_pair["fp8"]))
    assert "float8 e4m3" in info_fp8["hidden"]
    # per token: 4 x 32 bytes of fp32 + 12 (ids, offsets) exact; 32 + 4 + 12 fp8 (plus the texts and index)
    assert info_fp8["bytes_per_token"] < info_exact["bytes_per_token"] - (4 * 32 - 36) + 2


def test_fp8_store_checks_its_exponents_and_its_setting(fp8_pair, tiny_teacher_dirs, cache_cli, dolly40, tmp_path):
    import shutil
    copy = tmp_path / "c.zarr"
    shutil.copytree(fp8_pair["fp8"], copy)
    _damage(copy, "parts/part-00000/hidden_scale")
    with pytest.raises(StoreError, match=r"parts/part-00000/hidden_scale shard 0 inner chunk \d+ .*is corrupt"):
        [open_store(str(copy)).read(i) for i in range(8)]
    # finishing or extending a store with the other storage is refused before the teacher runs
    r = cache_cli("--teacher", tiny_teacher_dirs["qwen2"], "--data", dolly40, "--out", fp8_pair["fp8"], "--limit", 8,
                  "--chunk-tokens", 16, "--shard-tokens", 128, "--device", "cpu", "--hidden-storage", "exact")
    assert r.exit_code != 0 and "was started with hidden_storage=fp8, not exact. Pass the same --hidden-storage" \
        in r.output, r.output
