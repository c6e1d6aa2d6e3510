"""stages/distill.py end to end on tiny models: every method steps, CMA-GA acts, accumulation is exact,
kill-and-resume equals one run, online equals cached, a store from other data is refused, LoRA."""
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dskd_pipe.cache.format import StoreError
from dskd_pipe.pipeline import methods
from dskd_pipe.pipeline.config import CacheConfig, ConfigError, DistillConfig
from dskd_pipe.pipeline.distributed import Processes
from dskd_pipe.pipeline.loader import Collate, DistillDataset, Side
from dskd_pipe.pipeline.methods import MethodParts, resolve
from dskd_pipe.pipeline.models import eos_token_id, load_tokenizer, pad_token_id, save_tiny_model
from dskd_pipe.pipeline.objectives.dskd import build_projectors
from dskd_pipe.pipeline.step import Trainee, accumulate_gradients
from dskd_pipe.pipeline.student import build_student
from dskd_pipe.pipeline.teacher import open_teacher
from dskd_pipe.stages import distill


TOK = "tests/fixtures/tokenizers"
DATA = "tests/fixtures/data/dolly_train_40.jsonl"
DEV = "tests/fixtures/data/dolly_test_20.jsonl"


def _no_dropout(folder: Path) -> Path:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from dskd_pipe.stages.cache_teacher import run as cache

    tmp = tmp_path_factory.mktemp("distill")
    qwen, gpt2 = load_tokenizer(f"{TOK}/qwen2"), load_tokenizer(f"{TOK}/gpt2")
    llama = load_tokenizer(f"{TOK}/llama2")
    e = {"tmp": tmp,
         "teacher_q": save_tiny_model(tmp / "tq", "qwen2", qwen, d_model=32, layers=1),
         "teacher_g": save_tiny_model(tmp / "tg", "gpt2", gpt2, d_model=48, layers=1, seed=1),
         "teacher_l": save_tiny_model(tmp / "tl", "llama", llama, d_model=32, layers=1, seed=3),
         "student": _no_dropout(save_tiny_model(tmp / "sg", "gpt2", gpt2, d_model=32, layers=1, seed=2)),
         "student_dropout": save_tiny_model(tmp / "sgd", "gpt2", gpt2, d_model=32, layers=1, seed=2)}
    for name, teacher in (("store_q", "teacher_q"), ("store_g", "teacher_g"), ("store_l", "teacher_l")):
        e[name] = cache(CacheConfig(teacher=str(e[teacher]), data=DATA, out=str(tmp / name), limit=8, max_length=64,
                                    device="cpu"))
    return e


