"""The teacher side of a distill run: what the losses need of the teacher (its head, input embeddings, pad id, and
the model itself when online), from a teacher-state store (offline) or from the teacher model (online), and the
fingerprints a store must carry to serve a run's data."""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from dskd_pipe.cache.remote import filesystem
from dskd_pipe.pipeline.config import DistillConfig
from dskd_pipe.pipeline.data import TEMPLATE_ID, file_fingerprint, load_examples
from dskd_pipe.pipeline.loader import Side, StoreSource, TextSource, UnionSource, teacher_hidden
from dskd_pipe.pipeline.models import (check_vocabulary, embedding_parts, eos_token_id, head_parts, last_hidden_state,
                                       load_causal_lm, load_tokenizer, pad_token_id)
from dskd_pipe.pipeline.objectives.dskd import TeacherHead
from dskd_pipe.pipeline.teacher_store import teacher_head


def expected_fingerprints(cfg: DistillConfig) -> dict:
    """What the store must have been built from: the same data file, template and sequence lengths."""
    return {
        "data": {"path": str(cfg.data), "sha256": file_fingerprint(cfg.data)},
        "template": TEMPLATE_ID,
        "lengths": {"max_prompt_length": cfg.max_prompt_length, "max_length": cfg.max_length},
    }


@dataclass
class Teacher:
    """The teacher as the losses need it: head, input embeddings, pad id, and the model itself when online."""

    head: TeacherHead | None
    loaded_embed: torch.Tensor | None  # [Vt, dt]; offline: None until a method asks (.embed)
    embed_scale: float
    pad_id: int
    model: object = None  # online mode only
    loaded_tokenizer: object = None  # cross-tokenizer alignments (ETA, ALM, prefix-kd, mined); online: the model's
    load_tokenizer: object = None  # offline: () -> the store's tokenizer, called on first use of .tokenizer
    load_embed: object = None  # offline: () -> the store's input embedding table, called on first use of .embed

    @property
    def embed(self) -> torch.Tensor | None:
        """The teacher's input embeddings [Vt, dt]. Offline they are read from the store when a method first asks:
        only the DSKD-CMA family's t2s values and DWA-KD's Soft-DTW use them, and at Qwen1.5-1.8B's size the table
        is 1.2 GB to read and checksum (bench/whole_runs.py, the store run's fixed cost)."""
        if self.loaded_embed is None and self.load_embed is not None:
            self.loaded_embed = self.load_embed()
        return self.loaded_embed

    @property
    def tokenizer(self):
        """The teacher's tokenizer. Offline it is rebuilt from the store when a method first asks: most methods
        never do, and a 152k-entry tokenizer takes 1-2 s to build on a CPU (bench/fixed_cost.py)."""
        if self.loaded_tokenizer is None and self.load_tokenizer is not None:
            self.loaded_tokenizer = self.load_tokenizer()
        return self.loaded_tokenizer

    @torch.no_grad()
    def hidden(self, batch: dict) -> torch.Tensor:
        """[B, T, dt]: the cached rows, or the teacher run now; zeros on pads either way (as the store's collate)."""
        if "teacher_hidden_rows" in batch:
            return teacher_hidden(batch)
        mask = batch["teacher_attention_mask"]
        h = last_hidden_state(self.model, batch["teacher_input_ids"], mask)  # [B, T, dt]
        return h * mask[..., None].to(h.dtype)


def open_teacher(cfg: DistillConfig, device: str):
    """(Teacher, source of teacher views). Offline: the store, checked against --data; online: the teacher model."""
    if cfg.cache:
        from dskd_pipe.cache.reader import open_store

        reader = open_store(cfg.cache, expected=expected_fingerprints(cfg))
        reader.tokenizer_names()  # a bad file name is refused now, even when no method builds the tokenizer
        teacher = Teacher(teacher_head(reader.head(), device), None, reader.embed_scale(),
                          int(reader.manifest.pad_id), load_tokenizer=reader.tokenizer,
                          load_embed=lambda: reader.embeddings()["weight"].to(device))
        source = StoreSource(reader, limit=cfg.limit)
        if cfg.sample_caches:
            # Sample stores: the same teacher, tokenizer, template and lengths as the gold store; their data are
            # student generations, so no data fingerprint is compared.
            same = {k: reader.manifest.fingerprints[k] for k in ("teacher", "tokenizer", "template", "lengths")}
            samples = [StoreSource(open_store(path, expected=same)) for path in cfg.sample_caches]
            source = UnionSource(source, samples)
        return teacher, source
    student_examples = load_examples(cfg.data, limit=cfg.limit, skip_bad=cfg.skip_bad)
    if not cfg.teacher:  # sft without a teacher: the teacher view is the student's own tokenisation, unused
        tok = load_tokenizer(cfg.student, trust_remote_code=cfg.trust_remote_code)
        side = Side(tok, eos_token_id(tok), pad_token_id(tok), cfg.max_prompt_length, cfg.max_length)
        return Teacher(None, None, 1.0, side.pad_id), TextSource(student_examples, side)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(cfg.teacher_dtype)
    model = load_causal_lm(cfg.teacher, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code)
    model.requires_grad_(False)
    tok = load_tokenizer(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
    check_vocabulary(model, tok, cfg.teacher)
    side = Side(tok, eos_token_id(tok), pad_token_id(tok), cfg.max_prompt_length, cfg.max_length)
    e = embedding_parts(model)
    teacher = Teacher(teacher_head(head_parts(model), device), e["weight"], float(e["embed_scale"]), side.pad_id,
                      model, loaded_tokenizer=tok)
    return teacher, TextSource(student_examples, side)


def store_record(cache: str) -> dict | None:
    """{"path", "fingerprints", "config"} of a finished teacher store (config: its saved CacheConfig, or None)."""
    if not cache:
        return None
    from dskd_pipe.cache.format import CONFIG
    from dskd_pipe.cache.reader import read_manifest

    record = {"path": cache, "fingerprints": read_manifest(cache).fingerprints, "config": None}
    try:
        fs, root = filesystem(cache)
        record["config"] = json.loads(fs.cat(f"{root.rstrip('/')}/{CONFIG}")).get("config")
    except (OSError, ValueError):  # an older store without its config: the card shows no cache-teacher command
        pass
    return record
