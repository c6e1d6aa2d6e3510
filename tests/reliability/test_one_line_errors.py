"""One line, not a traceback (issue 24): each case below printed a raw traceback; now it is one `error:` line
naming what was found, where, and the fix, with a non-zero exit."""
from __future__ import annotations

import json
import shutil
import socket
import sys

import pytest
import torch
from safetensors.torch import load_file

from dskd_pipe.pipeline import training
from reliability_helpers import DATA, cache_args, distill_args, invoke, one_error_line


@pytest.fixture()
def s3_env(monkeypatch):
    """Test credentials and region, a fresh s3fs client (fsspec keeps one per set of options), 1 s x 2 tries."""
    s3fs = pytest.importorskip("s3fs")
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "DSKD_PIPE_REMOTE_TIMEOUT": "1",
                       "DSKD_PIPE_REMOTE_TRIES": "2", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield monkeypatch
    s3fs.S3FileSystem.clear_instance_cache()


def test_a_closed_s3_endpoint(s3_env):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    s3_env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    line = one_error_line(invoke("cache-info", "s3://bucket/store"))
    assert line.startswith(f"error: s3://bucket/store (endpoint http://127.0.0.1:{port}): the object store failed "
                           "(EndpointConnectionError: Could not connect to the endpoint URL"), line
    assert line.endswith("cannot connect: check the endpoint (AWS_ENDPOINT_URL) and the network.")


def test_no_s3_credentials(s3_env, tmp_path):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        s3_env.delenv(key, raising=False)
    s3_env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    s3_env.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    s3_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    line = one_error_line(invoke("cache-info", "s3://bucket/store"))
    assert "(NoCredentialsError: Unable to locate credentials); no credentials: set AWS_PROFILE, or " \
           "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in line, line


