"""The same result however a run is split or moved (issue 24).

Dropout: each process drew from its own RNG stream (seed + rank), so N processes equalled one process only for
students without dropout. Every draw of a micro-batch now comes from (seed, step, its index in the step over all
processes): here one process plays both ranks of a 2-process step (rank 1 runs micro-batches 2 and 3), and the
torchrun equality tests (tests/stages/test_distill_torchrun.py) run a student with dropout.

A moved run: a run folder copied elsewhere was refused on --resume because --out counted as a setting."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from reliability_helpers import DATA, invoke

from dskd_pipe.pipeline.config import DistillConfig
from dskd_pipe.pipeline.distributed import Processes
from dskd_pipe.pipeline.loader import Collate, DistillDataset, Side
from dskd_pipe.pipeline.methods import MethodParts, resolve
from dskd_pipe.pipeline.models import eos_token_id, load_tokenizer, pad_token_id
from dskd_pipe.pipeline.run_folder import RESOLVED_CONFIG
from dskd_pipe.pipeline.step import Trainee, accumulate_gradients
from dskd_pipe.pipeline.student import build_student
from dskd_pipe.pipeline.teacher import open_teacher


@pytest.fixture(scope="module")
def micro_batches(models):
    """Four micro-batches of two examples (sft: the student's own tokens)."""
    cfg = resolve(DistillConfig(student=str(models["student"]), data=str(DATA), out="unused", method="sft", limit=8,
                                max_length=64, micro_batch_size=2, grad_accum=4, device="cpu", seed=0))
    teacher, source = open_teacher(cfg, "cpu")
    tok = load_tokenizer(cfg.student)
    side = Side(tok, eos_token_id(tok), pad_token_id(tok), cfg.max_prompt_length, cfg.max_length)
    items = [DistillDataset(source, side, seed=0, epoch=0)[i] for i in range(8)]
    collate = Collate(side.pad_id, teacher.pad_id)
    student = build_student(cfg, "cpu")  # in train mode: dropout on; no step is taken, the weights stay
    return cfg, teacher, Trainee(student, MethodParts()), [collate(items[k:k + 2]) for k in range(0, 8, 2)]


def _loss_sum(cfg, teacher, trainee, micro, rank=0, rng_seed=0) -> float:
    """The summed loss of `micro` run as `rank` of step 3, the global RNG seeded with `rng_seed` before."""
    torch.manual_seed(rng_seed)
    sums, _ = accumulate_gradients(cfg, micro, trainee, teacher, Processes(rank=rank), step=3)
    return float(sums["loss"])


def test_dropout_depends_on_step_and_micro_batch_only(micro_batches):
    cfg, teacher, trainee, micro = micro_batches
    one = _loss_sum(cfg, teacher, trainee, micro)
    # Whatever ran before (another RNG state), the same draws.
    assert _loss_sum(cfg, teacher, trainee, micro, rng_seed=123) == one
    # Rank 0 and rank 1 of 2 processes x 2 micro-batches: the draws of micro-batches 0, 1 and 2, 3 of the step.
    half = replace(cfg, grad_accum=2)
    split = (_loss_sum(half, teacher, trainee, micro[:2], rank=0)
             + _loss_sum(half, teacher, trainee, micro[2:], rank=1, rng_seed=9))
    assert split == pytest.approx(one, rel=1e-6)
    # Dropout is on: the same micro-batches at another index draw other masks.
    assert _loss_sum(half, teacher, trainee, micro[2:], rank=0) != pytest.approx(split - _loss_sum(
        half, teacher, trainee, micro[:2], rank=0), rel=1e-6)


def test_a_moved_run_folder_resumes(models, checkpointed_run, tmp_path):
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(checkpointed_run, moved)
    saved = json.loads((moved / RESOLVED_CONFIG).read_text())["config"]
    assert Path(saved["out"]) == checkpointed_run
    result = invoke("distill", "--config", moved / RESOLVED_CONFIG, "--out", moved, "--resume",
                    "--max-steps", "6")
    assert result.exit_code == 0, result.output
    assert f"resuming from {moved / 'checkpoints' / 'step-00000004'} (step 4" in result.output
    steps = [json.loads(line)["step"] for line in (moved / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert json.loads((moved / RESOLVED_CONFIG).read_text())["config"]["out"] == str(moved)
