"""A damaged store met by every command that reads it: cache-info, cache-verify and distill each say what is damaged
and what to do, in one line, with a non-zero exit; never a traceback (issue 14)."""
from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from dskd_pipe.stages.cli import main
from reliability_helpers import DATA, cache_args


@pytest.fixture(scope="module")
def store(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("damage") / "t.zarr"
    r = CliRunner().invoke(main, cache_args(models["teacher"], out, "--max-length", "64", limit=8))
    assert r.exit_code == 0, r.output
    return out


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _distill(models, store, tmp_path, workers=0):
    return _cli("distill", "--cache", store, "--student", models["student"], "--method", "dskd-cma", "--data", DATA,
                "--out", tmp_path / "run", "--limit", "8", "--max-length", "64", "--micro-batch-size", "2",
                "--max-steps", "2", "--num-workers", str(workers), "--device", "cpu", "--no-progress")


def _one_error_line(result) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert len(errors) == 1, result.output
    return errors[0]


def test_truncated_manifest(models, store, tmp_path):
    copy = tmp_path / "c.zarr"
    shutil.copytree(store, copy)
    data = (copy / "manifest.json").read_bytes()
    (copy / "manifest.json").write_bytes(data[:len(data) // 3])
    for result in (_cli("cache-info", copy), _cli("cache-verify", copy), _distill(models, copy, tmp_path)):
        line = _one_error_line(result)
        assert f"{copy}/manifest.json is damaged (" in line and "not a JSON manifest" in line
        assert "Run the same cache-teacher command again: it checks the parts and writes manifest.json anew" in line
    # ... and the fix it names works: the same cache-teacher command rewrites the manifest from the parts.
    r = _cli(*cache_args(models["teacher"], copy, "--max-length", "64", limit=8))
    assert r.exit_code == 0 and "is damaged" in r.output, r.output
    assert (copy / "manifest.json").read_bytes() == (store / "manifest.json").read_bytes().replace(
        str(store).encode(), str(copy).encode()) or _cli("cache-verify", copy).exit_code == 0


@pytest.mark.parametrize("workers", [0, 1])
def test_deleted_texts(models, store, tmp_path, workers):
    """The texts (what examples.jsonl was) deleted: info still summarises, verify and distill name the shard and the
    examples in it; through a DataLoader worker too."""
    copy = tmp_path / "c.zarr"
    shutil.copytree(store, copy)
    shutil.rmtree(copy / "texts" / "c")
    assert _cli("cache-info", copy).exit_code == 0
    verify = _cli("cache-verify", copy)
    assert verify.exit_code == 1 and "texts shard 0 (" in verify.output and "is missing" in verify.output
    line = _one_error_line(_distill(models, copy, tmp_path, workers))
    assert f"{copy}: texts shard 0 (" in line and "is missing (no shard file)" in line and "examples [" in line
    assert "Run dskd-pipe cache-verify" in line


def test_flipped_hidden_byte_during_distill(models, store, tmp_path):
    copy = tmp_path / "c.zarr"
    shutil.copytree(store, copy)
    shard = copy / "parts" / "part-00000" / "hidden" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    line = _one_error_line(_distill(models, copy, tmp_path))
    assert "parts/part-00000/hidden shard 0 inner chunk 0 (rows 0..8, examples [" in line
    assert "is corrupt (crc32c mismatch)" in line


def test_unfinished_store_in_info_and_distill(models, store, tmp_path):
    copy = tmp_path / "c.zarr"
    shutil.copytree(store, copy)
    (copy / "manifest.json").unlink()
    info = _cli("cache-info", copy)
    assert info.exit_code == 0 and '"status": "unfinished"' in info.output
    line = _one_error_line(_distill(models, copy, tmp_path))
    assert "unfinished store: run the same cache-teacher command again to finish it" in line
