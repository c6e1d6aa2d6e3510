"""examples/: both scripts run at tiny size on a store and print held-out losses that are those of the students
they trained (recomputed here from the saved folders), lower than the starting student's, sft next to alm."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import dskd_pipe as dp
from dskd_pipe.pipeline.models import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
PRINTED = re.compile(r"^held-out loss \(nats per student token, 4 examples\): sft (\d+\.\d{4})  alm (\d+\.\d{4})$",
                     re.M)


@pytest.fixture(scope="module")
def env(tiny_store, tmp_path_factory):
    """A tiny Qwen2 teacher's store of 16 examples (12 to train, 4 held out) and a tiny GPT-2 student."""
    return {**tiny_store("qwen2", "qwen2", limit=16, max_length=64), "tmp": tmp_path_factory.mktemp("examples")}


def _script(name: str):
    """The script as a module (its main() is what `python examples/NAME.py` runs)."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _held_out(env, folder) -> float:
    from transformers import AutoModelForCausalLM

    store = dp.open_store(env["store"])
    tok = load_tokenizer(str(folder))
    data = dp.StoreDataset(store, tok, indices=range(12, 16))
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    return dp.held_out_loss(model, DataLoader(data, batch_size=2, collate_fn=dp.store_collate(store, tok)))


def _check(env, out: Path, printed: str, returned: dict) -> None:
    (match,) = PRINTED.findall(printed)
    start = _held_out(env, env["student"])
    for name, value in zip(("sft", "alm"), match):
        assert float(value) == pytest.approx(returned[name], abs=5e-5)
        assert returned[name] == pytest.approx(_held_out(env, out / name), rel=1e-5)  # the saved student's loss
        assert returned[name] < start - 0.05, (name, returned[name], start)  # it learnt
    assert returned["sft"] != returned["alm"]


def test_plain_pytorch_loop(env, capsys):
    out = env["tmp"] / "loop"
    losses = _script("distill_loop").main(["--store", env["store"], "--student", env["student"], "--steps", "6",
                                           "--batch-size", "4", "--lr", "1e-2", "--holdout", "4", "--device", "cpu",
                                           "--out", str(out)])
    _check(env, out, capsys.readouterr().out, losses)


def test_hugging_face_trainer(env, capsys):
    out = env["tmp"] / "trainer"
    torch.manual_seed(0)
    losses = _script("distill_hf_trainer").main([
        "--store", env["store"], "--student", env["student"], "--holdout", "4", "--output_dir", str(out),
        "--max_steps", "6", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--report_to", "none",
        "--save_strategy", "no", "--use_cpu", "--disable_tqdm", "true", "--seed", "0"])
    _check(env, out, capsys.readouterr().out, losses)
