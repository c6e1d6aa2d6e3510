"""cache-verify checks every array and file of a store; cache-info summarises it, unfinished stores included."""
import json
import shutil

import pytest
from click.testing import CliRunner

from dskd_pipe.cache.verify import progress_info, verify_store
from dskd_pipe.stages.cli import main


@pytest.fixture(scope="module")
def store(tiny_teacher_dirs, cache_cli, dolly40, tmp_path_factory):
    out = tmp_path_factory.mktemp("v") / "t.zarr"
    r = cache_cli("--teacher", tiny_teacher_dirs["gpt2"], "--data", dolly40, "--out", out, "--limit", 8,
                  "--chunk-tokens", 16, "--shard-tokens", 64, "--topk", 2, "--device", "cpu")
    assert r.exit_code == 0, r.output
    return out


def _flip(path, pos):
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x10
    path.write_bytes(bytes(data))


def test_clean_store_verifies(store):
    ok = CliRunner().invoke(main, ["cache-verify", str(store)])
    assert ok.exit_code == 0 and "ok (" in ok.output
    report = verify_store(str(store))
    assert report["ok"] and report["chunks"] > 20


@pytest.mark.parametrize("array", ["parts/part-00000/hidden", "parts/part-00000/tokens", "parts/part-00000/logsumexp",
                                   "head/weight", "embed/weight", "tokenizer/tokenizer.json", "index", "texts"])
def test_flipped_byte_in_any_array_is_reported(store, tmp_path, array):
    copy = tmp_path / "c.zarr"
    shutil.copytree(store, copy)
    _flip(copy / array / "c" / ("0/0" if (copy / array / "c" / "0").is_dir() else "0"), 10)
    bad = CliRunner().invoke(main, ["cache-verify", str(copy)])
    assert bad.exit_code == 1
    assert f"{copy}: {array} shard 0 inner chunk 0 (rows 0.." in bad.output and "crc32c mismatch" in bad.output
    if array.startswith("parts/"):
        assert ", examples [" in bad.output
    assert "1 problem(s)" in bad.output


def test_damaged_metadata_and_missing_shard_reported(store, tmp_path):
    copy = tmp_path / "c.zarr"
    shutil.copytree(store, copy)
    (copy / "config.json").write_text("{}")
    shard = copy / "parts" / "part-00000" / "hidden" / "c" / "1" / "0"
    shard.unlink()
    report = verify_store(str(copy))
    assert report["problems"] == ["config.json: damaged (sha256 mismatch)"]
    shutil.copy(store / "config.json", copy / "config.json")
    report = verify_store(str(copy))
    assert len(report["problems"]) == 1
    assert report["problems"][0].startswith("parts/part-00000/hidden shard 1 (") and "is missing" in \
        report["problems"][0] and "examples [" in report["problems"][0]


def test_info_of_a_finished_store(store):
    info = CliRunner().invoke(main, ["cache-info", str(store)])
    assert info.exit_code == 0 and '"bytes_per_token"' in info.output and '"status": "complete"' in info.output


def test_info_of_an_unfinished_store_shows_its_progress(store, tmp_path):
    copy = tmp_path / "u.zarr"
    shutil.copytree(store, copy)
    (copy / "manifest.json").unlink()
    (copy / "shared.json").unlink()
    progress = copy / "parts" / "part-00000" / "progress.json"
    progress.write_text(json.dumps({"rows": 128, "complete": False}))
    info = progress_info(str(copy))
    assert info["status"] == "unfinished" and info["parts"][0]["rows"].startswith("128/")
    assert info["shared_written"] is False and "run the same cache-teacher command again" in info["next"]
    r = CliRunner().invoke(main, ["cache-info", str(copy)])
    assert r.exit_code == 0 and '"status": "unfinished"' in r.output and '"percent"' in r.output
    r = CliRunner().invoke(main, ["cache-verify", str(copy)])
    assert r.exit_code == 2 and "unfinished store" in r.output and "Traceback" not in r.output
