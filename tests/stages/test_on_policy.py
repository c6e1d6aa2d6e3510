"""stages/on_policy.py: refresh rounds on student samples, each step its own process; CE stays on gold data;
one LR schedule and one step count across rounds; a rerun keeps finished steps; other settings are refused."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dskd_pipe.cache.reader import open_store
from dskd_pipe.pipeline.config import CacheConfig, ConfigError, DistillConfig, OnPolicyConfig, load_config
from dskd_pipe.pipeline.loader import Collate, DistillDataset, Side, StoreSource, UnionSource
from dskd_pipe.pipeline.methods import build_parts, resolve
from dskd_pipe.pipeline.models import eos_token_id, load_tokenizer, pad_token_id, save_tiny_model
from dskd_pipe.pipeline.run_folder import DONE
from dskd_pipe.pipeline.step import micro_batch_loss
from dskd_pipe.pipeline.student import build_student
from dskd_pipe.pipeline.teacher import open_teacher
from dskd_pipe.stages import on_policy
from dskd_pipe.stages.cli import main


TOK = "tests/fixtures/tokenizers"
DATA = str(Path("tests/fixtures/data/dolly_train_40.jsonl").resolve())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from dskd_pipe.stages.cache_teacher import run as cache

    tmp = tmp_path_factory.mktemp("on_policy")
    # Llama-2's 32k vocabulary, not Qwen's 151k: every step here is its own process that loads the teacher's head
    llama, gpt2 = load_tokenizer(f"{TOK}/llama2"), load_tokenizer(f"{TOK}/gpt2")
    teacher = save_tiny_model(tmp / "teacher", "llama", llama, d_model=32, layers=1)
    student = save_tiny_model(tmp / "student", "gpt2", gpt2, d_model=32, layers=1, seed=2)
    store = cache(CacheConfig(teacher=str(teacher), data=DATA, out=str(tmp / "gold.zarr"), limit=8, max_length=64,
                              max_prompt_length=48, device="cpu"))
    distill_toml = tmp / "distill.toml"
    distill_toml.write_text(f'''
method = "dskd-cma"
student = "{student}"
cache = "{store}"
data = "{DATA}"
out = "{tmp / 'unused'}"
limit = 8
max_length = 64
max_prompt_length = 48
micro_batch_size = 2
grad_accum = 2
warmup_steps = 1
num_workers = 0
progress = false
device = "cpu"
seed = 3
''')
    return {"tmp": tmp, "teacher": teacher, "student": student, "store": store, "distill": distill_toml}


def _in_this_process(cmd: list[str]) -> int:
    """on_policy's launch of one step, run here through the same CLI: the command is what a user's process would
    get, without starting torch and transformers four times over (~10 s each on 2 cores)."""
    assert cmd[:3] == [sys.executable, "-m", "dskd_pipe"], cmd
    result = CliRunner().invoke(main, cmd[3:])
    print(result.output, end="")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code


def _metrics(folder):
    return [json.loads(ln) for ln in (Path(folder) / "metrics.jsonl").read_text().splitlines() if "loss" in ln]


def test_round_prompts_and_schedule_are_fixed_by_the_settings():
    a = on_policy.round_prompts(40, 0.5, 3, 1)
    assert a == on_policy.round_prompts(40, 0.5, 3, 1) and len(a) == 20 and a == sorted(set(a))
    assert a != on_policy.round_prompts(40, 0.5, 3, 2)  # each round draws its own prompts
    assert len(on_policy.round_prompts(40, 0.01, 3, 1)) == 1
    base = DistillConfig(micro_batch_size=2, grad_accum=2)
    cfg = OnPolicyConfig(rounds=2, start_epochs=3, epochs_per_round=1)
    # gold 8 -> 2 steps/epoch x 3; round 1: 12 examples -> 3 steps; round 2: 16 -> 4 steps
    assert on_policy.schedule_steps(8, 4, cfg, base) == 6 + 3 + 4


def test_samples_feed_kd_terms_only(env):
    """A sample row adds its KD terms but no student CE: the same batch marked gold has the same KD terms and a
    larger CE."""
    cfg = resolve(load_config(DistillConfig, env["distill"], {"method": "dskd-cma"}))  # as distill.run does
    teacher, _ = open_teacher(cfg, "cpu")
    gold = StoreSource(open_store(env["store"]), limit=4)
    source = UnionSource(gold, [StoreSource(open_store(env["store"]), limit=2)])  # the store stands in for samples
    assert len(source) == 6 and not source.item(5)["gold"] and source.item(3)["gold"]
    tok = load_tokenizer(str(env["student"]))
    side = Side(tok, eos_token_id(tok), pad_token_id(tok), 48, 64)
    items = [DistillDataset(source, side)[k] for k in range(6)]
    items = [it for it in items if it["gold"]][:1] + [it for it in items if not it["gold"]][:1]
    batch = Collate(side.pad_id, teacher.pad_id)(items)
    assert batch["gold"].tolist() == [True, False]
    as_gold = dict(batch, gold=torch.ones(2, dtype=torch.bool))
    student = build_student(cfg, "cpu").eval()  # no dropout: the two calls must see one function
    parts = build_parts(cfg, teacher, tok, student, "cpu")
    mixed = micro_batch_loss(cfg, batch, student, teacher, parts).logs
    both = micro_batch_loss(cfg, as_gold, student, teacher, parts).logs
    for name in ("kd_t2s", "kd_s2t", "ce_t2s"):
        torch.testing.assert_close(mixed[name], both[name])
    n0 = int(batch["teacher_attention_mask"][0].sum())  # the packed teacher rows of example 0
    row0 = dict(batch, **{k: batch[k][:1] for k in batch if k != "teacher_hidden_rows"},
                teacher_hidden_rows=batch["teacher_hidden_rows"][:n0])
    gold_only = micro_batch_loss(cfg, row0, student, teacher, parts).logs
    torch.testing.assert_close(mixed["ce_student"], gold_only["ce_student"])  # CE of the gold row only
    assert float(both["ce_student"]) > float(mixed["ce_student"]) > 0


@pytest.mark.slow  # an end-to-end run in its reduced (CI) size
def test_rounds_end_to_end_then_rerun_keeps_everything(env, capsys, monkeypatch):
    monkeypatch.setattr(on_policy.subprocess, "call", _in_this_process)
    out = env["tmp"] / "run"
    cfg = OnPolicyConfig(distill=str(env["distill"]), out=str(out), rounds=1, share=0.5, start_epochs=1,
                         epochs_per_round=1, max_new_tokens=6, generate_batch_size=4, teacher_device="cpu")
    student = on_policy.run(cfg)
    assert student == out / "round-1" / "student" and (student / DONE).is_file()

    samples = [json.loads(ln) for ln in (out / "round-1" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all("original_output" in s for s in samples)
    store = open_store(str(out / "round-1" / "samples.zarr"))
    gold = open_store(env["store"])
    assert store.manifest.complete and 1 <= len(store) <= 4  # empty samples are skipped and counted
    assert store.manifest.fingerprints["teacher"] == gold.manifest.fingerprints["teacher"]
    assert store.read(0)["prompt"] == samples[0]["prompt"] and store.read(0)["response"] == samples[0]["output"]

    # One step count and one cosine schedule over both phases: 8 gold -> 2 steps; 8 + 4 -> 3 steps.
    m0, m1 = _metrics(out / "round-0" / "student"), _metrics(student)
    assert [m["step"] for m in m0] == [1, 2] and [m["step"] for m in m1] == [3, 4, 5]
    total = json.loads((out / on_policy.DONE).read_text())["schedule_steps"]
    assert total == 5
    lr, floor = 5e-4, 1e-7 / 5e-4
    for m in m0[1:] + m1:  # after the 1-step warm-up: the cosine of the whole run
        k = m["step"] - 1
        want = lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (k - 1) / (total - 1))))
        assert m["lr"] == pytest.approx(want, rel=1e-6)
    before = (student / "model.safetensors").stat().st_mtime_ns

    capsys.readouterr()
    assert on_policy.run(cfg) == student
    said = capsys.readouterr().out
    assert said.count("kept") == 4 and "dskd-pipe" not in said  # nothing re-run
    assert (student / "model.safetensors").stat().st_mtime_ns == before

    with pytest.raises(ConfigError, match="other settings.*share"):
        on_policy.run(OnPolicyConfig(**{**cfg.__dict__, "share": 0.25}))


def test_bad_settings_are_refused_together(env, tmp_path):
    bad = tmp_path / "sft.toml"
    bad.write_text(env["distill"].read_text().replace('method = "dskd-cma"', 'method = "sft"\nmax_steps = 3'))
    with pytest.raises(ConfigError) as e:
        on_policy.run(OnPolicyConfig(distill=str(bad), out=str(tmp_path / "o"), share=1.5))
    text = str(e.value)
    assert "sft uses no teacher" in text and "max_steps" in text and "--share" in text


def test_nproc_per_node_runs_each_rounds_distill_under_torchrun(monkeypatch, tmp_path):
    """--nproc-per-node N: the distill steps run as N processes under torchrun; the schedule counts steps of
    micro-batch x accumulation x N examples."""
    calls = []
    monkeypatch.setattr(on_policy.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    on_policy._dskd_pipe(["distill", "--config", "x.json"], "round 0", nproc=4)
    on_policy._dskd_pipe(["generate", "--model", "m"], "round 1")
    torchrun, plain = calls
    assert torchrun[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4"]
    assert torchrun[6:] == ["-m", "dskd_pipe", "distill", "--config", "x.json"]
    assert plain[1:] == ["-m", "dskd_pipe", "generate", "--model", "m"]
    base = DistillConfig(micro_batch_size=2, grad_accum=2)
    cfg = OnPolicyConfig(rounds=2, start_epochs=3, epochs_per_round=1, nproc_per_node=2)
    # 8 per step: gold 8 -> 1 step/epoch x 3; round 1: 12 -> 2; round 2: 16 -> 2
    assert on_policy.schedule_steps(8, 4, cfg, base) == 3 + 2 + 2