def test_gs_without_gcsfs_and_a_url_without_bucket(monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if it were not installed
    line = one_error_line(invoke("cache-info", "gs://bucket/store"))
    assert line.startswith("error: gs://bucket/store: ") and "install gcsfs" in line.lower(), line
    assert "for gs:// gcsfs (pip install 'dskd-pipe[s3]')" in line
    line = one_error_line(invoke("cache-verify", "s3://"))
    assert line == "error: s3://: no bucket in the URL. Pass s3://BUCKET/PATH/TO/STORE."


@pytest.fixture(scope="module")
def broken_students(models, tmp_path_factory):
    """Copies of the student: its embedding cut to 1000 rows; its weights cut short; its config claiming 3 layers;
    its config claiming another width."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("broken")
    out = {}
    small = AutoModelForCausalLM.from_pretrained(models["student"])
    small.resize_token_embeddings(1000)
    small.save_pretrained(root / "small_embedding")
    AutoTokenizer.from_pretrained(models["student"]).save_pretrained(root / "small_embedding")
    out["small_embedding"] = root / "small_embedding"
    for name, change in (("truncated", None), ("more_layers", {"n_layer": 3}), ("wider", {"n_embd": 64})):
        folder = root / name
        shutil.copytree(models["student"], folder)
        if change is None:
            data = (folder / "model.safetensors").read_bytes()
            (folder / "model.safetensors").write_bytes(data[:len(data) // 2])
        else:
            cfg = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**cfg, **change}))
        out[name] = folder
    return out


def test_a_model_whose_embedding_is_smaller_than_its_tokenizer(models, broken_students, tmp_path):
    folder = broken_students["small_embedding"]
    want = (f"error: {folder}: the tokenizer gives ids up to 50256 (its vocabulary, 50257 tokens in all), but the "
            "model has 1000 embedding rows. Pass the tokenizer the model was trained with, or resize its embeddings "
            "(model.resize_token_embeddings(len(tokenizer))) and save it again.")
    assert one_error_line(invoke(*distill_args(models, tmp_path / "run", "--student", folder))) == want
    assert one_error_line(invoke("score", "--model", folder, "--data", DATA, "--out", tmp_path / "s", "--limit", "2",
                                 "--seed", "1", "--max-new-tokens", "2", "--device", "cpu")) == want


def test_a_truncated_model_and_a_config_that_disagrees_with_the_weights(models, broken_students, tmp_path):
    lines = {name: one_error_line(invoke(*distill_args(models, tmp_path / name, "--student", broken_students[name])))
             for name in ("truncated", "more_layers", "wider")}
    assert lines["truncated"].startswith(f"error: {broken_students['truncated']}: cannot load a causal LM (")
    assert "incomplete metadata, file not fully covered" in lines["truncated"]
    assert lines["more_layers"].startswith(f"error: {broken_students['more_layers']}: config.json does not describe "
                                           "the saved weights (24 missing from the weights: transformer.h.1.attn.")
    assert lines["more_layers"].endswith("the model would run with weights made up at random. Use the config.json "
                                         "saved with these weights.")
    assert lines["wider"].startswith(f"error: {broken_students['wider']}: cannot load a causal LM (")
    assert "size mismatch" in lines["wider"] or "mismatched" in lines["wider"], lines["wider"]


def test_a_truncated_checkpoint_shard_falls_back_to_the_previous_checkpoint(models, checkpointed_run, tmp_path):
    """The newest checkpoint's shard cut short (a full disk while copying the folder): --resume names it, continues
    from the checkpoint before, and ends with the weights of the uninterrupted run."""
    run = tmp_path / "run"
    shutil.copytree(checkpointed_run, run)
    (run / "model.safetensors").unlink()
    shard = run / "checkpoints" / "step-00000004" / "state" / "__0_0.distcp"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:size // 3])
    result = invoke(*distill_args(models, run, "--resume", "--save-every", "2"))
    assert result.exit_code == 0, result.output
    assert (f"warning: {shard.parent.parent}: state/__0_0.distcp is cut short ({size // 3} of {size} bytes); "
            "skipped, continuing from step-00000002.") in result.output
    want, got = load_file(str(checkpointed_run / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert all(torch.allclose(want[k], got[k], rtol=0, atol=1e-6) for k in want)
    # Every checkpoint cut short: one line naming the newest, and what to do.
    for step in ("step-00000002", "step-00000004"):
        shard = run / "checkpoints" / step / "state" / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:100])
    line = one_error_line(invoke(*distill_args(models, run, "--resume")))
    assert line.startswith(f"error: {run / 'checkpoints' / 'step-00000004'}: state/__0_0.distcp is cut short (100 of ")
    assert line.endswith("no earlier checkpoint is whole (step-00000004, step-00000002). Start again in another --out.")
    assert training.checkpoint_problem(checkpointed_run / "checkpoints" / "step-00000004") is None


def test_a_json_config_whose_top_level_is_not_an_object(tmp_path):
    config = tmp_path / "c.json"
    config.write_text("[1, 2]")
    assert one_error_line(invoke("distill", "--config", config)) == (
        f'error: {config}: the top level is a JSON list, not an object of options (e.g. {{"lr": 0.0005}}).')


def test_bad_numbers_and_devices(models, small_store, tmp_path):
    """--lr -1 / nan reached AdamW's ValueError; --max-length 0 a store error; --topk above the vocabulary a numpy
    broadcast error; --device cuda without a GPU torch's AssertionError."""
    for lr, want in (("-1", "--lr must be > 0, found -1.0."), ("nan", "--lr must be a finite number > 0, found nan.")):
        assert one_error_line(invoke(*distill_args(models, tmp_path / "r", "--lr", lr))) == f"error: command line: {want}"
    assert one_error_line(invoke(*distill_args(models, tmp_path / "r", "--max-length", "0"))) == (
        "error: command line: --max-length must be >= 1, found 0.")
    line = one_error_line(invoke(*cache_args(models["teacher"], tmp_path / "t.zarr", "--topk", "100000", limit=2)))
    assert line == ("error: --topk 100000 is above the teacher's vocabulary (32000 tokens). Pass at most 32000 (0 = no "
                    "top-k).")
    assert not (tmp_path / "t.zarr").exists()
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
    for args in (distill_args(models, tmp_path / "r", "--device", "cuda"),
                 cache_args(models["teacher"], tmp_path / "u.zarr", "--device", "cuda", limit=2),
                 ["score", "--model", models["student"], "--data", DATA, "--out", tmp_path / "s", "--device", "cuda"]):
        line = one_error_line(invoke(*args))
        assert line.startswith(f"error: --device cuda: {why}") and "Pass --device cpu" in line, line
