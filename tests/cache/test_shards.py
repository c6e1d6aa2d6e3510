"""cache/shards.py: our shard files are Zarr v3 sharded arrays (zarr reads them back), our reader equals zarr's on any
row range, locally and through fsspec, and every kind of damage is named."""
import re

import fsspec
import numpy as np
import pytest
import zarr

from dskd_pipe.cache import shards
from dskd_pipe.cache.format import ArrayLayout, StoreError
from dskd_pipe.cache.writer import write_array

LAYOUTS = {
    "2d-bf16": ArrayLayout((203, 16), "uint16", 64, 8),
    "2d-f32-zstd": ArrayLayout((203, 5), "float32", 32, 4, "zstd"),
    "2d-f16-blosc": ArrayLayout((130, 16), "float16", 64, 16, "blosc"),
    "1d-u8": ArrayLayout((1000,), "uint8", 256, 64),
    "2d-i64": ArrayLayout((77, 6), "int64", 32, 8),  # rows of 52 bytes: not aligned to 8 in the shard
    "one-shard": ArrayLayout((5, 3), "int32", 64, 64),
    "empty": ArrayLayout((0, 4), "float32", 8, 4),
}


def _data(layout: ArrayLayout) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.standard_normal(layout.shape) * 100).astype(layout.dtype)


def _array(root, name, verify=True, files=None):
    from dskd_pipe.cache.shards import LocalFiles, ShardedArray, layout_from_metadata
    import json
    layout, _ = layout_from_metadata(json.loads((root / name / "zarr.json").read_text()), name)
    return ShardedArray(files or LocalFiles(), str(root / name), layout, name, str(root),
                        lambda a, b: f", examples of rows {a}..{b}", verify)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_zarr_reads_what_we_write_and_we_read_what_zarr_reads(tmp_path, name):
    layout = LAYOUTS[name]
    data = _data(layout)
    write_array(tmp_path / name, layout, data, "test", data.nbytes)
    via_zarr = zarr.open_array(str(tmp_path / name), mode="r")
    np.testing.assert_array_equal(np.asarray(via_zarr[...]), data)
    ours = _array(tmp_path, name)
    rng = np.random.default_rng(1)
    n = layout.shape[0]
    spans = [(0, n), (0, 1), (n - 1, n)] + [tuple(sorted(rng.integers(0, n + 1, 2))) for _ in range(40)] if n else []
    for a, b in spans:
        np.testing.assert_array_equal(ours.read(int(a), int(b)), data[a:b])
    assert ours.check() == []


def test_zarr_written_shards_read_by_us(tmp_path):
    """The other way round: an array Zarr itself wrote (same codecs) reads identically through our reader."""
    from zarr.codecs import BytesCodec

    layout = LAYOUTS["2d-bf16"]
    data = _data(layout)
    g = zarr.open_group(str(tmp_path), mode="w")
    a = g.create_array("z", shape=layout.shape, dtype=layout.dtype, chunks=(8, 16), shards=(64, 16),
                       serializer=BytesCodec(), compressors=shards.zarr_codecs("none"), fill_value=0)
    a[...] = data
    ours = _array(tmp_path, "z")
    for s, e in [(0, 203), (7, 130), (64, 65), (190, 203)]:
        np.testing.assert_array_equal(ours.read(s, e), data[s:e])


def test_fsspec_reads_equal_local_reads(tmp_path):
    layout = LAYOUTS["2d-bf16"]
    data = _data(layout)
    write_array(tmp_path / "a", layout, data, "test", data.nbytes)
    fs = fsspec.filesystem("memory")
    for p in (tmp_path / "a").rglob("*"):
        if p.is_file():
            fs.pipe(f"/store/a/{p.relative_to(tmp_path / 'a').as_posix()}", p.read_bytes())
    from dskd_pipe.cache.shards import FsspecFiles, ShardedArray
    remote = ShardedArray(FsspecFiles(fs), "/store/a", layout, "a", "memory://store")
    for s, e in [(0, 203), (7, 130), (63, 65), (190, 203)]:
        np.testing.assert_array_equal(remote.read(s, e), data[s:e])
    shard = "/store/a/c/1/0"
    raw = bytearray(fs.cat(shard))
    raw[40] ^= 1
    fs.pipe(shard, bytes(raw))
    with pytest.raises(StoreError, match=r"a shard 1 inner chunk 0 \(rows 64..72.* is corrupt"):
        remote.read(60, 70)


@pytest.fixture()
def written(tmp_path):
    layout = ArrayLayout((203, 16), "uint16", 64, 8)
    data = _data(layout)
    write_array(tmp_path / "h", layout, data, "test", data.nbytes)
    return tmp_path, layout, data


def _flip(path, pos):
    raw = bytearray(path.read_bytes())
    raw[pos] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("verify", [True, False])
def test_flipped_byte_in_an_inner_chunk(written, verify):
    root, layout, data = written
    stored = layout.chunk_rows * layout.row_bytes + 4
    _flip(root / "h" / "c" / "1" / "0", 3 * stored + 17)  # shard 1, inner chunk 3: rows 88..96
    arr = _array(root, "h", verify=verify)
    np.testing.assert_array_equal(arr.read(0, 88), data[0:88])  # untouched rows still read
    if verify:
        with pytest.raises(StoreError) as e:
            arr.read(90, 100)
        msg = str(e.value)
        assert msg.startswith(f"{root}: h shard 1 inner chunk 3 (rows 88..96, examples of rows 88..96, ")
        assert "is corrupt (crc32c mismatch). Run dskd-pipe cache-verify" in msg and "\n" not in msg
    else:
        arr.read(90, 100)  # unchecked: the caller asked for speed over checks
    problems = _array(root, "h").check()
    assert len(problems) == 1 and problems[0].startswith("h shard 1 inner chunk 3 (rows 88..96")


