"""bench/diagnose_dskd.py on a two-step cma-ga run: it reads the run's checkpoints (torch.distributed.checkpoint) and
the finished run, the last checkpoint and the finished run give the same numbers, and the discriminator's
separability numbers are there."""
import importlib.util
import json
import math
from pathlib import Path

from dskd_pipe.pipeline.config import CacheConfig, DistillConfig
from dskd_pipe.pipeline.models import load_tokenizer, save_tiny_model
from dskd_pipe.stages import distill
from dskd_pipe.stages.cache_teacher import run as cache

BENCH = Path(__file__).resolve().parents[2] / "bench"
TOK = "tests/fixtures/tokenizers"
DATA = "tests/fixtures/data/dolly_train_40.jsonl"


def _script():
    spec = importlib.util.spec_from_file_location("diagnose_dskd", BENCH / "diagnose_dskd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checkpoints_and_the_finished_run_are_measured_alike(tmp_path):
    llama, gpt2 = load_tokenizer(f"{TOK}/llama2"), load_tokenizer(f"{TOK}/gpt2")
    teacher = save_tiny_model(tmp_path / "teacher", "llama", llama, d_model=32, layers=1)
    # Llama blocks have no dropout: the script runs the student in train mode, so equal weights give equal numbers
    student = save_tiny_model(tmp_path / "student", "llama", gpt2, d_model=16, layers=1, seed=2)
    store = cache(CacheConfig(teacher=str(teacher), data=DATA, out=str(tmp_path / "store"), limit=8, max_length=64,
                              device="cpu"))
    run = distill.run(DistillConfig(method="cma-ga", student=str(student), cache=str(store), data=DATA, limit=8,
                                    max_length=64, micro_batch_size=4, grad_accum=1, epochs=1, save_every=1,
                                    keep_checkpoints=0, num_workers=0, progress=False, device="cpu",
                                    out=str(tmp_path / "run")))
    diagnose = _script()
    for steps in ("1,2", "final"):
        assert diagnose.main(["--run", str(run), "--data", DATA, "--batches", "1", "--steps", steps,
                              "--out", str(tmp_path / f"{steps}.json")]) == 0
    by_checkpoint = json.loads((tmp_path / "1,2.json").read_text())["checkpoints"]
    (final,) = json.loads((tmp_path / "final.json").read_text())["checkpoints"]
    assert [c["step"] for c in by_checkpoint] == [1, 2] and final["step"] == 2
    assert final["grad_norm"] == by_checkpoint[1]["grad_norm"] != by_checkpoint[0]["grad_norm"]
    d = final["discriminator"]
    assert d["dims"] == 64 and d["query_rank"] <= 32  # Linear(2 x 16, 2 x 32): queries span at most 32 of 64
    for key in ("acc_real", "acc_fake", "norm_threshold_acc", "linear_probe_acc", "linear_probe_acc_directions",
                "key_spread_outside_query_span"):
        assert math.isfinite(d[key]) and 0.0 <= d[key] <= 1.0, key
