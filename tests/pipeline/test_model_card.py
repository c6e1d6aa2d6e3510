import json
import shlex

from dskd_pipe.stages.cli import main
from dskd_pipe.pipeline.config import CacheConfig, DistillConfig, config_to_dict, load_config
from dskd_pipe.pipeline.model_card import cache_command, final_metrics, flag_command, model_card, train_keys

STORE = {"path": "runs/qwen.zarr",
         "fingerprints": {"teacher": {"name": "Qwen/Qwen1.5-1.8B", "architecture": "Qwen2ForCausalLM",
                                      "revision": "abc123", "weights_sha256": {"model.safetensors": "f" * 64}},
                          "tokenizer": "9" * 64, "template": "alpaca-v1",
                          "data": {"path": "dolly/train.jsonl", "sha256": "9c1e" + "0" * 60, "n_examples": 200}},
         "config": config_to_dict(CacheConfig(teacher="Qwen/Qwen1.5-1.8B", data="dolly/train.jsonl",
                                              out="runs/qwen.zarr", topk=0, max_length=256))}


def _parse(command: str, name: str, cls):
    args = shlex.split(command)
    assert args[:2] == ["dskd-pipe", name]
    ctx = main.commands[name].make_context(name, args[2:])
    return load_config(cls, None, {k: v for k, v in ctx.params.items() if k != "config_path"})


def test_flag_command_reproduces_the_resolved_config():
    cfg = DistillConfig(cache="runs/qwen.zarr", student="gpt2", method="cma-ga", data="dolly/train.jsonl",
                        out="runs/x", lr=2e-4, lambda_ga=0.2, epochs=3, dev_rouge=True, dev_data="dolly/dev.jsonl",
                        sample_caches=("a.zarr", "b.zarr"), progress=False, resume=True)
    command = flag_command(cfg, out="runs/again")
    assert command.startswith("dskd-pipe distill ") and "--progress" not in command and "--resume" not in command
    again = _parse(command, "distill", DistillConfig)
    assert config_to_dict(again) == {**config_to_dict(cfg), "out": "runs/again", "progress": True, "resume": False}
    # every option has a flag now (config.option): min_lr too; only "not set" after a set default has no spelling
    assert "--min-lr 0.0" in flag_command(DistillConfig(student="s", data="d", out="o", min_lr=0.0))
    assert flag_command(DistillConfig(student="s", data="d", out="o", dev_limit=None)) is None
    store_cfg = _parse(cache_command(STORE["config"]), "cache-teacher", CacheConfig)
    assert store_cfg == CacheConfig(**STORE["config"])


def test_card_has_hf_metadata_provenance_metrics_and_commands(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 2.0 + s, "ce_student": 1.0, "kd_t2s": 0.5, "l_g": 0.69, "d_acc_real": 0.5,
                "d_acc_fake": 0.5, "supervised_tokens": 10.0} for s in range(1, 13)]
    records.insert(6, {"step": 6, "epoch": 1, "dev_loss": 2.5, "dev_rouge_l": 20.0})
    records.append({"step": 12, "epoch": 2, "dev_loss": 2.0, "dev_rouge_l": 18.5})
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    from dskd_pipe.pipeline.methods import resolve

    cfg = resolve(DistillConfig(cache="runs/qwen.zarr", student="gpt2", method="cma-ga", data="dolly/train.jsonl",
                                out=str(tmp_path), dev_data="dolly/dev.jsonl", dev_rouge=True, micro_batch_size=2,
                                grad_accum=4, lambda_ga=0.2))
    card = model_card(cfg, folder=str(tmp_path), steps=12, epochs=2, world=2, store=STORE,
                      metrics=final_metrics(metrics, train_keys(cfg.method)))
    head, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: transformers" in head and "base_model: gpt2" in head
    assert "- dskd-pipe\n- knowledge-distillation\n- cma-ga\n- cross-tokenizer" in head
    assert "datasets:" not in head  # a local file is no hub data set
    assert "| teacher | `Qwen/Qwen1.5-1.8B` (Qwen2ForCausalLM, revision abc123) |" in body
    assert "| data | `dolly/train.jsonl`, sha256 `9c1e000000000000…`, 200 examples |" in body
    assert "teacher tokenizer sha256 `9999999999999999…`" in body and "model.safetensors `ffffffffffff…`" in body
    assert "12 optimizer steps, 2 epoch(s) done, global batch 16 (2 x 4 accumulation x 2 process(es)), 120 " \
           "supervised tokens" in body
    # the KD settings, the method's own published values, and what differs from the method's defaults
    assert "| method settings | kd_rate 0.5, kd_temperature 2, divergence `fkl`, projector_lr 0.001, lambda_ga 0.2 |" \
        in body
    # the last 10 training steps: loss 2 + (3..12) -> mean 9.5
    assert "| loss | ce_student | kd_t2s | l_g | d_acc_real | d_acc_fake |" in body and "| 9.5 | 1 | 0.5 |" in body
    assert "at step 12: loss 2, greedy ROUGE-L 18.50; best ROUGE-L 20.00 at step 6." in body
    assert f'AutoModelForCausalLM.from_pretrained("{tmp_path}")' in body
    assert "dskd-pipe cache-teacher --teacher Qwen/Qwen1.5-1.8B --data dolly/train.jsonl --out runs/qwen.zarr " \
           "--max-length 256   # the teacher store" in body
    assert "dskd-pipe distill --config distill_config.json --out NEW_FOLDER" in body
    assert "dskd-pipe distill --cache runs/qwen.zarr --student gpt2 --method cma-ga" in body
    # what the quality benchmark measured for the method, negative results included
    assert "On the project's quality benchmark (BENCHMARKS.md), `cma-ga`: no measurable difference from sft" in body


def test_every_built_in_method_says_what_the_benchmark_measured_for_it_or_that_it_was_not_run():
    """A card states its method's measured result; the methods the benchmark does not run are the same-tokenizer
    DSKDv2 and the chunk-projection ablation."""
    from dskd_pipe.pipeline.methods import METHODS
    from dskd_pipe.pipeline.model_card import MEASURED

    assert set(METHODS) - set(MEASURED) == {"dskd-v2", "chunk-projection"}
    card = model_card(DistillConfig(cache="s.zarr", student="s", method="alm+prefix-kd", data="d.jsonl", out="o"),
                      folder="o", steps=0, epochs=0)
    assert "`alm+prefix-kd`: -0.0109 nats/char against sft [-0.0164, -0.0055]: 66% of plain KD's" in card


def test_sft_card_without_teacher_or_metrics():
    cfg = DistillConfig(student="./models/tiny", method="sft", data="train.jsonl", out="o")
    card = model_card(cfg, folder="o", steps=0, epochs=0)
    assert "base_model" not in card and "| teacher |" not in card and "No metrics were logged." in card
    assert "# A fine-tuned model (sft)" in card
