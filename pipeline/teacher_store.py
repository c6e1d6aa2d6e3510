"""A teacher-state store as a library reads it: one example's teacher view, and its full-vocabulary distribution
rebuilt exactly from the stored LM head, never more rows of it at once than asked.

    store = open_store("runs/qwen-dolly.zarr")          # a folder or an fsspec URL (s3://..., gs://...)
    ex = store[0]                                         # ids [T], offsets [T, 2], hidden [T, d], texts
    lp = store.log_probs(ex, rows=slice(0, 8))            # [8, V] fp32: the teacher's log-softmax at those rows
    values, ids = store.topk(ex, k=20, max_rows=64)       # [T, 20], built from [<= 64, V] blocks

Row k of an example is the teacher's state after reading ids[0..k], so its distribution is over the token that
follows: ids[k + 1] on the stored text. The logits are z = (h W^T + b) * logit_scale, soft-capped when the teacher
does it (objectives/dskd.teacher_logits), in fp32 from the stored weights: the teacher's own logits, bit for bit up
to fp32 matmul order, without the teacher.

Every read goes through cache/reader.py (version, fingerprints and the crc32c of every chunk checked); the head
and embeddings are read once, on first use, and kept on `device` in fp32 (152k x 2048: 1.2 GB).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from dskd_pipe.cache.format import Manifest
from dskd_pipe.cache.reader import StoreReader
from dskd_pipe.cache.reader import open_store as open_reader
from dskd_pipe.pipeline.objectives.dskd import TeacherHead, teacher_logits

DEFAULT_MAX_ROWS = 256  # [256, 152k] fp32 = 156 MB: one block of a Qwen-vocabulary distribution


@dataclass(frozen=True)
class TeacherExample:
    """One example of a store, as the teacher saw it."""

    index: int
    """The example's number in the store."""
    ids: Tensor
    """[T] int64: the teacher's token ids (prompt, response, EOS; cut at the store's max_length)."""
    offsets: Tensor
    """[T, 2] int64: the (start, end) character span of token k in `text` (EOS: the empty span at its end)."""
    hidden: Tensor
    """[T, d]: the teacher's post-norm last hidden states in its dtype; row k after reading ids[0..k]."""
    prompt: str
    response: str
    prompt_len: int
    """How many of the ids are the prompt's: ids[prompt_len:] is the response (and EOS)."""

    @property
    def text(self) -> str:
        """prompt + response: the text `offsets` index."""
        return self.prompt + self.response


def teacher_head(parts: dict, device: str | torch.device) -> TeacherHead:
    """A store's or a model's head parts ({"weight", "bias", "logit_scale", "final_logit_softcap"}) as a TeacherHead
    in fp32 on `device`: converted once here, so rebuilding logits per batch casts nothing."""
    bias = parts["bias"]
    return TeacherHead(parts["weight"].to(device=device, dtype=torch.float32),
                       None if bias is None else bias.to(device=device, dtype=torch.float32),
                       float(parts["logit_scale"]),
                       None if parts["final_logit_softcap"] is None else float(parts["final_logit_softcap"]))


