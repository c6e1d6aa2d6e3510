"""Instruction data in, token sequences out.

Records come from JSONL, JSON, Parquet files or a `datasets` name/path. Each record has either `prompt` + `output`
(a string or a list of references) or `instruction` [+ `input`] + `output`, templated with the Alpaca prompt of
spec/evaluation.md. Sequences are built exactly as spec/dskd.md "Sequences" says, for any tokenizer.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
TEMPLATE_ID = "alpaca-v1"  # recorded in store manifests: a template change must invalidate old stores


class DataError(ValueError):
    """A data file or record is not usable; the message names the file, the line/row and the fix."""


@dataclass(frozen=True)
class Example:
    """One instruction example: the full prompt text and one or more reference responses."""

    prompt: str
    references: tuple[str, ...]
    where: str  # "file line N", for error messages and reports

    @property
    def response(self) -> str:
        """The training target: the first reference."""
        return self.references[0]


@dataclass(frozen=True)
class TokenSequence:
    """One example tokenised for one model (spec/dskd.md "Sequences").

    ids = prompt ids + response ids (+ EOS), cut to max_length. `offsets[k]` is the (start, end) character span of
    token k in `prompt + response`; EOS has the empty span at the end of the text.
    """

    ids: list[int]
    prompt_len: int
    offsets: list[tuple[int, int]] = field(repr=False)
    prompt_tokens_cut: int = 0  # prompt tokens dropped at max_prompt_length
    tokens_cut: int = 0  # tokens dropped at max_length (the end of the response, EOS first)

    def inputs_and_labels(self) -> tuple[list[int], list[int]]:
        """inputs = ids[:-1]; labels = shifted_labels(ids, P)."""
        return self.ids[:-1], shifted_labels(self.ids, self.prompt_len)


def shifted_labels(ids: list[int], prompt_len: int) -> list[int]:
    """labels = ids[1:] with the first P-1 set to -100: the first supervised position is the last prompt token."""
    labels = list(ids[1:])
    for k in range(min(prompt_len - 1, len(labels))):
        labels[k] = -100
    return labels


def format_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca-style prompt of spec/evaluation.md, ending in "### Response:\\n"."""
    if input_text:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def parse_record(record: object, where: str) -> Example:
    """Turn one raw record into an Example, or raise DataError saying what is wrong and where."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(record).__name__}.")
    fields = ", ".join(sorted(record)) or "none"
    if "output" not in record:
        raise DataError(f"{where}: no 'output' field (found: {fields}). Rename it or pass --skip-bad.")
    output = record["output"]
    if isinstance(output, str):
        references = (output,)
    elif isinstance(output, list) and output and all(isinstance(o, str) for o in output):
        references = tuple(output)
    else:
        raise DataError(f"{where}: 'output' must be a string or a non-empty list of strings, "
                        f"found {type(output).__name__}. Fix the record or pass --skip-bad.")
    if not references[0].strip():
        raise DataError(f"{where}: 'output' is empty. Fix the record or pass --skip-bad.")
    if isinstance(record.get("prompt"), str) and record["prompt"].strip():
        prompt = record["prompt"]
    elif isinstance(record.get("instruction"), str) and record["instruction"].strip():
        input_text = record.get("input") or ""
        if not isinstance(input_text, str):
            raise DataError(f"{where}: 'input' must be a string, found {type(input_text).__name__}.")
        prompt = format_prompt(record["instruction"], input_text)
    else:
        raise DataError(f"{where}: needs a non-empty 'prompt' or 'instruction' field (found: {fields}). "
                        "Fix the record or pass --skip-bad.")
    return Example(prompt=prompt, references=references, where=where)


def _raw_records(path: str):
    """Yield (where, record) from a JSONL, JSON, Parquet file or a `datasets` name/path.

    A JSONL line that is not valid JSON or not UTF-8 is yielded as a DataError (so --skip-bad can skip it); a UTF-8
    byte-order mark at the start of a file is accepted.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if p.is_file() and suffix == ".json":
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            lineno = raw.count(b"\n", 0, e.start) + 1
            line_start = raw.rfind(b"\n", 0, e.start) + 1
            bad = raw[e.start:e.start + 1].hex().upper()
            raise DataError(f"{path} line {lineno}: not UTF-8 (byte 0x{bad} at column {e.start - line_start + 1}, "
                            f"file offset {e.start}). Re-save it as UTF-8.") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg}).") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records (or {{\"data\": [...]}}).")
        for i, rec in enumerate(data):
            yield f"{path} record {i}", rec
        return
    if p.is_file() and suffix == ".jsonl":
        offset = 0
        with open(p, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path} line {lineno}"
                line_offset, offset = offset, offset + len(raw)
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Windows editors)
                    raw, line_offset = raw[3:], 3
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    bad = raw[e.start:e.start + 1].hex().upper()
                    yield where, DataError(f"{where}: not UTF-8 (byte 0x{bad} at column {e.start + 1}, file offset "
                                           f"{line_offset + e.start}). Re-save the file as UTF-8 or pass --skip-bad.")
                    continue
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, DataError(f"{where}: not valid JSON ({e.msg}).")
                    continue
                yield where, rec
        return
    if p.is_file() and suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(p).to_pylist()):
            yield f"{path} row {i}", rec
        return
    if p.exists() and not p.is_dir():
        raise DataError(f"{path}: unknown data format '{suffix}'. Use .jsonl, .json, .parquet or a datasets folder.")
    if not p.exists() and (path.startswith((".", "/", "~")) or suffix in (".jsonl", ".json", ".parquet")):
        raise DataError(f"{path}: no such file or folder.")
    from dskd_pipe.pipeline.progress import silenced_datasets

    datasets = silenced_datasets()  # imported only here: it costs 1.6 s (pipeline/progress.py library_bars_off)
    try:  # a folder saved by `save_to_disk`, else a hub name or a folder of data files
        saved = p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists())
        ds = datasets.load_from_disk(path) if saved else datasets.load_dataset(path, split="train")
    except Exception as e:  # datasets raises many types; name the path and pass the reason on
        raise DataError(f"{path}: could not load as a `datasets` data set ({e}).") from e
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"]
    for i, rec in enumerate(ds):
        yield f"{path} row {i}", rec