# Rows 60..140 of `written` (shards of 64 rows, inner chunks of 8): shard 0 inner chunk 7 entered part-way, shard 1
# whole, shard 2 inner chunk 1 left part-way. Each case flips a byte of one chunk the read touches; the last one
# flips a row of the chunk that the read does not ask for (rows 136..144, asked 136..140): a check covers whole chunks.
@pytest.mark.parametrize("path", ["mapped", "pread"])
@pytest.mark.parametrize("shard,chunk,row", [(0, 7, 57), (1, 4, 3), (2, 1, 6)])
def test_each_read_path_checks_every_chunk_it_touches(written, monkeypatch, path, shard, chunk, row):
    root, layout, data = written
    # A local shard in the page cache is read through its map, one that is not by preadv: force either.
    monkeypatch.setattr(shards.LocalFiles, "cached", lambda self, p, offset: path == "mapped")
    used = {"mapped": 0, "pread": 0}
    for name, key in [("_read_mapped", "mapped"), ("read_into", "pread")]:
        owner = shards.ShardedArray if name == "_read_mapped" else shards.LocalFiles
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, real=real, key=key: used.__setitem__(key, 1) or real(*a))
    np.testing.assert_array_equal(_array(root, "h").read(60, 140), data[60:140])
    assert used == {"mapped": int(path == "mapped"), "pread": int(path == "pread")}
    stored = layout.chunk_rows * layout.row_bytes + 4
    _flip(root / "h" / "c" / str(shard) / "0", chunk * stored + (row % layout.chunk_rows) * layout.row_bytes + 5)
    with pytest.raises(StoreError, match=rf"h shard {shard} inner chunk {chunk} \(rows .* is corrupt \(crc32c"):
        _array(root, "h").read(60, 140)


def test_prefetch_queues_exactly_the_chunks_a_read_touches(written, monkeypatch):
    """prefetch(a, b) asks the disk for the byte ranges read(a, b) will need (whole inner chunks, one range per
    shard), reads nothing itself, and is a no-op where ranges are not ours to queue (fsspec, compressed)."""
    root, layout, data = written
    queued = []
    monkeypatch.setattr(shards.LocalFiles, "willneed", lambda self, path, off, n: queued.append((path, off, n)))
    arr = _array(root, "h")
    stored = layout.chunk_rows * layout.row_bytes + 4
    arr.prefetch(60, 140)  # shard 0 chunk 7, shard 1 chunks 0..7, shard 2 chunks 0..1
    assert queued == [(arr.shard_path(0), 7 * stored, stored), (arr.shard_path(1), 0, 8 * stored),
                      (arr.shard_path(2), 0, 2 * stored)]
    queued.clear()
    arr.prefetch(5, 5)
    assert queued == []
    np.testing.assert_array_equal(arr.read(60, 140), data[60:140])
    for name, other in [("memory", "2d-bf16"), ("zstd", "2d-f32-zstd")]:
        lay = LAYOUTS[other]
        write_array(root / name, lay, _data(lay), "test", 1)
        files = None
        if name == "memory":
            from dskd_pipe.cache.shards import FsspecFiles
            fs = fsspec.filesystem("memory")
            for f in (root / name).rglob("*"):
                if f.is_file():
                    fs.pipe(f"/pf/{name}/{f.relative_to(root / name).as_posix()}", f.read_bytes())
            files = FsspecFiles(fs)
            a = shards.ShardedArray(files, f"/pf/{name}", lay, name, "memory://pf")
        else:
            a = _array(root, name)
        a.prefetch(0, lay.shape[0])
    assert queued == []


def test_damaged_index_truncated_and_missing_shards(written):
    root, layout, data = written
    idx_at = (root / "h" / "c" / "0" / "0").stat().st_size - 10
    _flip(root / "h" / "c" / "0" / "0", idx_at)
    short = root / "h" / "c" / "1" / "0"
    short.write_bytes(short.read_bytes()[:-5000])
    (root / "h" / "c" / "2" / "0").unlink()
    arr = _array(root, "h")
    with pytest.raises(StoreError, match=re.escape("h shard 0 (") + r".* has a damaged index \(crc32c mismatch\)"):
        arr.read(0, 10)
    with pytest.raises(StoreError, match=r"h shard 1 .* (has a damaged index|is truncated)"):
        arr.read(70, 80)
    with pytest.raises(StoreError, match=r"h shard 2 .*rows 128..192.* is missing \(no shard file\)"):
        arr.read(130, 140)
    np.testing.assert_array_equal(arr.read(192, 203), data[192:203])
    assert len(arr.check()) == 3


def test_an_inner_chunk_left_out_of_the_index_is_named(written):
    root, layout, data = written
    path = root / "h" / "c" / "0" / "0"
    raw = bytearray(path.read_bytes())
    n = layout.chunks_per_shard
    index = np.frombuffer(bytes(raw[-(16 * n + 4):-4]), "<u8").reshape(n, 2).copy()
    index[5] = 2**64 - 1
    raw[-(16 * n + 4):] = index.tobytes() + shards.crc32c(index.tobytes()).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"h shard 0 inner chunk 5 \(rows 40..48.* is missing from its shard index"):
        _array(root, "h").read(0, 64)


def test_write_file_is_all_or_nothing(tmp_path, monkeypatch):
    import errno

    def full(fd, views):
        import os
        os.write(fd, b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, "_write", full)
    with pytest.raises(OSError):
        shards.write_file(tmp_path / "x", [b"a" * 100])
    assert list(tmp_path.iterdir()) == []