@pytest.fixture()
def one_thread():
    """Every run of a bit-exact comparison on one CPU thread, this process and its subprocesses (the returned
    environment): multi-threaded CPU kernels are not bit-identical from run to run on a busy machine (a fresh-clone CI
    run with two pytest workers once saw kill-and-resume weights 9.6e-6 apart; run alone they are equal), and what is
    compared is the resume, not the kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    torch.set_num_threads(threads)


def _cfg(env, out, **kw) -> DistillConfig:
    base = dict(student=str(env["student"]), data=DATA, out=str(env["tmp"] / out), limit=8, max_length=64,
                micro_batch_size=2, grad_accum=2, epochs=1, num_workers=0, progress=False, device="cpu", seed=0)
    base.update(kw)
    return DistillConfig(**{k: str(v) if isinstance(v, Path) else v for k, v in base.items()})


def _weights(folder, name="model.safetensors"):
    return load_file(str(Path(folder) / name))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _metrics(out):
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method,store", [("sft", None), ("kd", "store_g"), ("dskd", "store_g"),
                                          ("dskd-cma", "store_q"), ("cma-ga", "store_q"), ("dskd-v2", "store_g"),
                                          ("dskd-v2-eta", "store_l"), ("dwa-kd", "store_q"), ("uld", "store_q"),
                                          ("mined", "store_l"), ("alm", "store_q"), ("chunk-attention", "store_q"),
                                          ("chunk-projection", "store_l"), ("prefix-kd", "store_l"),
                                          ("alm+prefix-kd", "store_q"), ("cma-ga+alm+prefix-kd", "store_q")])
def test_one_step_per_method_changes_the_student(env, method, store, monkeypatch):
    monkeypatch.setattr(methods, "TOKEN_MAP_CACHE", env["tmp"] / "token_maps")  # MinED's cache: not the user's
    cfg = _cfg(env, f"one_{method}", method=method, cache=str(env[store]) if store else "", max_steps=1,
               divergence="srkl" if method in ("kd", "dwa-kd") else "fkl")
    out = distill.run(cfg)
    assert _max_diff(_weights(out), _weights(env["student"])) > 0
    (m,) = _metrics(out)
    assert m["step"] == 1 and m["ce_student"] > 0 and 0 <= m["loader_wait_frac"] < 1 and m["tokens_per_s"] > 0
    if method != "sft":
        assert (out / "tokenizer.json").exists() and (out / "distill_config.json").exists()
    if method in ("dskd", "dskd-cma", "cma-ga", "dskd-v2", "dskd-v2-eta", "dwa-kd", "chunk-attention",
                  "chunk-projection"):
        assert {"ce_t2s", "kd_t2s", "kd_s2t", "t2s_acc", "s2t_acc"} <= m.keys()
        assert (out / "projectors.safetensors").exists()
    if method == "dwa-kd":
        assert m["dtw"] > 0
    if method in ("kd", "mined", "uld"):
        assert m["kd"] > 0
    if method.startswith("cma-ga"):
        assert {"l_d", "l_g", "d_acc_real", "d_acc_fake", "attention_entropy"} <= m.keys()
    if "alm" in method:
        assert m["alm"] > 0
    if "prefix-kd" in method:
        assert m["prefix_kd"] > 0


def test_a_new_method_is_one_entry(env, monkeypatch):
    """The loop asks the method's entry for everything: a method that exists only as an entry of METHODS trains,
    with its own trained part (saved, at the projector lr), its collate extra and its own log terms."""
    from dskd_pipe.pipeline.objectives.divergences import cross_entropy_sum

    def parts(cfg, teacher, student_tok, student, device):
        torch.manual_seed(5)
        return MethodParts(projectors=torch.nn.Linear(32, teacher.head.weight.shape[1], bias=False))

    def extras(teacher_tok, student_tok):
        return lambda items, t_lab, s_lab: {"n_items": torch.tensor(len(items))}

    def loss(x):  # CE plus a pull of the mean projected student state towards the mean teacher state
        ce = cross_entropy_sum(x.logits, x.labels)
        pull = ((x.parts.projectors(x.hidden.mean(1)) - x.teacher_hidden.mean(1)) ** 2).sum() * x.n_student
        return methods.LossTerms(ce + pull, {"ce_student": ce.detach(), "pull": pull.detach(),
                                             "items": x.batch["n_items"].float()})

    def metrics(sums, n_step):
        return {"ce_student": sums["ce_student"] / n_step, "pull": sums["pull"] / n_step, "items": sums["items"]}

    toy = methods.Method("toy", "a test method", loss, metrics, build_parts=parts, collate_extras=extras,
                         defaults={"projector_lr": 0.25})
    monkeypatch.setitem(methods.METHODS, "toy", toy)
    out = distill.run(_cfg(env, "toy", method="toy", cache=str(env["store_q"]), max_steps=2))
    m = _metrics(out)
    assert [r["step"] for r in m] == [1, 2] and all(r["items"] == 4 and r["pull"] > 0 for r in m)
    assert m[0]["projector_lr"] == 0.25 and json.loads((out / "distill_config.json").read_text())[
        "config"]["projector_lr"] == 0.25
    torch.manual_seed(5)
    init = torch.nn.Linear(32, 32, bias=False).weight.detach()
    assert float((_weights(out, "projectors.safetensors")["weight"] - init).abs().max()) > 0


def test_chunk_extras_align_label_positions(env):
    """Teacher and student with the same tokenizer: every response token is its own chunk, so the chunk matrix
    of each example is the identity on response positions (a shift of one position would break it)."""
    cfg = _cfg(env, "chunks", method="chunk-attention", cache=str(env["store_g"]))
    teacher, source = open_teacher(cfg, "cpu")
    tok = load_tokenizer(str(env["student"]))
    side = Side(tok, eos_token_id(tok), pad_token_id(tok), 256, 64)
    ds = DistillDataset(source, side, seed=0, epoch=0)
    batch = Collate(side.pad_id, teacher.pad_id, methods.chunk_extras)([ds[i] for i in range(4)])
    chunks, ms = batch["chunks"], batch["labels"] != -100
    assert chunks.shape == (4, batch["labels"].shape[1], batch["teacher_labels"].shape[1])
    for b in range(4):
        assert torch.equal(chunks[b], torch.diag(ms[b]))
    assert int(ms.sum()) > 20


def test_cma_ga_generator_moves_the_query_and_the_discriminator_is_stepped(env):
    common = dict(cache=str(env["store_q"]), max_steps=1, max_grad_norm=0.0)
    cma = distill.run(_cfg(env, "ga_off", method="dskd-cma", **common))
    ga = distill.run(_cfg(env, "ga_on", method="cma-ga", lambda_ga=1.0, **common))
    late = distill.run(_cfg(env, "ga_late", method="cma-ga", lambda_ga=1.0, ga_start_step=1, **common))
    # Step 1 of the student, t2s and s2t do not see L_G; the query projector does.
    assert _max_diff(_weights(cma), _weights(ga)) < 1e-6
    p_cma, p_ga = _weights(cma, "projectors.safetensors"), _weights(ga, "projectors.safetensors")
    for k in ("t2s.weight", "s2t.weight"):
        assert float((p_cma[k] - p_ga[k]).abs().max()) < 1e-6
    assert float((p_cma["query.weight"] - p_ga["query.weight"]).abs().max()) > 1e-6
    # Same seed, same initial D: with GA from step 0 D was stepped, with GA from step 1 it was not.
    assert _max_diff(_weights(ga, "discriminator.safetensors"), _weights(late, "discriminator.safetensors")) > 0
    assert "l_d" in _metrics(ga)[0] and "l_d" not in _metrics(late)[0]


def test_cma_ga_released_mode_keeps_d_fixed_and_moves_the_query(env):
    """--ga-mode released (issue 13 item 5): no D step, L_KQ logged as l_g, the query projector moved by the
    reversed gradient; D equals the never-stepped D of a run whose GA starts later (same seed, same init)."""
    common = dict(cache=str(env["store_q"]), max_steps=1, max_grad_norm=0.0)
    cma = distill.run(_cfg(env, "rel_off", method="dskd-cma", **common))
    rel = distill.run(_cfg(env, "rel_on", method="cma-ga", ga_mode="released", lambda_ga=1.0, **common))
    late = _weights(distill.run(_cfg(env, "rel_late", method="cma-ga", lambda_ga=1.0, ga_start_step=1, **common)),
                    "discriminator.safetensors")
    assert _max_diff(_weights(rel, "discriminator.safetensors"), late) == 0
    p_cma, p_rel = _weights(cma, "projectors.safetensors"), _weights(rel, "projectors.safetensors")
    assert float((p_cma["query.weight"] - p_rel["query.weight"]).abs().max()) > 1e-6
    (m,) = _metrics(rel)
    assert "l_g" in m and "l_d" not in m
    assert json.loads((rel / "distill_config.json").read_text())["config"]["ga_mode"] == "released"


def test_dev_rouge_selects_the_best_epoch_as_the_output(env, monkeypatch):
    """Issue 13 item 18: --dev-rouge samples dev_rouge_passes passes (no_repeat_ngram 0) each epoch, the best epoch
    becomes the run's output (the last one stays in out/last) and the curve is recorded."""
    calls = []
    scores = iter([30.0, 10.0])  # epoch 1 is the best

    def fake_rouge(model, tokenizer, examples, seeds, cfg):
        calls.append((len(examples), tuple(seeds), cfg.greedy, cfg.no_repeat_ngram_size, cfg.top_k, cfg.temperature))
        return next(scores)

    from dskd_pipe.pipeline import evaluation

    monkeypatch.setattr(evaluation, "evaluate_rouge", fake_rouge)
    out = distill.run(_cfg(env, "dev_sel", method="sft", epochs=2, dev_data=DEV, dev_rouge=True, dev_limit=3,
                           dev_rouge_passes=2))
    assert calls == [(3, (0, 1), False, 0, 0, 1.0)] * 2
    curve = json.loads((out / "dev_curve.json").read_text())
    assert [r["dev_rouge_l"] for r in curve["curve"]] == [30.0, 10.0] and curve["best"]["epoch"] == 1
    assert curve["settings"] == {"greedy": False, "passes": 2, "examples": 3, "no_repeat_ngram_size": 0}
    assert _max_diff(_weights(out), _weights(out / "best")) == 0
    assert _max_diff(_weights(out), _weights(out / "last")) > 0
    done = json.loads((out / "distill_done.json").read_text())
    assert done["student"] == "best" and done["best_epoch"] == 1 and done["dev_metric"] == "dev_rouge_l"
    assert [m["dev_rouge_l"] for m in _metrics(out) if "dev_rouge_l" in m] == [30.0, 10.0]


