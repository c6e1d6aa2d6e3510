"""Nothing in a run folder or a store runs code, and no path they name leads out of them (issue 24, security).

A crafted checkpoint (DCP's pickled .metadata, a pickled value in its data, an old trainer_state.pt) is refused in
one line before anything of it runs; a store whose manifest or tokenizer names '../..' paths, or that holds a link
out of its folder, is refused by distill (nothing is written outside) and listed by cache-verify."""
from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch

from dskd_pipe.cache.format import MANIFEST, TOKENIZER_GROUP, Manifest, sha256_hex
from dskd_pipe.pipeline import training
from reliability_helpers import distill_args, invoke, one_error_line


class _Runs:
    """Unpickling this calls os.mkdir(path): proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _copy(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _restamp(folder):
    """Record the files' new sizes in the checkpoint's trainer state, as a crafted checkpoint would."""
    state_file = folder / training.TRAINER_STATE
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        state["files"] = {rel: (folder / rel).stat().st_size for rel in state["files"]}
        state_file.write_text(json.dumps(state))


@pytest.mark.parametrize("how", ["resume", "init-from"])
def test_a_crafted_checkpoint_metadata_runs_no_code(models, checkpointed_run, tmp_path, how):
    """state/.metadata is read by DCP with pickle.load: a crafted one ran os.mkdir on --resume and --init-from."""
    run = _copy(checkpointed_run, tmp_path)
    proof = tmp_path / "code-ran"
    for step in ("step-00000002", "step-00000004"):
        (run / "checkpoints" / step / "state" / ".metadata").write_bytes(pickle.dumps(_Runs(proof)))
        _restamp(run / "checkpoints" / step)
    extra = ("--resume", "--max-steps", "6") if how == "resume" else ("--init-from", run)
    out = run if how == "resume" else tmp_path / "next"
    line = one_error_line(invoke(*distill_args(models, out, *extra)))
    assert not proof.exists()
    assert "state/.metadata: holds a 'posix.mkdir', which checkpoint metadata never holds: not loaded" in line


def _tiny_checkpoint(tmp_path, lr):
    """A checkpoint of a one-layer model whose optimizer's lr is `lr` (any picklable object)."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2)).sum().backward()
    opt.step()
    scheduler = training.cosine_schedule(opt, 3)
    opt.param_groups[0]["lr"] = lr
    training.save_checkpoint(tmp_path, 1, model=model, optimizers={"student": opt}, scheduler=scheduler,
                             trainer_state={"step": 1})
    return training.list_checkpoints(tmp_path)[-1]


def test_a_crafted_value_in_the_checkpoint_data_runs_no_code(tmp_path):
    """DCP's stock planner loads a checkpoint's non-tensor values (optimizer settings) with weights_only=False."""
    proof = tmp_path / "code-ran"
    folder = _tiny_checkpoint(tmp_path, _Runs(proof))
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(training.CheckpointError, match=r"optimizer_student.param_groups.0.lr: not loaded"):
        training.load_checkpoint(folder, model=model, optimizers={"student": opt},
                                 scheduler=training.cosine_schedule(opt, 3))
    assert not proof.exists()


def test_checkpoint_metadata_naming_a_file_outside_is_refused(tmp_path):
    folder = _tiny_checkpoint(tmp_path / "run", 1e-3)
    meta = folder / "state" / ".metadata"
    m = pickle.loads(meta.read_bytes())
    for info in m.storage_data.values():
        info.relative_path = "../../../outside.distcp"
    meta.write_bytes(pickle.dumps(m))
    _restamp(folder)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(training.CheckpointError, match=r"names the file '../../../outside.distcp', outside the "
                                                       r"checkpoint: not loaded"):
        training.load_checkpoint(folder, model=model, optimizers={"student": opt},
                                 scheduler=training.cosine_schedule(opt, 3))


def test_a_pickled_trainer_state_is_named_and_never_loaded(models, checkpointed_run, tmp_path):
    """A checkpoint's trainer state and RNG states were torch pickles (trainer_state.pt, rng-R.pt): a crafted one
    was refused by weights_only with a raw traceback. Now the state is JSON, and a .pt one is named, not read."""
    run = _copy(checkpointed_run, tmp_path)
    proof = tmp_path / "code-ran"
    for step in ("step-00000002", "step-00000004"):
        folder = run / "checkpoints" / step
        (folder / training.TRAINER_STATE).unlink(missing_ok=True)
        for name in ("trainer_state.pt", "rng-0.pt"):
            (folder / name).write_bytes(pickle.dumps(_Runs(proof)))
    line = one_error_line(invoke(*distill_args(models, run, "--resume", "--max-steps", "6")))
    assert not proof.exists()
    assert "a checkpoint of an older dskd-pipe (trainer_state.pt, a pickle, which this version does not load" in line
    assert not [p for p in checkpointed_run.rglob("*.pt")]  # what this version writes holds no pickle of its own


