"""A torch Dataset and collate over a teacher-state store, for a student with any tokenizer: what a training loop of
your own (or Hugging Face's Trainer) needs to distil from the store, with the alignment tensors the methods use.

    data = StoreDataset(store, student_tokenizer)                     # item i: store example i, both tokenisations
    collate = store_collate(store, student_tokenizer, method="alm")   # + that method's extras (ALM's chunk ids)
    for batch in DataLoader(data, batch_size=8, shuffle=True, collate_fn=collate):
        zs = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits   # [B, S, Vs]
        ht = teacher_hidden(batch)                                                                   # [B, T, dt]

A batch (pipeline/loader.Collate): input_ids, attention_mask, labels [B, S] on the student side (labels[b, k] is the
target of position k, -100 outside the response: no shift left to do); teacher_input_ids, teacher_attention_mask,
teacher_labels [B, T] likewise on the teacher side; teacher_hidden_rows [N, dt], the teacher's states at its real
positions only (`teacher_hidden(batch)` pads them to [B, T, dt] where the batch is used); example_ids [B]; and the
extras asked for. The student side is the store's text tokenised as the pipeline does it (spec/dskd.md "Sequences":
no BOS, EOS after the response, the store's length limits unless given).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch.utils.data import Dataset

from dskd_pipe.cache.reader import StoreReader
from dskd_pipe.pipeline.loader import Collate, Side, StoreSource, teacher_hidden
from dskd_pipe.pipeline.methods import METHODS, unknown_method
from dskd_pipe.pipeline.models import eos_token_id, pad_token_id
from dskd_pipe.pipeline.objectives.divergences import cross_entropy_sum
from dskd_pipe.pipeline.probes import label_offsets
from dskd_pipe.pipeline.teacher_store import TeacherStore

OFFSET_PAD = -1  # character spans of padded positions


class StoreDataset(Dataset):
    """Item k: store example indices[k] (all examples, in store order, by default) with the student's tokenisation
    of its text: a dict with the teacher's "ids", "prompt_len", "offsets", "hidden" [T, dt], "prompt", "response",
    and the student's "student_ids", "student_prompt_len", "student_offsets". Shuffle with the DataLoader.

    max_prompt_length / max_length: the student's limits (default: the ones the store was built with).
    """

    def __init__(self, store: TeacherStore, student_tokenizer, indices: Sequence[int] | None = None,
                 max_prompt_length: int | None = None, max_length: int | None = None):
        lengths = store.lengths
        # A reader of its own (handles open lazily in each DataLoader worker): the dataset needs records, not the
        # store's head.
        self._source = StoreSource(StoreReader(store.url, verify=store.verify))
        self._side = Side(student_tokenizer, eos_token_id(student_tokenizer), pad_token_id(student_tokenizer),
                          max_prompt_length or lengths["max_prompt_length"], max_length or lengths["max_length"])
        self.indices = list(range(len(store))) if indices is None else [int(i) for i in indices]
        """The store examples this dataset holds, in order: item k is example indices[k]."""
        for i in self.indices:
            if not 0 <= i < len(store):
                raise IndexError(f"example {i} out of range: {store.url} holds {len(store)} examples.")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, ks: list[int]) -> list[dict]:
        """A batch at once (the DataLoader asks so): its store reads are queued together first."""
        self._source.prefetch([self.indices[k] for k in ks])
        return [self[k] for k in ks]

    def __getitem__(self, k: int) -> dict:
        item = self._source.item(self.indices[k])
        s = self._side.encode(item["prompt"], item["response"])
        item.update(student_ids=s.ids, student_prompt_len=s.prompt_len, student_offsets=s.offsets)
        return item


def _padded_label_offsets(rows: list, width: int) -> torch.Tensor:
    out = torch.full((len(rows), width, 2), OFFSET_PAD, dtype=torch.long)
    for b, offsets in enumerate(rows):
        spans = label_offsets(offsets)  # [L - 1, 2]: label k is token k + 1
        out[b, :spans.shape[0]] = spans
    return out


def offset_extras(items: list[dict], teacher_labels: list, student_labels: list) -> dict:
    """Collate extra: "label_offsets" [B, S, 2] and "teacher_label_offsets" [B, T, 2], the character span (in prompt
    + response) of the token each position is trained to predict (-1 on pads): what aligns the two tokenisations."""
    return {"label_offsets": _padded_label_offsets([it["student_offsets"] for it in items],
                                                   max(len(r) for r in student_labels)),
            "teacher_label_offsets": _padded_label_offsets([it["offsets"] for it in items],
                                                           max(len(r) for r in teacher_labels))}


class _Extras:
    """Several collate extras as one (picklable, for DataLoader workers)."""

    def __init__(self, parts: list):
        self.parts = parts

    def __call__(self, items, teacher_labels, student_labels) -> dict:
        out = {}
        for part in self.parts:
            out.update(part(items, teacher_labels, student_labels))
        return out


def store_collate(store: TeacherStore, student_tokenizer, method: str | None = None,
                  offsets: bool = False) -> Collate:
    """The collate function for a DataLoader over a StoreDataset (the batch: module docstring).

    method: also build that method's alignment tensors, as `dskd-pipe distill --method` does ("alm", "prefix-kd"
    and their compositions: "teacher_chunk" [B, T] / "student_chunk" [B, S] chunk ids; "chunk-attention",
    "chunk-projection": "chunks" bool [B, S, T]; "dskd-v2-eta", "mined": "align_teacher_pos" /
    "align_student_pos"); offsets: also "label_offsets" / "teacher_label_offsets" (offset_extras).
    """
    parts = []
    if method is not None:
        if method not in METHODS:
            raise KeyError(unknown_method(method))
        if METHODS[method].collate_extras is not None:
            parts.append(METHODS[method].collate_extras(store.tokenizer(), student_tokenizer))
    if offsets:
        parts.append(offset_extras)
    return Collate(pad_token_id(student_tokenizer), int(store.manifest.pad_id), _Extras(parts) if parts else None)


@torch.no_grad()
def held_out_loss(model, batches: Iterable[dict], device: str | torch.device | None = None) -> float:
    """The student's cross-entropy per supervised token (nats) over batches of store_collate: the held-out loss
    of a student, no teacher needed. `model`: a Hugging Face causal LM; evaluated in eval mode, left as it was."""
    was = model.training
    model.eval()
    device = device or next(model.parameters()).device
    total, n = 0.0, 0
    try:
        for batch in batches:
            labels = batch["labels"].to(device)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits  # [B, S, V]
            total += float(cross_entropy_sum(logits, labels))
            n += int((labels != -100).sum())
    finally:
        model.train(was)
    return total / max(1, n)


__all__ = ["StoreDataset", "store_collate", "offset_extras", "held_out_loss", "teacher_hidden", "OFFSET_PAD"]