def _grads(env, cfg, micro):
    teacher, source = open_teacher(cfg, "cpu")
    torch.manual_seed(0)
    student = build_student(cfg, "cpu")
    projectors = build_projectors(32, teacher.head.weight.shape[1], with_query=False)
    trainable = list(student.parameters()) + list(projectors.parameters())
    accumulate_gradients(cfg, micro, Trainee(student, MethodParts(projectors)), teacher, Processes())
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in trainable]


def test_two_micro_batches_times_four_accumulation_equal_eight_times_one(env):
    cfg = resolve(_cfg(env, "accum", method="dskd", cache=str(env["store_g"])))  # as run() does
    teacher, source = open_teacher(cfg, "cpu")
    tok = load_tokenizer(str(env["student"]))
    side = Side(tok, eos_token_id(tok), pad_token_id(tok), 256, 64)
    ds = DistillDataset(source, side, seed=0, epoch=0)
    collate = Collate(side.pad_id, teacher.pad_id)
    items = [ds[i] for i in range(8)]
    small = [collate(items[k:k + 2]) for k in range(0, 8, 2)]
    big = [collate(items)]
    g_small = _grads(env, replace(cfg, micro_batch_size=2, grad_accum=4), small)
    g_big = _grads(env, replace(cfg, micro_batch_size=8, grad_accum=1), big)
    for a, b in zip(g_small, g_big):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert sum(float(g.abs().sum()) for g in g_big) > 0


