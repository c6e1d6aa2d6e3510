"""pipeline/training.py: param groups, the cosine schedule, RNG states, checkpoints (DCP), the metrics log."""
import json
import random

import numpy as np
import pytest
import torch

from dskd_pipe.pipeline.training import (CheckpointError, MetricsLogger, cosine_schedule, list_checkpoints,
                                         load_checkpoint, param_groups, rng_state, save_checkpoint, set_rng_state)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def save_pretrained(self, folder, safe_serialization=True):
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file(dict(self.state_dict()), str(folder / "model.safetensors"))


def test_param_groups_no_decay_on_biases_and_norms_and_own_projector_lr():
    student, proj = Tiny(), torch.nn.Linear(3, 5)
    groups = param_groups(student, 5e-4, 0.01, [(proj, 1e-3)])
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"student/decay", "student/no_decay", "extra0/decay", "extra0/no_decay"}
    assert [p is student.fc.weight for p in by_name["student/decay"]["params"]] == [True]
    no_decay = by_name["student/no_decay"]["params"]
    assert {id(p) for p in no_decay} == {id(student.fc.bias), id(student.norm.weight), id(student.norm.bias)}
    assert by_name["student/no_decay"]["weight_decay"] == 0.0 and by_name["student/decay"]["weight_decay"] == 0.01
    assert by_name["extra0/decay"]["lr"] == 1e-3 and by_name["extra0/no_decay"]["params"][0] is proj.bias
    assert all(p is not student.frozen.weight for g in groups for p in g["params"])


def test_cosine_schedule_decays_each_group_to_min_lr_with_optional_warmup():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p1], "lr": 5e-4}, {"params": [p2], "lr": 1e-3}])
    sched = cosine_schedule(opt, total_steps=10, min_lr=1e-7)
    lrs = []
    for _ in range(10):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx([5e-4, 1e-3])
    assert lrs[5][0] == pytest.approx(1e-7 + (5e-4 - 1e-7) * 0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-7, 1e-7])
    opt = torch.optim.AdamW([p1], lr=1e-3)
    sched = cosine_schedule(opt, total_steps=10, warmup_steps=4)
    warm = []
    for _ in range(5):
        warm.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert warm == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_rng_states_round_trip_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_checkpoint_round_trip_and_keep(tmp_path):
    """The trained module (student and parts as one module) and both optimizers through DCP; trainer state and
    scheduler restored, the RNG left alone (no RNG state is stored: micro-batch draws come from micro_batch_seed);
    only the newest `keep` checkpoints stay; no temporary folder is left."""
    torch.manual_seed(1)
    model = torch.nn.ModuleDict({"student": Tiny(), "proj": torch.nn.Linear(2, 2), "disc": torch.nn.Linear(2, 1)})
    opt = torch.optim.AdamW(param_groups(model["student"], 1e-3, 0.01, [(model["proj"], 1e-3)]))
    disc_opt = torch.optim.AdamW(model["disc"].parameters(), lr=1e-4)
    sched = cosine_schedule(opt, 10)
    (model["proj"](torch.ones(2)).sum() + model["student"].fc(torch.ones(4)).sum() + model["disc"](torch.ones(2)).sum()
     ).backward()
    opt.step(), disc_opt.step()
    sched.step()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model=model, optimizers={"student": opt, "adversary": disc_opt},
                        scheduler=sched, trainer_state={"step": step, "epoch": 0, "position": 4 * step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    want = {k: v.clone() for k, v in model.state_dict().items() if "frozen" not in k}
    torch.manual_seed(0)
    after = torch.rand(1)
    torch.manual_seed(7)
    model2 = torch.nn.ModuleDict({"student": Tiny(), "proj": torch.nn.Linear(2, 2), "disc": torch.nn.Linear(2, 1)})
    opt2 = torch.optim.AdamW(param_groups(model2["student"], 1e-3, 0.01, [(model2["proj"], 1e-3)]))
    disc_opt2 = torch.optim.AdamW(model2["disc"].parameters(), lr=1e-4)
    sched2 = cosine_schedule(opt2, 10)
    torch.manual_seed(0)
    state = load_checkpoint(list_checkpoints(tmp_path)[-1], model=model2,
                            optimizers={"student": opt2, "adversary": disc_opt2}, scheduler=sched2)
    assert state == {"step": 3, "epoch": 0, "position": 12}
    for k, v in want.items():
        assert torch.equal(model2.state_dict()[k], v), k
    assert sched2.state_dict()["last_epoch"] == 1
    for a, b in ((opt, opt2), (disc_opt, disc_opt2)):
        sa, sb = a.state_dict()["state"], b.state_dict()["state"]
        assert len(sa) == len(sb) and all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    assert torch.rand(1) == after  # no RNG state in a checkpoint: the caller's stream is untouched
    files = {f.relative_to(list_checkpoints(tmp_path)[-1]).as_posix() for f in list_checkpoints(tmp_path)[-1].rglob("*")
             if f.is_file()}
    assert files == {"state/.metadata", "state/__0_0.distcp", "trainer_state.json"}
    assert not torch.equal(model2["student"].frozen.weight, model["student"].frozen.weight)  # frozen: not stored


def test_a_checkpoint_of_an_older_version_is_a_clear_error(tmp_path):
    old = tmp_path / "checkpoints" / "step-00000001"
    (old / "student").mkdir(parents=True)
    torch.save({"step": 1}, old / "trainer_state.pt")
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError, match=r"step-00000001: not a checkpoint of this dskd-pipe version"):
        load_checkpoint(old, model=model, optimizers={"student": opt}, scheduler=cosine_schedule(opt, 3))


def test_metrics_logger_truncates_after_the_resumed_step(tmp_path):
    log = MetricsLogger(tmp_path / "m.jsonl")
    for step in (1, 2, 3):
        log.log({"step": step, "loss": torch.tensor(1.5)})
    MetricsLogger(tmp_path / "m.jsonl", truncate_after_step=2)
    lines = [json.loads(ln) for ln in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [1, 2] and lines[0]["loss"] == 1.5


def test_tensorboard_missing_is_a_clear_error(monkeypatch):
    import sys

    from dskd_pipe.pipeline.config import ConfigError
    from dskd_pipe.pipeline.trackers import resolve_report_to

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if the package were not installed
    with pytest.raises(ConfigError, match=r"--report-to tensorboard needs the `tensorboard` package: "
                                          r"pip install tensorboard"):
        resolve_report_to((), tensorboard=True)  # the older --tensorboard flag: the same check


def test_tensorboard_scalars_are_written(tmp_path):
    pytest.importorskip("tensorboard")
    from dskd_pipe.pipeline.trackers import open_trackers

    logger = MetricsLogger(tmp_path / "m.jsonl", trackers=open_trackers(("tensorboard",), tmp_path, {}))
    logger.log({"step": 1, "loss": 2.5})
    logger.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