class TeacherStore:
    """A finished store, read-only: `store[i]` is example i (a TeacherExample), `len(store)` how many there are.

    `head` (TeacherHead) and `embed` / `embed_scale` are the teacher's LM head and input embeddings, loaded on first
    use; `tokenizer()` the teacher's tokenizer; `manifest` what the store holds (cache/format.Manifest). Picklable
    (DataLoader workers open their own file handles); the head is not pickled, a worker loads it if it asks.
    """

    def __init__(self, path_or_url: str, device: str | torch.device = "cpu", verify: bool = True,
                 expected: dict | None = None):
        self.url = str(path_or_url)
        """Where the store is: a folder or an fsspec URL."""
        self.device = torch.device(device)
        """Where the head, the embeddings and rebuilt distributions go."""
        self.verify = verify
        """Whether every read checks the crc32c of its chunks."""
        self._reader: StoreReader = open_reader(self.url, expected=expected, verify=verify)
        self._head: TeacherHead | None = None
        self._embed: dict | None = None
        self._tokenizer = None

    def __getstate__(self):
        return {**self.__dict__, "_head": None, "_embed": None, "_tokenizer": None}

    def __repr__(self) -> str:
        m = self.manifest
        return (f"TeacherStore({self.url!r}: {len(self)} examples, {m.totals['tokens']} tokens, d={m.d_model}, "
                f"vocabulary {m.vocab_size}, {m.hidden_dtype})")

    @property
    def manifest(self) -> Manifest:
        """What the store holds: fingerprints (teacher, tokenizer, data, template, lengths), dtype, sizes, totals."""
        return self._reader.manifest

    @property
    def vocab_size(self) -> int:
        """V: the teacher's vocabulary (rows of its head)."""
        return int(self.manifest.vocab_size)

    @property
    def lengths(self) -> dict:
        """{"max_prompt_length", "max_length"}: the teacher-side limits the store was built with."""
        return dict(self.manifest.fingerprints["lengths"])

    def __len__(self) -> int:
        return len(self._reader)

    def __getitem__(self, i: int) -> TeacherExample:
        return self.example(i)

    def example(self, i: int) -> TeacherExample:
        """Example i, every byte of it checked; IndexError names the store's size."""
        rec = self._reader.read(int(i))
        return TeacherExample(index=int(i), ids=torch.from_numpy(rec["ids"]), offsets=torch.from_numpy(rec["offsets"]),
                              hidden=rec["hidden"], prompt=rec["prompt"], response=rec["response"],
                              prompt_len=int(rec["prompt_len"]))

    @property
    def head(self) -> TeacherHead:
        """The teacher's LM head in fp32 on `device` (read once)."""
        if self._head is None:
            self._head = teacher_head(self._reader.head(), self.device)
        return self._head

    def _embeddings(self) -> dict:
        if self._embed is None:
            e = self._reader.embeddings()
            self._embed = {"weight": e["weight"].to(self.device), "embed_scale": float(e["embed_scale"])}
        return self._embed

    @property
    def embed(self) -> Tensor:
        """The teacher's input embedding table [V, d] in its dtype, on `device` (read once)."""
        return self._embeddings()["weight"]

    @property
    def embed_scale(self) -> float:
        """What the teacher multiplies an embedding by on lookup (Gemma: sqrt(d); 1.0 for most)."""
        return self._embeddings()["embed_scale"]

    def tokenizer(self):
        """The teacher's tokenizer, rebuilt from the store (no download)."""
        if self._tokenizer is None:
            self._tokenizer = self._reader.tokenizer()
        return self._tokenizer

    def _rows(self, example: int | TeacherExample, rows) -> Tensor:
        ex = example if isinstance(example, TeacherExample) else self.example(example)
        hidden = ex.hidden if rows is None else ex.hidden[rows]
        return hidden.to(self.device)

    def logits(self, example: int | TeacherExample, rows: slice | Sequence[int] | None = None) -> Tensor:
        """[R, V] fp32: the teacher's logits at these rows of the example (all T rows when None)."""
        return teacher_logits(self._rows(example, rows), self.head)

    def log_probs(self, example: int | TeacherExample, rows: slice | Sequence[int] | None = None,
                  temperature: float = 1.0) -> Tensor:
        """[R, V] fp32: log softmax(z / temperature) at these rows (all T rows when None: a [T, V] tensor, so ask
        for rows, or use iter_log_probs, when the vocabulary is large)."""
        return torch.log_softmax(self.logits(example, rows) / temperature, dim=-1)

    def iter_log_probs(self, example: int | TeacherExample, max_rows: int = DEFAULT_MAX_ROWS,
                       temperature: float = 1.0) -> Iterator[tuple[int, Tensor]]:
        """(first row, [<= max_rows, V] log-probabilities) over the example's rows in order: no block of the
        distribution larger than max_rows x V exists at once."""
        ex = example if isinstance(example, TeacherExample) else self.example(example)
        for start in range(0, ex.ids.shape[0], max(1, int(max_rows))):
            yield start, self.log_probs(ex, slice(start, start + max_rows), temperature)

    def topk(self, example: int | TeacherExample, k: int, max_rows: int = DEFAULT_MAX_ROWS,
             temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        """(log-probabilities [T, k] fp32, token ids [T, k] int64) of the k most likely next tokens at every row,
        from the full-vocabulary distribution built max_rows rows at a time."""
        values, ids = [], []
        for _, block in self.iter_log_probs(example, max_rows, temperature):
            v, i = block.topk(min(int(k), block.shape[-1]), dim=-1)
            values.append(v)
            ids.append(i)
        return torch.cat(values), torch.cat(ids)


def open_store(path_or_url: str, device: str | torch.device = "cpu", verify: bool = True,
               expected: dict | None = None) -> TeacherStore:
    """Open a finished teacher-state store (a folder or an fsspec URL) read-only.

    device: where the head, the embeddings and rebuilt distributions go. verify=False skips the crc32c check of
    each read (`dskd-pipe cache-verify` still checks everything). expected: fingerprints the store must carry
    (e.g. {"data": {"path", "sha256"}}); a mismatch is a StoreError saying which.
    """
    return TeacherStore(path_or_url, device=device, verify=verify, expected=expected)


__all__ = ["TeacherStore", "TeacherExample", "open_store", "teacher_head", "DEFAULT_MAX_ROWS"]