@pytest.mark.slow  # an end-to-end run in its reduced (CI) size
def test_kill_and_resume_equals_an_uninterrupted_run(env, one_thread):
    kw = dict(method="cma-ga", cache=str(env["store_q"]), student=str(env["student_dropout"]), grad_accum=1,
              epochs=2, save_every=3, dev_data=DEV, dev_limit=4)
    clean = distill.run(_cfg(env, "clean", **kw))
    killed = _cfg(env, "killed", **kw)
    args = ["--cache", killed.cache, "--student", killed.student, "--method", "cma-ga", "--data", DATA,
            "--out", killed.out, "--limit", "8", "--max-length", "64", "--micro-batch-size", "2", "--grad-accum", "1",
            "--epochs", "2", "--save-every", "3", "--num-workers", "0", "--device", "cpu", "--seed", "0",
            "--dev-data", DEV, "--dev-limit", "4", "--no-progress"]
    proc = subprocess.run([sys.executable, "-c", "from dskd_pipe.stages.cli import main; main()", "distill", *args],
                          env={**os.environ, **one_thread, distill.DIE_AT_STEP_ENV: "3"}, capture_output=True,
                          text=True)
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert not (Path(killed.out) / "model.safetensors").exists()
    with pytest.raises(ConfigError, match="Pass --resume"):
        distill.run(killed)
    resumed = distill.run(replace(killed, resume=True))
    for name in ("model.safetensors", "projectors.safetensors", "discriminator.safetensors"):
        assert _max_diff(_weights(clean, name), _weights(resumed, name)) <= 1e-6, name
    steps = [m["step"] for m in _metrics(resumed) if "loss" in m]
    assert steps == list(range(1, 9))
    assert [m["loss"] for m in _metrics(resumed) if "loss" in m] == pytest.approx(
        [m["loss"] for m in _metrics(clean) if "loss" in m], rel=1e-6)
    assert (Path(clean) / "best" / "model.safetensors").exists()


def test_online_teacher_gives_the_cached_loss(env):
    cached = distill.run(_cfg(env, "cached", method="dskd-cma", cache=str(env["store_q"]), max_steps=1))
    online = distill.run(_cfg(env, "online", method="dskd-cma", teacher=str(env["teacher_q"]), max_steps=1))
    a, b = _metrics(cached)[0], _metrics(online)[0]
    for k in ("loss", "ce_t2s", "kd_t2s", "kd_s2t", "attention_entropy"):
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    assert _max_diff(_weights(cached), _weights(online)) < 1e-5


