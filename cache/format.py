"""The teacher-state store's format: names, dtypes, layouts, version, fingerprints, the write plan. Pure data, no I/O.

Layout of a store (a Zarr v3 group at a local folder or an fsspec URL). Every array is sharded with Zarr's own
`sharding_indexed` codec: a shard file holds many small inner chunks, each followed by its crc32c, and ends with an
index of (offset, length) per inner chunk that carries its own crc32c, so any Zarr v3 reader opens the store and
every stored byte is checksummed.

    manifest.partial.json       written first: the settings, fingerprints and plan hash (an unfinished store)
    manifest.json               written last, atomically: complete=true, the totals, the sha256 of every file that
                                is not an array shard (metadata, config, progress) and its own checksum
    config.json                 the resolved CacheConfig of the run that built it
    index [n_examples, 6]       int64 per example id: part, token_start, n_tokens, prompt_len, text_start, text_bytes
    texts [n_bytes]             uint8: one UTF-8 JSON object {"prompt", "response"} per example, at text_start
    head/weight [V, d]          LM head in the teacher's dtype (bf16 as uint16 raw bits), attrs: logical dtype,
    head/bias [V]               logit_scale, final_logit_softcap; bias only when the head has one
    embed/weight [V, d]         input embedding table, attrs: embed_scale
    tokenizer/<file> [n]        the teacher tokenizer's files (save_pretrained) + teacher_config.json, as bytes
    shared.json                 written after head, embeddings and tokenizer are all on disk
    parts/part-IIIII/           the rows of one writer process (shard I of N), in the plan's batch order
        hidden [N_tok, d]       post-final-norm last hidden state of EVERY token of `ids` (L rows per example);
                                with hidden_storage "fp8": float8 e4m3 bits (uint8) of h / s ...
        hidden_scale [N_tok]    ... and s = max|h| / 448 (float32), a scale per token (fp8 only)
        tokens [N_tok, 3]       int32 (teacher id, char start, char end) into prompt + response
        topk_values [N_tok, k]  optional: the k largest logits (float32) ...
        topk_indices [N_tok, k] ... their vocabulary ids (int32) ...
        logsumexp [N_tok]       ... and log-sum-exp of the full logits (float32)
        progress.json           rows on disk (a whole number of shards until the last), complete; atomic rename
        lock                    pid@host of the writer while it runs

Hidden row k of an example is the state after reading ids[0..k]; training uses rows [:-1] (inputs = ids[:-1]) with
labels ids[1:]. Top-k at row k likewise predicts ids[k+1].

The plan (`plan_store`) fixes everything about the rows before the teacher runs: examples sorted by length are cut
into batches once, over the whole data set; part I takes batches I, I+N, I+2N, ...; inside a part, rows follow the
batch order. So each example is computed in the same batch, with the same padded width, however the run was killed
and resumed or split into shards: the same inputs give the same bytes.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np

FORMAT_VERSION = 2

MANIFEST = "manifest.json"
PARTIAL_MANIFEST = "manifest.partial.json"
CONFIG = "config.json"
SHARED = "shared.json"
PROGRESS = "progress.json"
LOCK = "lock"
CREATE_LOCK = "create.lock"
FINALIZE_LOCK = "finalize.lock"
INDEX = "index"
TEXTS = "texts"
HEAD_GROUP = "head"
EMBED_GROUP = "embed"
TOKENIZER_GROUP = "tokenizer"
HIDDEN = "hidden"
HIDDEN_SCALE = "hidden_scale"
TOKENS = "tokens"
TOPK_VALUES = "topk_values"
TOPK_INDICES = "topk_indices"
LOGSUMEXP = "logsumexp"
INDEX_FIELDS = ("part", "token_start", "n_tokens", "prompt_len", "text_start", "text_bytes")

# Logical dtype -> numpy dtype on disk. Zarr has no bfloat16: its raw bits are stored as uint16.
STORAGE_DTYPES = {"bfloat16": "uint16", "float16": "float16", "float32": "float32"}
COMPRESSIONS = ("none", "zstd", "blosc")
# "exact": the teacher's dtype; "fp8": float8 e4m3 with a scale per token, d_model + 4 bytes per token
# (cache.writer.encode_fp8; measured against exact in BENCHMARKS.md "Half the bytes per token").
HIDDEN_STORAGES = ("exact", "fp8")

# Arrays stored once per store (head, embeddings, tokenizer files, index, texts): ~1 MiB inner chunks, 32 per shard.
SHARED_CHUNK_BYTES = 1 << 20
SHARED_CHUNKS_PER_SHARD = 32


class StoreError(ValueError):
    """A store is missing, unfinished, corrupt or built from other inputs; the message names it and the fix."""

    def __init__(self, message: str = ""):
        # A DataLoader worker's error comes back as StoreError("Caught StoreError in DataLoader worker process 0.
        # Original Traceback ...: StoreError: <message>"): keep the one line the user needs.
        text = str(message)
        if text.startswith("Caught StoreError") and "\nOriginal Traceback" in text:
            last = text.rstrip().splitlines()[-1]
            text = last.split("StoreError: ", 1)[-1]
        super().__init__(text)


def part_name(index: int) -> str:
    return f"parts/part-{index:05d}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ArrayLayout:
    """How one array is stored: shape, numpy dtype on disk, shard and inner-chunk rows, compression."""

    shape: tuple[int, ...]
    dtype: str
    shard_rows: int
    chunk_rows: int
    compression: str = "none"

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows

    @property
    def n_shards(self) -> int:
        return -(-self.shape[0] // self.shard_rows)


def shared_layout(shape: tuple[int, ...], dtype: str, compression: str = "none") -> ArrayLayout:
    """Layout of an array stored once per store: ~1 MiB inner chunks, 32 of them per shard."""
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    rows = max(1, SHARED_CHUNK_BYTES // max(1, row_bytes))
    rows = 1 << (rows.bit_length() - 1)  # a power of two
    return ArrayLayout(tuple(int(s) for s in shape), str(np.dtype(dtype)), rows * SHARED_CHUNKS_PER_SHARD, rows,
                       compression)


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
    chunk_tokens: int = 32  # rows per inner chunk of the per-token arrays
    shard_tokens: int = 8192  # rows per shard file (the commit unit of a writer)
    batch_tokens: int = 8192  # padded tokens per teacher forward: part of the plan, so part of the bytes
    compression: str = "none"
    hidden_storage: str = "exact"  # HIDDEN_STORAGES
    n_parts: int = 1
    plan_sha256: str = ""
    created: bool = False  # the creator wrote the index, texts and every part's arrays
    complete: bool = False
    totals: dict = field(default_factory=lambda: {"examples": 0, "tokens": 0, "bytes": 0})
    files: dict = field(default_factory=dict)  # final manifest: sha256 of every file that is not an array shard
    format_version: int = FORMAT_VERSION

    # Settings a run must repeat to resume or join a store (a different value would change its bytes).
    SETTINGS = ("hidden_dtype", "d_model", "vocab_size", "topk", "chunk_tokens", "shard_tokens", "batch_tokens",
                "compression", "hidden_storage", "n_parts")

    @property
    def storage_dtype(self) -> str:
        return "uint8" if self.hidden_storage == "fp8" else STORAGE_DTYPES[self.hidden_dtype]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["storage_dtype"] = self.storage_dtype
        return d

    def to_json(self) -> bytes:
        """The manifest file: its content plus the sha256 of that content, so a damaged file is recognised."""
        d = self.to_dict()
        d["checksum"] = sha256_hex(_canonical(d))
        return (json.dumps(d, indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "Manifest":
        """Parse a manifest file; StoreError naming the file when it is truncated, not JSON or altered."""
        try:
            d = json.loads(data)
            if not isinstance(d, dict):
                raise ValueError(f"a JSON {type(d).__name__}, not an object")
        except (ValueError, UnicodeDecodeError) as e:
            raise StoreError(f"{where} is damaged ({len(data)} bytes, not a JSON manifest: {str(e)[:80]}).") from None
        checksum = d.pop("checksum", None)
        if checksum is not None and checksum != sha256_hex(_canonical(d)):
            raise StoreError(f"{where} is damaged (its content does not match its checksum).")
        return cls.from_dict(d, where)

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
            raise StoreError(f"{where} is damaged (malformed manifest: {e}).") from None
        if m.hidden_dtype not in STORAGE_DTYPES:
            raise StoreError(f"{where} is damaged (unknown hidden dtype '{m.hidden_dtype}').")
        if m.hidden_storage not in HIDDEN_STORAGES:
            raise StoreError(f"{where}: hidden states stored as '{m.hidden_storage}', which this dskd-pipe cannot "
                             f"read (it reads {', '.join(HIDDEN_STORAGES)}). Update dskd-pipe or rebuild the store.")
        return m

    def row_layouts(self, n_rows: int) -> dict[str, ArrayLayout]:
        """The per-token arrays of a part of `n_rows` rows. Compression applies to hidden and top-k values only;
        the tokens array (12 bytes a row, read whole per part) is one inner chunk per shard."""
        s, c = self.shard_tokens, self.chunk_tokens
        out = {HIDDEN: ArrayLayout((n_rows, self.d_model), self.storage_dtype, s, c, self.compression),
               TOKENS: ArrayLayout((n_rows, 3), "int32", s, s)}
        if self.hidden_storage == "fp8":
            out[HIDDEN_SCALE] = ArrayLayout((n_rows,), "float32", s, c)
        if self.topk:
            out[TOPK_VALUES] = ArrayLayout((n_rows, self.topk), "float32", s, c, self.compression)
            out[TOPK_INDICES] = ArrayLayout((n_rows, self.topk), "int32", s, c)
            out[LOGSUMEXP] = ArrayLayout((n_rows,), "float32", s, c)
        return out


def _canonical(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), default=str).encode()


# --- the plan ------------------------------------------------------------------------------------------------------

def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Example ids sorted by (length, id), cut into batches whose padded size B * max_len stays within batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * lengths[i] > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


@dataclass(frozen=True)
class Plan:
    """Which teacher forward computes each example and where its rows go; a function of the data and settings only.

    batches[b] lists example ids in row order; part b % n_parts writes batch b.
    """

    lengths: tuple[int, ...]
    prompt_lens: tuple[int, ...]
    batches: tuple[tuple[int, ...], ...]
    n_parts: int

    def part_batches(self, part: int) -> list[int]:
        return list(range(part, len(self.batches), self.n_parts))

    def part_examples(self, part: int) -> list[int]:
        """Example ids of a part in row order."""
        return [i for b in self.part_batches(part) for i in self.batches[b]]

    def part_rows(self, part: int) -> int:
        return sum(self.lengths[i] for i in self.part_examples(part))

    def index(self, text_bytes: list[int]) -> np.ndarray:
        """[n_examples, 6] int64 in INDEX_FIELDS order, texts laid out by example id."""
        n = len(self.lengths)
        idx = np.zeros((n, len(INDEX_FIELDS)), dtype=np.int64)
        for p in range(self.n_parts):
            start = 0
            for i in self.part_examples(p):
                idx[i, :4] = (p, start, self.lengths[i], self.prompt_lens[i])
                start += self.lengths[i]
        idx[:, 5] = text_bytes
        idx[:, 4] = np.concatenate([[0], np.cumsum(text_bytes)[:-1]]) if n else []
        return idx

    def sha256(self) -> str:
        return sha256_hex(_canonical({"lengths": self.lengths, "prompt_lens": self.prompt_lens,
                                      "batches": self.batches, "n_parts": self.n_parts}))


def plan_store(lengths: list[int], prompt_lens: list[int], batch_tokens: int, n_parts: int) -> Plan:
    """The write plan of a store: length-sorted batches over the whole data set, dealt to parts round robin."""
    batches = length_batches(list(lengths), batch_tokens)
    return Plan(tuple(int(x) for x in lengths), tuple(int(x) for x in prompt_lens),
                tuple(tuple(b) for b in batches), int(n_parts))


# --- compatibility -------------------------------------------------------------------------------------------------

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


def check_same_settings(existing: Manifest, new: Manifest, store: str) -> None:
    """A run may resume or join a store only with the settings it was started with; name the first that differs."""
    check_compatible(existing, new.fingerprints, store=store)
    for key in Manifest.SETTINGS:
        if getattr(existing, key) != getattr(new, key):
            flag = {"hidden_dtype": "--dtype", "n_parts": "--shard I/N"}.get(key, "--" + key.replace("_", "-"))
            raise StoreError(f"{store} was started with {key}={getattr(existing, key)}, not {getattr(new, key)}. "
                             f"Pass the same {flag} to finish it, or build a new store.")
    if existing.plan_sha256 and new.plan_sha256 and existing.plan_sha256 != new.plan_sha256:
        raise StoreError(f"{store} was planned from other token lengths (plan {_short(existing.plan_sha256)}, now "
                         f"{_short(new.plan_sha256)}): the tokenizer or data changed under it. Build a new store.")