def load_examples(path: str, limit: int | None = None, skip_bad: bool = False,
                  report=print) -> list[Example]:
    """Read the first `limit` usable records of `path` as Examples.

    A bad record raises DataError naming the file and line; with `skip_bad` it is reported through `report` and
    skipped, and the count of skipped records is reported at the end.
    """
    examples: list[Example] = []
    skipped = 0
    for where, rec in _raw_records(path):
        if limit is not None and len(examples) >= limit:
            break
        try:
            if isinstance(rec, DataError):
                raise rec
            examples.append(parse_record(rec, where))
        except DataError as e:
            if not skip_bad:
                raise
            skipped += 1
            report(f"skipped: {e}")
    if skipped:
        report(f"skipped {skipped} bad record(s) in {path}")
    if not examples:
        raise DataError(f"{path}: no usable records.")
    return examples


def file_fingerprint(path: str) -> str:
    """sha256 of a data file's bytes (of every file, in name order, for a folder); the name for a hub data set."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
    else:
        return "name:" + path
    for f in files:
        h.update(f.relative_to(p).as_posix().encode() if p.is_dir() else b"")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def build_sequence(tokenizer, prompt: str, response: str, eos_id: int,
                   max_prompt_length: int = 256, max_length: int = 512) -> TokenSequence:
    """Tokenise one example as spec/dskd.md "Sequences" says.

    Prompt and response are tokenised separately without special tokens (no BOS); the prompt is cut to its first
    `max_prompt_length` tokens; EOS is appended to the response; the whole is cut to `max_length`.
    """
    enc_p = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    enc_r = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
    p_ids = list(enc_p["input_ids"])[:max_prompt_length]
    p_off = [tuple(o) for o in enc_p["offset_mapping"]][:max_prompt_length]
    shift = len(prompt)
    r_ids = list(enc_r["input_ids"]) + [eos_id]
    end = shift + len(response)
    r_off = [(a + shift, b + shift) for a, b in enc_r["offset_mapping"]] + [(end, end)]
    ids = (p_ids + r_ids)[:max_length]
    offsets = (p_off + r_off)[:max_length]
    return TokenSequence(ids=ids, prompt_len=len(p_ids), offsets=offsets,
                         prompt_tokens_cut=len(enc_p["input_ids"]) - len(p_ids),
                         tokens_cut=len(p_ids) + len(r_ids) - len(ids))


def cut_report(seqs, max_prompt_length: int, max_length: int, what: str = "examples") -> str | None:
    """One line saying how many sequences lost tokens at the length limits, or None when none did."""
    seqs = list(seqs)
    cut = sum(1 for s in seqs if s.tokens_cut)
    prompt_cut = sum(1 for s in seqs if s.prompt_tokens_cut)
    if not cut and not prompt_cut:
        return None
    parts = []
    if cut:
        dropped = sum(s.tokens_cut for s in seqs)
        parts.append(f"{cut} of {len(seqs)} {what} cut at --max-length {max_length} ({dropped} response tokens "
                     "dropped, the EOS with them)")
    if prompt_cut:
        parts.append(f"{prompt_cut} prompt(s) cut at --max-prompt-length {max_prompt_length}")
    return "; ".join(parts) + ". Raise the limits to keep them whole."
