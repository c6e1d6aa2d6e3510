"""A run that diverges stops and says so (issue 24): `--lr 1e6` exited 0 with weights that were all NaN. The policy
(README "A run that diverges"): a non-finite loss term or gradient stops the run before that update, in one line
naming the step and the term; no non-finite weights are ever saved, as a result or a checkpoint."""
from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from dskd_pipe.pipeline import training
from reliability_helpers import distill_args, invoke, one_error_line


def _all_finite(folder) -> bool:
    """Every tensor of every safetensors file and checkpoint under `folder` is finite."""
    tensors = [t for f in folder.rglob("*.safetensors") for t in load_file(str(f)).values()]
    for ckpt in training.list_checkpoints(folder):
        import torch.distributed.checkpoint as dcp

        reader = training._safe_reader(ckpt / "state")
        keys = [k for k, m in reader.read_metadata().state_dict_metadata.items() if hasattr(m, "size")]
        state = {k: torch.empty(reader.read_metadata().state_dict_metadata[k].size) for k in keys}
        with training._one_process_quiet(1):
            dcp.load(state, storage_reader=reader, no_dist=True)
        tensors += list(state.values())
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


@pytest.mark.parametrize("clip", ["1.0", "0"])
def test_a_huge_learning_rate_stops_at_the_first_nan_naming_step_and_term(models, tmp_path, clip):
    out = tmp_path / "run"
    line = one_error_line(invoke(*distill_args(models, out, "--lr", "1e6", "--max-grad-norm", clip,
                                               "--save-every", "1", steps=6)))
    found = re.match(r"error: step (\d+): (the loss term 'ce_student' is (nan|inf)|the gradient norm is (nan|inf) "
                     r"\(loss [^)]*\)); the run stopped before that update \(weights, checkpoints and outputs hold "
                     r"no NaN; ", line)
    assert found, line
    step = int(found.group(1))
    assert 1 < step <= 6
    assert f"the last checkpoint is step-{step - 1:08d}" in line and "Lower --lr (now 1e+06)" in line
    assert not (out / "model.safetensors").exists()  # no result
    assert [c.name for c in training.list_checkpoints(out)][-1] == f"step-{step - 1:08d}"
    assert _all_finite(out)
    assert "NaN" not in (out / "metrics.jsonl").read_text()


def test_weights_that_turn_non_finite_are_never_saved(models, tmp_path, monkeypatch):
    """The last update itself makes a weight inf (the loss and the gradient before it were finite): the run ends
    with the error instead of writing the student."""
    real_step = torch.optim.AdamW.step

    def step_to_inf(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step_to_inf)
    out = tmp_path / "run"
    line = one_error_line(invoke(*distill_args(models, out, steps=1)))
    assert line == ("error: step 1: the weights are no longer finite after the optimizer step; nothing was saved. "
                    "Lower --lr, or clip with --max-grad-norm.")
    assert not (out / "model.safetensors").exists() and not training.list_checkpoints(out)
