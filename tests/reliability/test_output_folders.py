"""No work is destroyed without a word (issue 24, data loss): an --out that holds something this stage did not make
is refused before anything is written, naming what it holds; an --out that cannot be written is one line, the same
for every stage (cache/paths.check_out_location). A stage's own earlier output stays resumable (tests/stages)."""
from __future__ import annotations

import os
import shutil

from reliability_helpers import DATA, cache_args, distill_args, invoke, one_error_line


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_distill_and_score_refuse_a_teacher_store_as_out(models, small_store, tmp_path):
    """Both wrote their config.json over the store's, which then failed cache-verify."""
    store = tmp_path / "t.zarr"
    shutil.copytree(small_store, store)
    before = _files(store)
    line = one_error_line(invoke(*distill_args(models, store, "--cache", store, method="dskd-cma")))
    assert f"--out {store} holds a teacher-state store (cache-teacher) (config.json, embed, head, index, ..." in line
    assert line.endswith("not an earlier distill run: the run would write over it. Pass a new or empty folder as "
                         "--out.")
    line = one_error_line(invoke("score", "--model", models["student"], "--data", DATA, "--out", store, "--limit", "2",
                                 "--seed", "1", "--max-new-tokens", "2", "--device", "cpu"))
    assert f"--out {store} holds a teacher-state store (cache-teacher)" in line and "not an earlier score run" in line
    assert _files(store) == before and invoke("cache-verify", store).exit_code == 0


def test_distill_refuses_its_own_student_folder_as_out(models, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(models["student"], student)
    before = _files(student)
    line = one_error_line(invoke(*distill_args(models, student, "--student", student)))
    assert f"--out {student} is the --student folder: the run would write over the weights it starts from" in line
    assert _files(student) == before


def test_distill_and_cache_teacher_refuse_a_folder_holding_a_model(models, tmp_path):
    """A folder with an unrelated model.safetensors was overwritten (distill), or refused only after the teacher
    was loaded without saying what it holds (cache-teacher)."""
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"someone's weights")
    line = one_error_line(invoke(*distill_args(models, folder)))
    assert f"--out {folder} holds a model (model.safetensors), not an earlier distill run" in line
    line = one_error_line(invoke(*cache_args(models["teacher"], folder)))
    assert f"{folder}: exists, is not empty and holds no store manifest: it holds a model (model.safetensors)" in line
    assert (folder / "model.safetensors").read_bytes() == b"someone's weights"
    assert [p.name for p in folder.iterdir()] == ["model.safetensors"]


def test_generate_refuses_an_existing_file_it_did_not_write(models, tmp_path):
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"mine": 1}\n')
    line = one_error_line(invoke("generate", "--model", models["student"], "--data", DATA, "--out", notes, "--limit",
                                 "2", "--max-new-tokens", "2", "--device", "cpu"))
    assert f"--out {notes} exists and is not an earlier generate output (no notes.jsonl.config.json beside it)" in line
    assert notes.read_text() == '{"mine": 1}\n'


def _four_stages(models, run, out):
    """distill, score, generate and plot, each with this --out (a folder or a file)."""
    common = ("--limit", "2", "--max-new-tokens", "2", "--device", "cpu")
    return {"distill": invoke(*distill_args(models, out)),
            "score": invoke("score", "--model", models["student"], "--data", DATA, "--out", out, "--seed", "1", *common),
            "generate": invoke("generate", "--model", models["student"], "--data", DATA, "--out", out, *common),
            "plot": invoke("plot", run, "--out", out)}


def test_an_out_under_a_file_is_one_line_in_every_stage(models, checkpointed_run, tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "x"
    for stage, result in _four_stages(models, checkpointed_run, out).items():
        line = one_error_line(result)
        assert line == f"error: --out {out}: {tmp_path / 'file'} is a file, not a folder. Pass a path inside a folder.", \
            stage


def test_an_out_in_a_read_only_folder_is_one_line_in_every_stage(models, checkpointed_run, tmp_path, monkeypatch):
    """As another user a folder of mode 555 refuses writes; root may write anywhere, so there the test asks
    os.access what a read-only folder (or a read-only mount) answers."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(locked) and mode & os.W_OK
                            else real(p, mode, **k))
    out = locked / "x"
    try:
        for stage, result in _four_stages(models, checkpointed_run, out).items():
            line = one_error_line(result)
            assert line == f"error: --out {out}: {locked} is not writable. Pass a folder you can write to.", stage
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_cache_verify_and_cache_info_on_a_file_are_one_line():
    for command in ("cache-verify", "cache-info"):
        line = one_error_line(invoke(command, DATA))
        assert line == (f"error: {DATA}: a file, not a store (a store is a folder holding manifest.json). Pass the "
                        "store's folder."), command