def test_fp8_store_distils_close_to_the_exact_one(env):
    """cache-teacher --hidden-storage fp8 -> distill: the same batches, a loss within fp8's error of the exact
    store's (tiny random teacher: the terms move by well under 1%), and the store is checked like any other."""
    from dskd_pipe.stages.cache_teacher import run as cache

    fp8 = cache(CacheConfig(teacher=str(env["teacher_q"]), data=DATA, out=str(env["tmp"] / "store_q8"), limit=8,
                            max_length=64, device="cpu", hidden_storage="fp8"))
    exact = distill.run(_cfg(env, "exact8", method="dskd-cma", cache=str(env["store_q"]), max_steps=1))
    approx = distill.run(_cfg(env, "fp8", method="dskd-cma", cache=str(fp8), max_steps=1))
    a, b = _metrics(exact)[0], _metrics(approx)[0]
    assert a["supervised_tokens"] == b["supervised_tokens"] and a["ce_t2s"] != b["ce_t2s"]
    for k in ("loss", "ce_t2s", "kd_t2s", "kd_s2t"):
        assert b[k] == pytest.approx(a[k], rel=1e-2), k


def test_a_store_from_other_data_is_refused(env):
    with pytest.raises(StoreError, match="was built from .*dolly_train_40.jsonl.*not .*dolly_test_20.jsonl"):
        distill.run(_cfg(env, "other", method="dskd-cma", cache=str(env["store_q"]), data=DEV))


def test_bad_options_are_reported_together(env):
    with pytest.raises(ConfigError, match=r"(?s)--divergence 'xx'.*--method 'nope'.*exactly one of --cache"):
        distill.run(_cfg(env, "bad", method="nope", divergence="xx"))


def test_lora_student_trains_adapters_and_saves_a_merged_model(env):
    pytest.importorskip("peft")
    from dskd_pipe.pipeline.models import load_causal_lm

    llama = save_tiny_model(env["tmp"] / "sl", "llama", load_tokenizer(f"{TOK}/llama2"), d_model=32, layers=1)
    out = distill.run(_cfg(env, "lora", method="dskd-cma", cache=str(env["store_q"]), student=str(llama),
                           lora_rank=4, lora_alpha=8.0, max_steps=1, lr=1e-2))
    model = load_causal_lm(str(out), device="cpu")
    before, after = _weights(llama), _weights(out)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)
    assert model.config.model_type == "llama"


# --- what a user sees: progress line, model card, curves, trackers; runs that continue another -----------------

def _cli_distill(cfg: DistillConfig, *extra):
    from click.testing import CliRunner

    from dskd_pipe.stages.cli import main

    args = ["distill", "--cache", cfg.cache, "--student", cfg.student, "--method", cfg.method, "--data", cfg.data,
            "--out", cfg.out, "--limit", str(cfg.limit), "--max-length", str(cfg.max_length), "--micro-batch-size",
            str(cfg.micro_batch_size), "--grad-accum", str(cfg.grad_accum), "--num-workers", "0", "--device", "cpu",
            "--seed", "0", *extra]
    return CliRunner().invoke(main, args)


def test_progress_line_model_card_curves_and_tensorboard(env, monkeypatch):
    """Issue 16: one progress line with the loss terms (no library bars), a model card in every student folder,
    curves.png, --report-to tensorboard; issue 14: examples cut at --max-length are counted."""
    tb = pytest.importorskip("tensorboard")
    monkeypatch.delenv("CI", raising=False)
    cfg = _cfg(env, "shown", method="cma-ga", cache=str(env["store_q"]))
    result = _cli_distill(cfg, "--epochs", "2", "--dev-data", DEV, "--dev-limit", "2", "--report-to", "tensorboard",
                          "--save-every", "1")
    assert result.exit_code == 0, result.output
    out = Path(cfg.out)
    assert "Loading weights" not in result.output and "Writing model shards" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("distill cma-ga  step ")]
    assert lines[0].startswith("distill cma-ga  step 1/4 25%  loss ")
    last = lines[-1]
    assert last.startswith("distill cma-ga  step 4/4 100%  loss ") and " tok/s)" in last and " in " in last
    for term in ("  ce ", "  ce_t2s ", "  kd_t2s ", "  kd_s2t ", "  l_g ", "  D "):
        assert term in last, term
    assert re.search(r"  D \d\.\d\d/\d\.\d\d  ", last)
    tok = load_tokenizer(str(env["student"]))
    from dskd_pipe.pipeline.data import build_sequence, load_examples

    n_cut = sum(build_sequence(tok, e.prompt, e.response, tok.eos_token_id, 256, 64).tokens_cut > 0
                for e in load_examples(DATA, limit=8))
    assert n_cut > 0 and (f"warning: {n_cut} of 8 training examples (student tokens) cut at --max-length 64 ("
                          in result.stderr)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "- cma-ga" in card
    assert f"| teacher | `{env['teacher_q']}`" in card and "| teacher store | " in card
    assert "4 optimizer steps, 2 epoch(s) done, global batch 4" in card
    assert "dskd-pipe distill --config distill_config.json --out NEW_FOLDER" in card
    assert f"dskd-pipe cache-teacher --teacher {env['teacher_q']} --data {DATA}" in card
    assert "This folder holds the dev-selected model: epoch " in card and "after the last step is in `last/`" in card
    best, last = (out / "best" / "README.md").read_text(), (out / "last" / "README.md").read_text()
    assert "The model of the best dev loss so far (`best/`)" in best and "--config ../distill_config.json" in best
    assert "The model after the last step" in last
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/l_g", "train/d_acc_real", "eval/loss"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert tb is not None


