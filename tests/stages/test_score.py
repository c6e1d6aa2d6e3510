import json
import warnings
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from rouge_score import rouge_scorer

from dskd_pipe.pipeline.config import ConfigError, ScoreConfig
from dskd_pipe.pipeline.data import DataError, load_examples
from dskd_pipe.pipeline.generation import decode_response, evaluate_rouge, generate, left_pad, tokenize_prompts
from dskd_pipe.pipeline.models import load_causal_lm, load_tokenizer, save_tiny_model
from dskd_pipe.stages import score
from dskd_pipe.stages.cli import main
from dskd_pipe.stages.score import markdown_table, run, run_generate


TOK = "tests/fixtures/tokenizers"
DOLLY = "tests/fixtures/data/dolly_test_20.jsonl"
SELFINST = "tests/fixtures/data/selfinst_20.jsonl"
FAST = ScoreConfig(max_new_tokens=8, batch_size=3, seeds=(10, 20), progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny random GPT-2 and Llama folders (real tokenizers), built once for the module."""
    root = tmp_path_factory.mktemp("models")
    folders = {}
    for arch, tok in (("gpt2", "gpt2"), ("llama", "llama2")):
        folders[arch] = str(save_tiny_model(root / arch, arch, load_tokenizer(f"{TOK}/{tok}"), d_model=32, layers=1))
    return folders


def _load(folder):
    return load_causal_lm(folder, device="cpu"), load_tokenizer(folder)


def _direct(pred, refs):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return max(scorer.score(r, pred)["rougeL"].fmeasure for r in refs)


# --- generation ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_greedy_equals_unbatched(tiny, arch):
    model, tok = _load(tiny[arch])
    prompts = [e.prompt for e in load_examples(DOLLY, limit=6)]
    assert len({len(r) for r in tokenize_prompts(tok, prompts, 256)}) > 3  # batches really mix lengths (padding)
    cfg = replace(FAST, greedy=True)
    batched = generate(model, tok, prompts, 10, cfg)
    single = [generate(model, tok, [p], 10, replace(cfg, batch_size=1))[0] for p in prompts]
    assert batched == single
    assert any(batched)


def test_sampling_is_deterministic_per_seed(tiny):
    model, tok = _load(tiny["gpt2"])
    prompts = [e.prompt for e in load_examples(DOLLY, limit=5)]
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first = generate(model, tok, prompts, 10, FAST)
    assert torch.equal(torch.rand(3), before)  # the caller's RNG stream is left as it was
    assert generate(model, tok, prompts, 10, FAST) == first
    assert generate(model, tok, prompts, 20, FAST) != first


def test_the_models_generation_config_does_not_leak(tiny):
    model, tok = _load(tiny["gpt2"])
    prompts = [e.prompt for e in load_examples(DOLLY, limit=5)]
    sampled = generate(model, tok, prompts, 10, FAST)
    model.generation_config.top_k = 1  # would turn sampling into greedy decoding if it leaked
    model.generation_config.max_new_tokens = 2
    assert generate(model, tok, prompts, 10, FAST) == sampled
    assert model.generation_config.top_k == 1  # restored after the call
    model.train()  # GPT-2 has dropout 0.1: off while generating, and the mode is restored after
    assert generate(model, tok, prompts, 10, FAST) == sampled and model.training


def test_prompts_have_no_bos_and_are_cut():
    tok = load_tokenizer(f"{TOK}/llama2")
    rows = tokenize_prompts(tok, ["Hello world, this is a prompt.", "Hi"], max_prompt_length=4)
    assert rows[0] == tok("Hello world, this is a prompt.", add_special_tokens=False)["input_ids"][:4]
    assert tok.bos_token_id not in rows[0] + rows[1]
    ids, mask = left_pad(rows, pad_id=0)
    assert ids.shape == (2, 4)
    n = len(rows[1])
    assert n < 4 and mask.tolist() == [[1, 1, 1, 1], [0] * (4 - n) + [1] * n]
    assert ids[1, 4 - n:].tolist() == rows[1] and ids[1, :4 - n].tolist() == [0] * (4 - n)


def test_decode_cuts_at_eos_id_and_eos_text():
    tok = load_tokenizer(f"{TOK}/gpt2")
    eos = tok.eos_token_id
    ids = tok(" An answer.", add_special_tokens=False)["input_ids"]
    later = tok(" more", add_special_tokens=False)["input_ids"]
    assert decode_response(tok, ids + [eos] + later, eos) == "An answer."
    spelled = tok(" An answer.<|endoftext|> junk", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert eos not in spelled
    assert decode_response(tok, spelled, eos) == "An answer."


def test_evaluate_rouge_matches_the_score_stage(tiny, tmp_path):
    model, tok = _load(tiny["gpt2"])
    examples = load_examples(DOLLY, limit=3)
    got = evaluate_rouge(model, tok, examples, (10,), FAST)
    texts = generate(model, tok, [e.prompt for e in examples], 10, FAST)
    assert got == pytest.approx(100 * sum(_direct(t, e.references) for t, e in zip(texts, examples)) / 3)
    out = run(replace(FAST, models=(tiny["gpt2"],), data=(DOLLY,), out=str(tmp_path / "s"), limit=3, seeds=(10,),
                      device="cpu"))
    report = json.loads((out / "report.json").read_text())
    assert report["models"]["gpt2"]["sets"]["dolly_test_20"]["per_seed"]["10"] == pytest.approx(got)


# --- the score stage ----------------------------------------------------------------------------------------------

def _cfg(tiny, tmp_path, **kw):
    base = dict(models=(tiny["gpt2"],), data=(DOLLY, f"selfinst={SELFINST}"), out=str(tmp_path / "score"), limit=3,
                device="cpu")
    return replace(FAST, **{**base, **kw})


def test_run_writes_generations_report_and_table(tiny, tmp_path):
    out = run(_cfg(tiny, tmp_path))
    report = json.loads((out / "report.json").read_text())
    assert report["sets"] == ["dolly_test_20", "selfinst"] and report["in_domain"] == "dolly_test_20"
    m = report["models"]["gpt2"]
    per_set = {}
    for s in report["sets"]:
        per_seed = []
        for seed in (10, 20):
            lines = (out / "generations" / "gpt2" / s / f"seed{seed}.jsonl").read_text().splitlines()
            header, rows = json.loads(lines[0])["header"], [json.loads(x) for x in lines[1:]]
            assert header["seed"] == seed and header["limit"] == 3 and len(rows) == 3
            assert set(rows[0]) == {"prompt", "references", "generation", "rougeL", "prompt_cut"}
            # The figures are rouge-score's, called directly on the stored strings.
            direct = [100 * _direct(r["generation"], r["references"]) for r in rows]
            assert [r["rougeL"] for r in rows] == pytest.approx(direct)
            per_seed.append(sum(direct) / 3)
        assert m["sets"][s]["mean"] == pytest.approx(sum(per_seed) / 2)
        assert m["sets"][s]["std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2)  # population std
        per_set[s] = sum(per_seed) / 2
    assert m["average"]["mean"] == pytest.approx(sum(per_set.values()) / 2)
    assert m["ood_average"]["mean"] == pytest.approx(per_set["selfinst"])
    table = (out / "report.md").read_text()
    d, o = m["sets"]["dolly_test_20"], m["sets"]["selfinst"]
    assert f"| dolly_test_20 (in-domain) | 3 | {d['mean']:.2f} ± {d['std']:.2f} |" in table
    assert f"| selfinst | 3 | {o['mean']:.2f} ± {o['std']:.2f} |" in table
    assert f"| OOD average | | {m['ood_average']['mean']:.2f} ± {m['ood_average']['std']:.2f} |" in table
    assert "seeds 10, 20" in table
    assert json.loads((out / "config.json").read_text())["config"]["max_new_tokens"] == 8
    try:  # the chart is drawn only when matplotlib is installed, and its absence is no error
        import matplotlib  # noqa: F401
        has_matplotlib = True
    except ImportError:
        has_matplotlib = False
    assert (out / "rouge_l.png").exists() == has_matplotlib


def test_chart_of_a_recipe_sized_report_fits_its_figure(tmp_path):
    """A quality recipe scores 39 models: every name must fit in the legend (matplotlib warns when the layout cannot
    place the axes and their decorations)."""
    pytest.importorskip("matplotlib")
    from dskd_pipe.stages.score import plot_report

    cell = {"mean": 70.0, "std": 1.0, "n": 3}
    models = {f"method-{i}-seed{i % 3 + 1}": {"sets": {"test": cell}, "average": cell} for i in range(39)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_report({"models": models, "sets": ["test"], "ood_sets": []}, tmp_path / "rouge_l.png")
    assert (tmp_path / "rouge_l.png").stat().st_size > 0


def test_several_models_side_by_side_and_in_domain(tiny, tmp_path):
    out = run(_cfg(tiny, tmp_path, models=(f"a={tiny['gpt2']}", f"b={tiny['llama']}"), seeds=(10,),
                   in_domain="selfinst"))
    table = (out / "report.md").read_text().splitlines()
    assert "| Set | n | a | b |" in table
    assert any(line.startswith("| selfinst (in-domain) | 3 |") for line in table)
    report = json.loads((out / "report.json").read_text())
    assert report["ood_sets"] == ["dolly_test_20"]
    b = report["models"]["b"]
    assert b["ood_average"]["mean"] == pytest.approx(b["sets"]["dolly_test_20"]["mean"])


def test_multiple_references_take_the_max(tiny, tmp_path):
    data = tmp_path / "multi.jsonl"
    data.write_text(json.dumps({"prompt": "Say something:\n", "output": ["zzz qqq", "the the the the"]}) + "\n")
    out = run(_cfg(tiny, tmp_path, data=(str(data),), seeds=(10,), greedy=True))
    row = json.loads((out / "generations" / "gpt2" / "multi" / "greedy.jsonl").read_text().splitlines()[1])
    assert row["references"] == ["zzz qqq", "the the the the"]
    assert row["rougeL"] == pytest.approx(100 * _direct(row["generation"], row["references"]))


def test_resume_reuses_finished_passes_and_not_stale_ones(tiny, tmp_path, monkeypatch):
    cfg = _cfg(tiny, tmp_path)
    out = run(cfg)
    first = (out / "report.json").read_text()
    calls = []
    real = score.generate

    def counting(*args, **kwargs):
        calls.append(args[3])  # the seed
        return real(*args, **kwargs)

    monkeypatch.setattr(score, "generate", counting)
    assert (run(cfg) / "report.json").read_text() == first and calls == []
    # An interrupted run: one pass missing, a temp file left behind.
    (out / "generations" / "gpt2" / "selfinst" / "seed20.jsonl").rename(
        out / "generations" / "gpt2" / "selfinst" / "seed20.jsonl.tmp123")
    run(cfg)
    assert calls == [20]
    assert (out / "report.json").read_text() == first
    # Different settings or limit: nothing is reused.
    calls.clear()
    run(replace(cfg, max_new_tokens=6, seeds=(10,)))
    assert calls == [10, 10]
    calls.clear()
    run(replace(cfg, max_new_tokens=6, seeds=(10,), limit=2))
    assert calls == [10, 10]
    calls.clear()
    run(replace(cfg, max_new_tokens=6, seeds=(10,), limit=2))
    assert calls == []


def test_bad_records_and_missing_files_give_clear_errors(tiny, tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file or folder\."):
        run(_cfg(tiny, tmp_path, data=(DOLLY, str(tmp_path / "nope.jsonl"))))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "output": "o"}) + "\n" + json.dumps({"prompt": "p", "answer": "o"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: no 'output' field \(found: answer, prompt\)\. "
                                        r"Rename it or pass --skip-bad\."):
        run(_cfg(tiny, tmp_path, data=(str(bad),)))
    with pytest.raises(ConfigError, match=r"--in-domain 'dolly' is not one of the sets \(dolly_test_20, selfinst\)\."):
        run(_cfg(tiny, tmp_path, in_domain="dolly"))
    with pytest.raises(ConfigError, match=r"two datas are named 'x'\. Name them apart with --data NAME=PATH\."):
        run(_cfg(tiny, tmp_path, data=(f"x={DOLLY}", f"x={SELFINST}")))
    with pytest.raises(ConfigError, match=r"missing required option\(s\): --models"):
        run(_cfg(tiny, tmp_path, models=()))
    with pytest.raises(ConfigError, match=r"temperature must be > 0 for sampling, found 0.0 \(use --greedy instead\)\."):
        run(_cfg(tiny, tmp_path, temperature=0.0))
    assert not (tmp_path / "score" / "generations").exists()  # every error came before any generation


def test_markdown_table_without_ood_sets():
    report = {"sets": ["dolly"], "in_domain": "dolly", "ood_sets": [], "seeds": ["10"], "settings": {"greedy": True},
              "models": {"m": {"sets": {"dolly": {"mean": 12.345, "std": 0.0, "n": 3}},
                               "average": {"mean": 12.345, "std": 0.0}, "ood_average": None}}}
    table = markdown_table(report)
    assert "| dolly (in-domain) | 3 | 12.35 ± 0.00 |" in table
    assert "| OOD average | | - |" in table and "greedy" in table


# --- CLI ----------------------------------------------------------------------------------------------------------

def test_cli_score(tiny, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["score", "--model", tiny["gpt2"], "--data", DOLLY, "--data", SELFINST,
                                       "--out", str(out), "--limit", "3", "--seed", "10", "--seed", "20",
                                       "--max-new-tokens", "8", "--batch-size", "2", "--device", "cpu",
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "| Set | n | gpt2 |" in result.stdout and "| selfinst_20 | 3 |" in result.stdout
    saved = json.loads((out / "config.json").read_text())["config"]
    assert saved["seeds"] == [10, 20] and saved["no_repeat_ngram_size"] == 6 and saved["top_k"] == 0
    assert sorted(p.name for p in (out / "generations" / "gpt2" / "selfinst_20").iterdir()) == [
        "seed10.jsonl", "seed20.jsonl"]


def test_cli_reports_user_errors_in_one_line(tiny, tmp_path):
    result = CliRunner().invoke(main, ["score", "--model", tiny["gpt2"], "--data", str(tmp_path / "missing.jsonl"),
                                       "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert f"error: {tmp_path / 'missing.jsonl'}: no such file or folder." in result.stderr


def test_cli_generate_writes_a_training_file(tiny, tmp_path):
    target = tmp_path / "seqkd.jsonl"
    result = CliRunner().invoke(main, ["generate", "--model", tiny["gpt2"], "--data", SELFINST, "--out", str(target),
                                       "--limit", "3", "--max-new-tokens", "8", "--greedy", "--device", "cpu",
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in target.read_text().splitlines()]
    originals = [json.loads(x) for x in open(SELFINST).read().splitlines()[:3]]
    assert [r["instruction"] for r in records] == [o["instruction"] for o in originals]
    assert [r["original_output"] for r in records] == [o["output"] for o in originals]
    model, tok = _load(tiny["gpt2"])
    prompts = [e.prompt for e in load_examples(SELFINST, limit=3)]
    expected = generate(model, tok, prompts, 10, replace(FAST, greedy=True))
    assert [r["output"] for r in records] == expected
    assert [r["prompt"] for r in records] == prompts
    # run_generate refuses to overwrite its input.
    with pytest.raises(ConfigError, match="is the --data file itself"):
        run_generate(replace(FAST, models=(tiny["gpt2"],), data=(str(target),), out=str(target)))


# --- per-set limits and "<n>" (issue 13 items 19-20) ----------------------------------------------------------------

def test_split_limit():
    from dskd_pipe.stages.score import split_limit

    assert split_limit("unni=data/unni.jsonl@10000") == ("unni=data/unni.jsonl", 10000)
    assert split_limit("data/unni.jsonl@5") == ("data/unni.jsonl", 5)
    assert split_limit("unni=data/unni.jsonl") == ("unni=data/unni.jsonl", None)
    assert split_limit(DOLLY) == (DOLLY, None)
    with pytest.raises(ConfigError, match=r"--data u=x.jsonl@ten: the limit after '@' must be a positive integer"):
        split_limit("u=x.jsonl@ten")
    with pytest.raises(ConfigError, match="positive integer"):
        split_limit("u=x.jsonl@0")


def test_per_set_limit_overrides_the_global_limit(tiny, tmp_path):
    out = run(_cfg(tiny, tmp_path, data=(f"d={DOLLY}@2", f"s={SELFINST}"), seeds=(10,), limit=4))
    report = json.loads((out / "report.json").read_text())
    assert report["set_limits"] == {"d": 2, "s": 4}
    for name, n in (("d", 2), ("s", 4)):
        lines = (out / "generations" / "gpt2" / name / "seed10.jsonl").read_text().splitlines()
        assert json.loads(lines[0])["header"]["limit"] == n and len(lines) == 1 + n
    assert "| d (in-domain) | 2 |" in (out / "report.md").read_text()


def test_literal_n_is_a_newline_in_prompts_and_references(tiny, tmp_path):
    data = tmp_path / "escaped.jsonl"
    data.write_text(json.dumps({"prompt": "Line one<n>Line two<n>### Response:<n>", "output": "a<n>b"}) + "\n")
    out = run(_cfg(tiny, tmp_path / "both", data=(str(data),), seeds=(10,), greedy=True))
    lines = (out / "generations" / "gpt2" / "escaped" / "greedy.jsonl").read_text().splitlines()
    header, row = json.loads(lines[0])["header"], json.loads(lines[1])
    assert row["prompt"] == "Line one\nLine two\n### Response:\n" and row["references"] == ["a\nb"]
    assert header["literal_n"] == "both"
    out = run(_cfg(tiny, tmp_path / "released", data=(str(data),), seeds=(10,), greedy=True, literal_n="prompts"))
    row = json.loads((out / "generations" / "gpt2" / "escaped" / "greedy.jsonl").read_text().splitlines()[1])
    assert row["prompt"] == "Line one\nLine two\n### Response:\n" and row["references"] == ["a<n>b"]
    # the released reading costs ROUGE-L: "<n>" is a word "n" to its tokenizer
    assert _direct("a b", ["a<n>b"]) < _direct("a b", ["a\nb"]) == 1.0
    # sets without "<n>" keep their old headers (finished passes of earlier runs stay valid)
    out = run(_cfg(tiny, tmp_path / "plain", seeds=(10,), greedy=True))
    assert "literal_n" not in json.loads((out / "generations" / "gpt2" / "selfinst" / "greedy.jsonl")
                                        .read_text().splitlines()[0])["header"]
    with pytest.raises(ConfigError, match="--literal-n 'x': choose one of both, prompts, none"):
        run(_cfg(tiny, tmp_path / "bad", literal_n="x"))


# --- progress and warnings (issues 14, 16) -----------------------------------------------------------------------

def _mute_model(folder, out):
    """A copy of a tiny GPT-2 whose every next token is EOS: each generation is empty."""
    model, tok = _load(folder)
    with torch.no_grad():
        eos = tok.eos_token_id
        model.transformer.wte.weight[eos] *= 1000  # the tied head: <w_v, w_eos> peaks at v = eos
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[eos])  # every hidden state = w_eos
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_one_progress_line_cut_prompts_and_empty_generations_warned(tiny, tmp_path):
    """Issue 16: one progress line for the stage, no library bars; issue 14: prompts cut at --max-prompt-length are
    counted, and a model whose every generation is empty is named."""
    mute = _mute_model(tiny["gpt2"], tmp_path / "mute")
    out = tmp_path / "s"
    result = CliRunner().invoke(main, ["score", "--model", tiny["gpt2"], "--model", f"mute={mute}", "--data", DOLLY,
                                       "--out", str(out), "--limit", "3", "--seed", "10", "--max-new-tokens", "4",
                                       "--max-prompt-length", "40", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "Loading weights" not in result.output and "it/s]" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("score  ex ")]
    assert lines[-1].startswith("score  ex 6/6 100%  model mute  set dolly_test_20  seed 10  |  ")
    tok = load_tokenizer(tiny["gpt2"])
    lengths = [len(tok(e.prompt, add_special_tokens=False)["input_ids"]) for e in load_examples(DOLLY, limit=3)]
    n_cut = sum(n > 40 for n in lengths)
    assert n_cut > 0
    assert (f"warning: gpt2 on dolly_test_20: {n_cut} of 3 prompts cut at --max-prompt-length 40 (the model sees "
            "their first 40 tokens).") in result.stderr
    assert "warning: every generation of mute is empty (3 of them): it ends each answer at once." in result.stderr
    assert "every generation of gpt2" not in result.stderr
    assert json.loads((out / "report.json").read_text())["prompts_cut"] == {
        "gpt2": {"dolly_test_20": n_cut}, "mute": {"dolly_test_20": n_cut}}
    # A rerun re-uses every pass: nothing to generate, still the warnings that depend on the files.
    again = CliRunner().invoke(main, ["score", "--model", tiny["gpt2"], "--model", f"mute={mute}", "--data", DOLLY,
                                      "--out", str(out), "--limit", "3", "--seed", "10", "--max-new-tokens", "4",
                                      "--max-prompt-length", "40", "--device", "cpu", "--quiet"])
    assert again.exit_code == 0, again.output
    assert "score  ex" not in again.stderr and "every generation of mute is empty" in again.stderr
    assert again.stdout.startswith("ROUGE-L F1")


def test_generate_warns_when_every_answer_is_empty(tiny, tmp_path):
    mute = _mute_model(tiny["gpt2"], tmp_path / "mute")
    result = CliRunner().invoke(main, ["generate", "--model", mute, "--data", SELFINST, "--out",
                                       str(tmp_path / "seqkd.jsonl"), "--limit", "2", "--max-new-tokens", "4",
                                       "--greedy", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"warning: every generation of {mute} is empty (2 of them)" in result.stderr
