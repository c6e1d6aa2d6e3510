import json

import pytest

from dskd_pipe.pipeline.data import (DataError, build_sequence, file_fingerprint, format_prompt, load_examples,
                                     parse_record)
from dskd_pipe.pipeline.models import load_tokenizer

FIXTURES = "tests/fixtures"


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_prompt_output_and_instruction_records(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "P1", "output": "O1"},
        {"instruction": "Do it", "input": "", "output": "O2"},
        {"instruction": "Do it", "input": "ctx", "output": ["a", "b"]},
    ])
    ex = load_examples(path)
    assert ex[0].prompt == "P1" and ex[0].references == ("O1",)
    assert ex[1].prompt == format_prompt("Do it") and ex[1].prompt.endswith("### Response:\n")
    assert "### Input:\nctx\n\n### Response:\n" in ex[2].prompt
    assert ", paired with an input that provides further context" in ex[2].prompt
    assert ex[2].references == ("a", "b") and ex[2].response == "a"


def test_template_matches_dolly_prompts():
    """The shipped Dolly prompts were built with the Alpaca template: rebuilding them must give the same text."""
    for line in open(f"{FIXTURES}/data/dolly_train_40.jsonl"):
        rec = json.loads(line)
        assert format_prompt(rec["instruction"], rec["input"]) == rec["prompt"]


def test_bad_records_name_file_line_and_fix(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "output": "o"}, {"prompt": "p", "answer": "x"}])
    with pytest.raises(DataError, match=r"bad.jsonl line 2: no 'output' field \(found: answer, prompt\)\. "
                                         r"Rename it or pass --skip-bad\."):
        load_examples(path)
    path = write_jsonl(tmp_path / "broken.jsonl", [{"prompt": "p", "output": "o"}, "{not json"])
    with pytest.raises(DataError, match=r"broken.jsonl line 2: not valid JSON"):
        load_examples(path)
    with pytest.raises(DataError, match="needs a non-empty 'prompt' or 'instruction'"):
        parse_record({"output": "o"}, "x line 1")
    with pytest.raises(DataError, match="'output' must be a string or a non-empty list"):
        parse_record({"prompt": "p", "output": 3}, "x line 1")
    with pytest.raises(DataError, match="expected a JSON object"):
        parse_record([1], "x line 1")


def test_skip_bad_reports_each_and_the_count(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "output": "o"}, "{", {"prompt": "p"},
                                              {"prompt": "q", "output": "o"}])
    seen = []
    ex = load_examples(path, skip_bad=True, report=seen.append)
    assert [e.prompt for e in ex] == ["p", "q"]
    assert len(seen) == 3 and seen[-1] == f"skipped 2 bad record(s) in {path}"
    assert "line 2" in seen[0] and "line 3" in seen[1]


def test_missing_file_and_limit(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_examples(str(tmp_path / "nope.jsonl"))
    assert len(load_examples(f"{FIXTURES}/data/dolly_train_40.jsonl", limit=5)) == 5


def test_parquet_and_json(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "output": "o"}]), tmp_path / "d.parquet")
    assert load_examples(str(tmp_path / "d.parquet"))[0].where.endswith("row 0")
    (tmp_path / "d.json").write_text(json.dumps([{"prompt": "p", "output": "o"}]))
    assert load_examples(str(tmp_path / "d.json"))[0].prompt == "p"


def test_fingerprint_changes_with_content(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "output": "o"}])
    h1 = file_fingerprint(a)
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "output": "o2"}])
    assert file_fingerprint(a) != h1 and len(h1) == 64


@pytest.mark.parametrize("name", ["gpt2", "llama2", "qwen2"])
def test_sequence_follows_spec(name):
    tok = load_tokenizer(f"{FIXTURES}/tokenizers/{name}")
    prompt, response = "Below is a question.\n\n### Response:\n", "The moon is dark."
    seq = build_sequence(tok, prompt, response, tok.eos_token_id)
    p_ids = tok(prompt, add_special_tokens=False).input_ids
    r_ids = tok(response, add_special_tokens=False).input_ids
    assert seq.ids == p_ids + r_ids + [tok.eos_token_id]  # separately tokenised, no BOS, EOS appended
    assert seq.prompt_len == len(p_ids)
    text = prompt + response
    assert seq.offsets[-1] == (len(text), len(text))
    assert text[seq.offsets[seq.prompt_len][0]:seq.offsets[-2][1]].strip() == response
    inputs, labels = seq.inputs_and_labels()
    assert inputs == seq.ids[:-1]
    assert labels[:len(p_ids) - 1] == [-100] * (len(p_ids) - 1)
    assert labels[len(p_ids) - 1] == r_ids[0] and labels[-1] == tok.eos_token_id


def test_sequence_limits():
    tok = load_tokenizer(f"{FIXTURES}/tokenizers/gpt2")
    seq = build_sequence(tok, "word " * 50, "x " * 50, tok.eos_token_id, max_prompt_length=10, max_length=16)
    assert seq.prompt_len == 10 and len(seq.ids) == 16 and len(seq.offsets) == 16
    assert tok.eos_token_id not in seq.ids  # cut before EOS: the last label is then not EOS


def test_a_line_that_is_not_utf8_is_named_by_line_and_byte_and_can_be_skipped(tmp_path):
    """Issue 14: Latin-1 bytes used to raise UnicodeDecodeError, even with --skip-bad."""
    good = json.dumps({"prompt": "p", "output": "o"}).encode() + b"\n"
    latin1 = '{"prompt": "caf\u00e9", "output": "o"}\n'.encode("latin-1")
    path = tmp_path / "latin.jsonl"
    path.write_bytes(good + latin1 + good)
    with pytest.raises(DataError, match=rf"latin.jsonl line 2: not UTF-8 \(byte 0xE9 at column 16, file offset "
                                        rf"{len(good) + 15}\)\. Re-save the file as UTF-8 or pass --skip-bad\."):
        load_examples(str(path))
    seen = []
    assert len(load_examples(str(path), skip_bad=True, report=seen.append)) == 2
    assert "line 2: not UTF-8" in seen[0] and seen[-1].startswith("skipped 1 bad record(s)")
    whole = tmp_path / "latin.json"
    whole.write_bytes(b"[\n" + good.strip() + b",\n" + latin1.strip() + b"\n]")
    with pytest.raises(DataError, match=r"latin.json line 3: not UTF-8 \(byte 0xE9 at column 16"):
        load_examples(str(whole))


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "bom.jsonl").write_bytes(bom + json.dumps({"prompt": "p", "output": "o"}).encode() + b"\n")
    assert load_examples(str(tmp_path / "bom.jsonl"))[0].prompt == "p"
    (tmp_path / "bom.json").write_bytes(bom + json.dumps([{"prompt": "q", "output": "o"}]).encode())
    assert load_examples(str(tmp_path / "bom.json"))[0].prompt == "q"