def test_quiet_prints_the_final_lines_only(env):
    cfg = _cfg(env, "quiet", method="sft")
    result = _cli_distill(cfg, "--max-steps", "1", "--quiet")
    assert result.exit_code == 0, result.output
    assert all(line.startswith("warning: ") for line in result.stderr.splitlines())  # no progress line
    assert result.stdout == f"{cfg.out}: the student after 1 steps (sft).\nstudent: {cfg.out}\n"


def test_resume_or_init_from_with_other_settings_is_refused_naming_each(env):
    """Issue 14: --resume / --init-from with a store of another teacher or another --method used to crash loading
    the checkpoint (`size mismatch for s2t.bias`, no discriminator.safetensors)."""
    first = _cfg(env, "first", method="dskd-cma", cache=str(env["store_q"]), max_steps=1)
    distill.run(first)
    other = replace(first, resume=True, method="cma-ga", cache=str(env["store_g"]), lr=1e-3)
    with pytest.raises(ConfigError) as e:
        distill.run(other)
    msg = str(e.value)
    assert msg.startswith(f"{first.out}: --resume with other settings than that run's: ")
    assert "--method ('dskd-cma' -> 'cma-ga')" in msg and "--lr (0.0005 -> 0.001)" in msg
    assert f"the store's teacher ({env['teacher_q']} -> {env['teacher_g']})" in msg
    assert "the store's teacher tokenizer" in msg and f"all in {first.out}/distill_config.json" in msg
    # What only changes how long or how visibly it runs may change.
    distill.run(replace(first, resume=True, max_steps=2, save_every=1, progress=True, quiet=True))
    nxt = _cfg(env, "next", method="cma-ga", cache=str(env["store_g"]), init_from=first.out, max_steps=1)
    with pytest.raises(ConfigError) as e:
        distill.run(nxt)
    msg = str(e.value)
    assert msg.startswith(f"{first.out}: --init-from {first.out} with other settings than that run's: ")
    assert "--method ('dskd-cma' -> 'cma-ga')" in msg and "the store's teacher (" in msg and "--lr" not in msg
    assert not Path(nxt.out).exists()  # refused before anything was written
    # Another data limit and lr: the next on-policy round's kind of change is fine.
    distill.run(replace(nxt, method="dskd-cma", cache=str(env["store_q"]), limit=6, lr=1e-4))


def test_the_store_teacher_reads_embeddings_and_tokenizer_only_when_asked(env):
    """A run from the store reads the teacher's input embedding table (1.2 GB at Qwen1.5-1.8B's size) and builds its
    tokenizer only when a method uses them; what it then gets is the store's."""
    from dskd_pipe.cache.reader import open_store

    cfg = _cfg(env, "lazy", method="uld", cache=str(env["store_q"]))
    teacher, _ = open_teacher(cfg, "cpu")
    assert teacher.loaded_embed is None and teacher.loaded_tokenizer is None
    stored = open_store(str(env["store_q"])).embeddings()
    assert torch.equal(teacher.embed, stored["weight"]) and teacher.embed_scale == float(stored["embed_scale"])
    assert teacher.loaded_embed is not None and teacher.tokenizer is not None
