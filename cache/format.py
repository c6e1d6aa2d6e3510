"""The teacher-state store's format: names, dtypes, codecs, version, fingerprints. Pure data, no I/O.

Layout of a store (a Zarr v3 group at a local folder or an fsspec URL):

    manifest.json               written last, atomically: its presence with complete=true marks a finished store
    manifest.partial.json       written first: the same fingerprints, complete=false (an unfinished store)
    config.json                 the resolved CacheConfig of the run that built it
    head/weight [V, d]          LM head in the teacher's dtype (bf16 as uint16 raw bits), attrs: logical dtype,
    head/bias [V]               logit_scale, final_logit_softcap; bias only when the head has one
    embed/weight [V, d]         input embedding table, attrs: embed_scale
    tokenizer/<file>            the teacher tokenizer's files (save_pretrained) + teacher_config.json, as bytes
    parts/part-IIIII/           one group per writer process; shard I of N holds examples i with i % N == I
        hidden [N_tok, d]       post-final-norm last hidden state of EVERY token of `ids` (L rows per example)
        tokens [N_tok, 3]       int32 (teacher id, char start, char end) into prompt + response
        topk_values [N_tok, k]  optional: the k largest logits (float32) ...
        topk_indices [N_tok, k] ... their vocabulary ids (int32) ...
        logsumexp [N_tok]       ... and log-sum-exp of the full logits (float32)
        examples.jsonl          one line per committed example: id, token_start, n_tokens, prompt_len, texts
        progress.json           committed token count and examples.jsonl byte length (atomic rename)
        lock                    pid@host of the writer while it runs
    index/{part,token_start,n_tokens,prompt_len} [n_examples]   sorted by example id, written by finalize

Hidden row k of an example is the state after reading ids[0..k]; training uses rows [:-1] (inputs = ids[:-1]) with
labels ids[1:]. Top-k at row k likewise predicts ids[k+1]. Every array carries a crc32c checksum per chunk.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

FORMAT_VERSION = 1

MANIFEST = "manifest.json"
PARTIAL_MANIFEST = "manifest.partial.json"
CONFIG = "config.json"
PROGRESS = "progress.json"
EXAMPLES = "examples.jsonl"
LOCK = "lock"
TOKENIZER_GROUP = "tokenizer"
HIDDEN = "hidden"
TOKENS = "tokens"
TOPK_VALUES = "topk_values"
TOPK_INDICES = "topk_indices"
LOGSUMEXP = "logsumexp"
INDEX_FIELDS = ("part", "token_start", "n_tokens", "prompt_len")

# Logical dtype -> numpy dtype on disk. Zarr has no bfloat16: its raw bits are stored as uint16.
STORAGE_DTYPES = {"bfloat16": "uint16", "float16": "float16", "float32": "float32"}
COMPRESSIONS = ("none", "zstd", "blosc")


class StoreError(ValueError):
    """A store is missing, unfinished, corrupt or built from other inputs; the message names it and the fix."""


def part_name(index: int) -> str:
    return f"parts/part-{index:05d}"


@dataclass
class Manifest:
    """Everything needed to trust and use a store without the teacher."""

    fingerprints: dict  # teacher, tokenizer, data {path, sha256, limit, skip_bad, n_examples}, template, lengths
    hidden_dtype: str  # logical: bfloat16 | float16 | float32
    d_model: int
    vocab_size: int
    eos_id: int
    pad_id: int
    topk: int = 0
    chunk_tokens: int = 256
    compression: str = "none"
    n_parts: int = 1
    complete: bool = False
    totals: dict = field(default_factory=lambda: {"examples": 0, "tokens": 0, "bytes": 0})
    format_version: int = FORMAT_VERSION

    @property
    def storage_dtype(self) -> str:
        return STORAGE_DTYPES[self.hidden_dtype]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["storage_dtype"] = self.storage_dtype
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "manifest") -> "Manifest":
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(f"{where}: store format version {version}, this dskd-pipe reads version "
                             f"{FORMAT_VERSION}. Rebuild the store with this version's cache-teacher.")
        known = set(cls.__dataclass_fields__)
        try:
            m = cls(**{k: v for k, v in d.items() if k in known})
        except TypeError as e:
            raise StoreError(f"{where}: malformed manifest ({e}). Rebuild the store.") from None
        if m.hidden_dtype not in STORAGE_DTYPES:
            raise StoreError(f"{where}: unknown hidden dtype '{m.hidden_dtype}'.")
        return m


def _short(value) -> str:
    s = str(value)
    return s[:12] + "..." if len(s) > 16 else s


def check_compatible(manifest: Manifest, expected: dict, store: str = "the store") -> None:
    """Raise StoreError naming the first fingerprint in `expected` that differs from the manifest's.

    `expected` has the shape of `manifest.fingerprints` (any subset of its keys); nested dicts compare key by key.
    """
    have = manifest.fingerprints
    for key, want in expected.items():
        got = have.get(key)
        if key == "data" and isinstance(want, dict) and isinstance(got, dict):
            if want.get("sha256") != got.get("sha256"):
                raise StoreError(f"{store} was built from {got.get('path')} (sha256 {_short(got.get('sha256'))}), "
                                 f"not {want.get('path')} (sha256 {_short(want.get('sha256'))}). "
                                 "Pass the same --data or build a new store.")
            for sub in ("limit", "skip_bad", "n_examples"):
                if sub in want and want[sub] != got.get(sub):
                    raise StoreError(f"{store} was built with data {sub}={got.get(sub)}, not {want[sub]}. "
                                     f"Pass the same --{sub.replace('_', '-')} or build a new store.")
            continue
        if key == "teacher" and isinstance(want, dict) and isinstance(got, dict):
            for sub in ("config_sha256", "weights_sha256", "architecture"):
                if sub in want and want[sub] != got.get(sub):
                    raise StoreError(f"{store} was built from teacher {got.get('name')} ({sub} "
                                     f"{_short(got.get(sub))}), not {want.get('name')} ({_short(want.get(sub))}). "
                                     "Pass the same --teacher or build a new store.")
            continue
        if isinstance(want, dict) and isinstance(got, dict):
            for sub, value in want.items():
                if got.get(sub) != value:
                    flag = "--" + sub.replace("_", "-")
                    raise StoreError(f"{store} was built with {sub}={got.get(sub)}, not {value}. "
                                     f"Pass {flag} {got.get(sub)} or build a new store.")
            continue
        if want != got:
            raise StoreError(f"{store} was built with {key} {_short(got)}, not {_short(want)}. "
                             "Use the same settings or build a new store.")