def _rewrite_manifest(store, change):
    """Apply `change(manifest)` and write the manifest back with a valid checksum (as a crafted store would)."""
    m = Manifest.from_json((store / MANIFEST).read_bytes(), where="m")
    change(m)
    (store / MANIFEST).write_bytes(m.to_json())


def _list_file(store, rel):
    def change(m):
        m.files[rel] = sha256_hex((store / rel).read_bytes())
    return change


def test_a_store_naming_a_tokenizer_file_outside_writes_nothing_there(models, small_store, tmp_path, monkeypatch):
    """The tokenizer's file names are written into a temporary folder when distill rebuilds the teacher's
    tokenizer: '../../escaped' wrote a file two folders above it."""
    import tempfile

    store = tmp_path / "evil" / "t.zarr"
    shutil.copytree(small_store, store)
    evil = "../../escaped"
    group = store / TOKENIZER_GROUP / "zarr.json"
    meta = json.loads(group.read_text())
    meta["attributes"]["files"].append(evil)
    group.write_text(json.dumps(meta))
    # The bytes it names: an existing tokenizer array, copied where the crafted name reads from.
    source = meta["attributes"]["files"][0]
    shutil.copytree(store / TOKENIZER_GROUP / source, store / TOKENIZER_GROUP / evil)
    _rewrite_manifest(store, lambda m: m.files.update({
        f"{TOKENIZER_GROUP}/zarr.json": sha256_hex(group.read_bytes()),
        f"{TOKENIZER_GROUP}/{evil}/zarr.json": sha256_hex((store / TOKENIZER_GROUP / evil / "zarr.json").read_bytes())}))
    temp = tmp_path / "a" / "b"
    temp.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    line = one_error_line(invoke(*distill_args(models, tmp_path / "run", "--cache", store, method="dskd-cma")))
    assert not (tmp_path / "a" / "escaped").exists()
    assert f"{store}: the manifest names 'tokenizer/../../escaped/zarr.json', a path through '..'" in line
    verify = invoke("cache-verify", store)
    assert verify.exit_code == 1
    assert "tokenizer/../../escaped/zarr.json: the manifest names a path outside the store (a path through '..')" \
        in verify.output


def test_a_tokenizer_name_with_a_folder_is_refused_even_when_listed_safely(models, small_store, tmp_path):
    """A name the manifest can hold ('x/../y' stays inside the store) is still no plain file name for the folder
    the tokenizer is rebuilt in."""
    store = tmp_path / "t.zarr"
    shutil.copytree(small_store, store)
    group = store / TOKENIZER_GROUP / "zarr.json"
    meta = json.loads(group.read_text())
    meta["attributes"]["files"].append("sub/name.json")
    group.write_text(json.dumps(meta))
    _rewrite_manifest(store, _list_file(store, f"{TOKENIZER_GROUP}/zarr.json"))
    line = one_error_line(invoke(*distill_args(models, tmp_path / "run", "--cache", store, method="dskd-cma")))
    assert "the store's tokenizer names the file 'sub/name.json', a path, not a file name" in line
    verify = invoke("cache-verify", store)
    assert verify.exit_code == 1 and "the store's tokenizer names the file 'sub/name.json'" in verify.output


def test_a_link_out_of_the_store_is_refused_and_reported(models, small_store, tmp_path):
    store = tmp_path / "t.zarr"
    shutil.copytree(small_store, store)
    shard = store / "parts" / "part-00000" / "hidden" / "c" / "0" / "0"
    outside = tmp_path / "outside.bin"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    verify = invoke("cache-verify", store)
    assert verify.exit_code == 1
    assert "parts/part-00000/hidden/c/0/0: a link to outside the store" in verify.output
    line = one_error_line(invoke(*distill_args(models, tmp_path / "run", "--cache", store, method="dskd-cma")))
    assert "parts/part-00000/hidden/c/0/0: a link to outside the store" in line


def test_a_recipe_config_path_through_dotdot_is_refused(tmp_path):
    """A recipe's relative data paths name files under --data-root (or the shipped data): '..' led out of it."""
    from dskd_pipe.pipeline.config import ConfigError
    from dskd_pipe.stages.recipe import resolve_data

    with pytest.raises(ConfigError, match=r"data path '../../secrets/train.jsonl': a relative path in a recipe config "
                                          r"names a file under --data-root, and '..' leads out of it"):
        resolve_data("../../secrets/train.jsonl", tmp_path)
    assert resolve_data("sub/train.jsonl", tmp_path) == str(tmp_path / "sub" / "train.jsonl")
