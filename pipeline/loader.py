"""A torch Dataset over the teacher-state store: both tokenisations of each stored example, in a seeded order.

Each item holds the teacher view (ids, prompt length, hidden rows from the store) and the student view: the SAME
stored prompt/response text tokenised with the student tokenizer by `build_sequence` (spec/dskd.md "Sequences").
The order is a seeded permutation that depends only on (seed, epoch); under torchrun it is cut into blocks of
`rank_batch` positions (one rank's micro-batch x accumulation) dealt to the W ranks in turn, so every optimizer
step takes the next W x rank_batch examples of the order whatever the split into processes and micro-batches.
Resume state is a small dict {"epoch", "position"} (examples of that epoch's order all ranks have consumed). No
process-wide state: the reader's handles open lazily in each DataLoader worker, so many students can read one store
at once.

Online mode uses the same dataset over `TextSource` (the teacher tokenised on the fly, no hidden rows); the stage
runs the teacher model where the cached rows would be unpacked, so both modes share collate and loss code.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from dskd_pipe.pipeline.data import build_sequence, shifted_labels


@dataclass(frozen=True)
class Side:
    """How to tokenise one side: its tokenizer, EOS appended to responses, pad id, and the length limits."""

    tokenizer: object
    eos_id: int
    pad_id: int
    max_prompt_length: int = 256
    max_length: int = 512

    def encode(self, prompt: str, response: str):
        return build_sequence(self.tokenizer, prompt, response, self.eos_id, self.max_prompt_length, self.max_length)


class StoreSource:
    """Teacher view of store example i: ids [L], prompt_len, hidden [L, d] and the texts (the reader's record)."""

    def __init__(self, reader, limit: int | None = None):
        self.reader = reader
        self.n = len(reader) if limit is None else min(limit, len(reader))
        self.pad_id = int(reader.manifest.pad_id)
        self.d_model = int(reader.manifest.d_model)

    def __len__(self) -> int:
        return self.n

    def prefetch(self, indices) -> None:
        self.reader.prefetch(indices)

    def item(self, i: int) -> dict:
        rec = self.reader.read(i)
        return {"example_id": i, "ids": [int(x) for x in rec["ids"]], "prompt_len": int(rec["prompt_len"]),
                "offsets": rec["offsets"], "hidden": rec["hidden"], "prompt": rec["prompt"],
                "response": rec["response"]}


class TextSource:
    """Teacher view built from the examples with the teacher tokenizer (online mode): no hidden rows."""

    def __init__(self, examples, teacher: Side):
        self.examples = examples
        self.teacher = teacher
        self.pad_id = teacher.pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def item(self, i: int) -> dict:
        ex = self.examples[i]
        seq = self.teacher.encode(ex.prompt, ex.response)
        return {"example_id": i, "ids": seq.ids, "prompt_len": seq.prompt_len, "offsets": seq.offsets,
                "hidden": None, "prompt": ex.prompt, "response": ex.response}


class UnionSource:
    """Several sources as one: the gold store first, then stores of student samples (on-policy rounds).

    Items of a sample source carry gold=False: the KD terms use them, the student's own CE does not (spec/
    other_methods.md, DSKDv2 on-policy: "KD terms are computed on the sample, CE stays on gold data").
    """

    def __init__(self, gold, samples: list):
        self.sources = [gold, *samples]
        self.starts = np.cumsum([0] + [len(s) for s in self.sources])
        self.pad_id = gold.pad_id

    def __len__(self) -> int:
        return int(self.starts[-1])

    def prefetch(self, indices) -> None:
        for k, source in enumerate(self.sources):
            mine = [i - int(self.starts[k]) for i in indices if self.starts[k] <= i < self.starts[k + 1]]
            if mine and hasattr(source, "prefetch"):
                source.prefetch(mine)

    def item(self, i: int) -> dict:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        item = self.sources[k].item(i - int(self.starts[k]))
        item["example_id"] = i
        item["gold"] = k == 0
        return item


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of range(n) for this (seed, epoch): nothing else changes it."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def rank_positions(n: int, rank: int, world: int, rank_batch: int = 1, start: int = 0) -> np.ndarray:
    """Positions of the epoch order, from `start` on, that `rank` of `world` streams: blocks of `rank_batch`
    positions dealt to the ranks in turn (block j to rank j % world). Nothing repeated, nothing left out; the last
    blocks may be short or missing on some ranks.

    With rank_batch = micro-batch x accumulation, optimizer step s takes positions start + [s G, (s + 1) G),
    G = world x rank_batch, rank r the r-th block of them: N processes x b x k see the examples of 1 x b x (N k).
    """
    p = np.arange(start, n)
    return p[((p - start) // max(1, rank_batch)) % world == rank]


class DistillDataset(Dataset):
    """Item k = the k-th example of this rank's part of the (seed, epoch) order from position `start` on (resume;
    a position of the whole order, counted over all ranks), see rank_positions."""

    def __init__(self, source, student: Side, seed: int = 0, epoch: int = 0, rank: int = 0, world: int = 1,
                 start: int = 0, rank_batch: int = 1):
        self.source = source
        self.student = student
        order = epoch_order(len(source), seed, epoch)
        self.indices = order[rank_positions(len(source), rank, world, rank_batch, start)]
        self.epoch = epoch
        self.start = start

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, ks: list[int]) -> list[dict]:
        """A micro-batch (the DataLoader asks for all of it at once): its store reads are queued together first."""
        if hasattr(self.source, "prefetch"):
            self.source.prefetch([int(self.indices[k]) for k in ks])
        return [self[k] for k in ks]

    def __getitem__(self, k: int) -> dict:
        item = self.source.item(int(self.indices[k]))
        s = self.student.encode(item["prompt"], item["response"])
        item["student_ids"] = s.ids
        item["student_prompt_len"] = s.prompt_len
        item["student_offsets"] = s.offsets
        return item


_SLOT_ALIGN = 64  # bytes: each tensor of a shared batch starts on a cache line


def shared_batch(tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> "SharedBatch":
    """Uninitialised tensors of these shapes and dtypes, carved from ONE shared-memory buffer, for a batch that a
    DataLoader worker fills and sends.

    Sending a tensor from a worker passes its storage's file descriptor, and torch opens a socket connection to the
    worker for every descriptor the training process receives: a batch of nine separate tensors cost the training
    process 2.2 ms of CPU to receive, one buffer 0.65 ms (2-core CPU, two workers; BENCHMARKS.md, "A loader that
    keeps a GPU fed"), eight micro-batches a step. A tensor in private memory would also be copied into shared
    memory whole when sent (30 ms of a worker's 80 ms for 19 MB of teacher rows, measured earlier); allocated here,
    nothing is copied.
    """
    layout, size = [], 0
    for name, (shape, dtype) in tensors.items():
        layout.append((name, dtype, tuple(shape), size))
        size += -(-int(np.prod(shape, dtype=np.int64)) * dtype.itemsize // _SLOT_ALIGN) * _SLOT_ALIGN
    return SharedBatch(_views(torch.UntypedStorage._new_shared(max(size, 1)), layout))


def _views(storage: torch.UntypedStorage, layout: list) -> dict[str, torch.Tensor]:
    return {name: torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, shape)
            for name, dtype, shape, offset in layout}


def _unpack_batch(buffer: torch.Tensor, layout: list) -> dict[str, torch.Tensor]:
    return _views(buffer.untyped_storage(), layout)


class SharedBatch(dict):
    """A batch whose tensors all view one shared-memory buffer (`shared_batch`). Pickled (a worker sending it), it
    passes that buffer once with the tensors' places in it; unpickled, it is a plain dict of tensors."""

    def __reduce__(self):
        storage = next(iter(self.values())).untyped_storage()
        layout = [(name, t.dtype, tuple(t.shape), t.storage_offset() * t.dtype.itemsize) for name, t in self.items()]
        return _unpack_batch, (torch.empty(0, dtype=torch.uint8).set_(storage), layout)


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


class Collate:
    """Right-pads both views into one batch dict.

    input_ids/attention_mask/labels [B, S] (student pad id, labels -100 on pads and prompt);
    teacher_input_ids/teacher_attention_mask/teacher_labels [B, T] (teacher pad id from the manifest);
    teacher_hidden_rows [N, d] when the source has hidden rows: the rows of the teacher's real input positions only,
    example after example (N = teacher_attention_mask.sum()); `teacher_hidden(batch)` pads them to [B, T, d] with
    zeros where the batch is used (on the GPU), so workers copy and hand over no padding (~2.6x fewer bytes for
    16 shuffled Dolly examples a micro-batch: bench/loader.py); example_ids [B]; gold [B] bool (False for student
    samples of on-policy rounds: no student CE on them).
    """

    def __init__(self, student_pad_id: int, teacher_pad_id: int, extras=None):
        self.student_pad_id = student_pad_id
        self.teacher_pad_id = teacher_pad_id
        # extras(items, teacher_label_rows, student_label_rows) -> {name: tensor}: per-batch token alignments that
        # a method needs (ETA pairs, chunks), built here so that DataLoader workers do the CPU work off the training
        # loop. Items carry both views' character offsets ("offsets", "student_offsets").
        self.extras = extras

    def __call__(self, items: list[dict]) -> dict:
        s_in = [it["student_ids"][:-1] for it in items]
        s_lab = [shifted_labels(it["student_ids"], it["student_prompt_len"]) for it in items]
        t_in = [it["ids"][:-1] for it in items]
        t_lab = [shifted_labels(it["ids"], it["prompt_len"]) for it in items]
        input_ids = _pad(s_in, self.student_pad_id)
        t_ids = _pad(t_in, self.teacher_pad_id)
        batch = {
            "input_ids": input_ids,
            "attention_mask": (torch.arange(input_ids.shape[1])[None] < torch.tensor([len(r) for r in s_in])[:, None]
                               ).long(),
            "labels": _pad(s_lab, -100),
            "teacher_input_ids": t_ids,
            "teacher_attention_mask": (torch.arange(t_ids.shape[1])[None]
                                       < torch.tensor([len(r) for r in t_in])[:, None]).long(),
            "teacher_labels": _pad(t_lab, -100),
            "example_ids": torch.tensor([it["example_id"] for it in items], dtype=torch.long),
            "gold": torch.tensor([it.get("gold", True) for it in items], dtype=torch.bool),
        }
        rows = None
        if items[0]["hidden"] is not None:
            rows = [it["hidden"][:len(t_in[b])] for b, it in enumerate(items)]  # row k: state after ids[0..k]
        if self.extras is not None:
            batch.update(self.extras(items, t_lab, s_lab))
        if get_worker_info() is None:  # the training process itself: plain tensors
            if rows is not None:
                batch["teacher_hidden_rows"] = torch.cat(rows)
            return batch
        shapes = {name: (t.shape, t.dtype) for name, t in batch.items()}
        if rows is not None:
            shapes["teacher_hidden_rows"] = ((sum(len(r) for r in rows), rows[0].shape[-1]), rows[0].dtype)  # [N, d]
        shared = shared_batch(shapes)
        for name, t in batch.items():
            shared[name].copy_(t)
        if rows is not None:
            torch.cat(rows, out=shared["teacher_hidden_rows"])
        return shared


def teacher_hidden(batch: dict) -> torch.Tensor:
    """teacher_hidden [B, T, d] of a collated batch, zeros on pads, from its packed rows [N, d] (on their device)."""
    rows, mask = batch["teacher_hidden_rows"], batch["teacher_attention_mask"].bool()  # [N, d], [B, T]
    out = rows.new_zeros(mask.shape + rows.shape[-1:])
    out[mask] = rows  # right-padded: the real positions in row-major order are the packed order
    return out


def auto_num_workers(device: str) -> int:
    """DataLoader workers for --num-workers -1: enough to keep a GPU fed, never more than the cores allow.

    CPU training: 0 (workers would take the cores the step itself needs: BENCHMARKS.md, offline vs online). GPU: the
    cores this process may use (its CPU affinity, shared among torchrun's processes on the node) less one for the
    training loop, at most 8. bench/loader.py measured a worker's CPU time per 16k-token step at 0.09-0.22 s for
    2-8 KB of hidden state per token on an idle 2-core CPU (0.22-0.48 s on a busy one): 1-3 workers keep up with
    100 ms steps, 2-5 with 50 ms steps (BENCHMARKS.md, "A loader that keeps a GPU fed").
    """
    if not device.startswith("cuda"):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, per_process - 1))


LOADER_WAIT_GOAL = 0.02  # of step time: above it the GPU idles waiting for data


def loader_advice(wait_fracs: list[float], workers: int) -> str | None:
    """One line for the user when the loader held the steps up (mean wait share above 2% of step time), else None."""
    if not wait_fracs:
        return None
    mean = sum(wait_fracs) / len(wait_fracs)
    if mean <= LOADER_WAIT_GOAL:
        return None
    return (f"the data loader held up {100 * mean:.0f}% of the step time over {len(wait_fracs)} steps with "
            f"{workers} worker(s): pass --num-workers {max(2, 2 * workers)} (or more, up to the free CPU cores), "
            "or raise --prefetch-factor if the wait comes in bursts.")


def make_loader(dataset: DistillDataset, batch_size: int, collate: Collate, num_workers: int = 0,
                prefetch_factor: int = 2, pin_memory: bool = False) -> DataLoader:
    """Batches in dataset order (the dataset already holds the seeded order); workers open the store lazily."""
    kwargs = {}
    if num_workers > 0:
        kwargs = {"prefetch_factor": prefetch_factor, "persistent_workers": False}
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=False, **kwargs)
