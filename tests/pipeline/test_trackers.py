import importlib.machinery
import json
import sys
import types

import pytest

from dskd_pipe.pipeline import trackers
from dskd_pipe.pipeline.config import ConfigError
from dskd_pipe.pipeline.trackers import open_trackers, resolve_report_to, tracker_values
from dskd_pipe.pipeline.training import MetricsLogger

RECORDS = [{"step": s, "epoch": 0, "loss": 3.0 / s, "lr": 1e-4, "method_note": "x"} for s in (1, 2, 3)] + [
    {"step": 3, "epoch": 1, "dev_loss": 2.5, "dev_rouge_l": 12.0}]


def fake_wandb(monkeypatch, logged_in=False, fail=None):
    """A stand-in `wandb` module recording what the tracker asks of it."""
    calls = {"init": [], "log": [], "finish": 0}
    mod = types.ModuleType("wandb")
    mod.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    class Run:
        url = "https://example.invalid/run"

        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finish"] += 1

    def init(**kwargs):
        if fail:
            raise fail
        calls["init"].append(kwargs)
        return Run()

    mod.init = init
    mod.login = lambda prompt=True: logged_in
    mod.Settings = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "wandb", mod)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return calls


def test_report_to_names_all_none_and_missing_packages(monkeypatch):
    monkeypatch.setattr(trackers, "_installed", lambda name: name == "tensorboard")
    assert resolve_report_to(("none",)) == ()
    assert resolve_report_to(()) == () and resolve_report_to((), tensorboard=True) == ("tensorboard",)
    assert resolve_report_to(("all",)) == ("tensorboard",)  # every installed one
    with pytest.raises(ConfigError, match=r"--report-to wandb needs the `wandb` package: pip install wandb"):
        resolve_report_to(("tensorboard,wandb",))
    with pytest.raises(ConfigError) as e:
        resolve_report_to(("mlflow", "none"))
    assert str(e.value) == ("--report-to 'mlflow': choose from tensorboard, wandb, all or none.\n"
                            "--report-to none cannot be combined with other trackers.")


def test_values_are_grouped_as_train_and_eval():
    assert tracker_values(RECORDS[0]) == (1, {"train/epoch": 0.0, "train/loss": 3.0, "train/lr": 1e-4})
    assert tracker_values(RECORDS[-1]) == (3, {"eval/epoch": 1.0, "eval/loss": 2.5, "eval/rouge_l": 12.0})


def test_wandb_is_offline_without_credentials_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    calls = fake_wandb(monkeypatch)
    notes = []
    logger = MetricsLogger(tmp_path / "metrics.jsonl", trackers=open_trackers(("wandb",), tmp_path, {"lr": 1e-4},
                                                                                note=notes.append))
    for r in RECORDS:
        logger.log(r)
    logger.close()
    init = calls["init"][0]
    assert init["mode"] == "offline" and init["dir"] == str(tmp_path) and init["name"] == tmp_path.name
    assert init["settings"]["console"] == "off" and init["config"] == {"lr": 1e-4} and init["resume"] == "allow"
    assert [step for step, _ in calls["log"]] == [1, 2, 3, 3] and calls["finish"] == 1
    assert notes[0].startswith(f"wandb: offline run {init['id']}: {tmp_path}/wandb (upload: wandb sync ")
    again = open_trackers(("wandb",), tmp_path, {}, resume_step=2, note=notes.append)
    assert calls["init"][1]["id"] == init["id"]  # --resume: the same run
    again[0].close()
    open_trackers(("wandb",), tmp_path, {}, note=notes.append)
    assert calls["init"][2]["id"] != init["id"]  # a new run: a new id
    monkeypatch.setenv("WANDB_MODE", "disabled")
    open_trackers(("wandb",), tmp_path, {}, note=notes.append)
    assert calls["init"][3]["mode"] == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    fake_wandb(monkeypatch, logged_in=True)
    assert trackers.wandb_mode() == "online"


def test_a_tracker_that_cannot_start_does_not_stop_the_run(tmp_path, monkeypatch):
    fake_wandb(monkeypatch, fail=RuntimeError("could not reach\nthe server"))
    warnings = []
    opened = open_trackers(("wandb",), tmp_path, {}, warn=warnings.append)
    assert opened == [] and warnings == ["--report-to wandb could not start (could not reach the server); the run "
                                         "goes on without it (metrics.jsonl has every record)."]


def test_tensorboard_scalars_and_a_resume_purges_the_steps_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path / "metrics.jsonl", trackers=open_trackers(("tensorboard",), tmp_path, {}))
    for r in RECORDS:
        logger.log(r)
    logger.close()
    resumed = MetricsLogger(tmp_path / "metrics.jsonl", truncate_after_step=1,
                            trackers=open_trackers(("tensorboard",), tmp_path, {}, resume_step=1))
    resumed.log({"step": 2, "loss": 9.0})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 3.0), (2, 9.0)]
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_real_wandb_writes_an_offline_run_without_a_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: no credentials
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))
    logger = MetricsLogger(tmp_path / "metrics.jsonl", trackers=open_trackers(("wandb",), tmp_path, {"lr": 1e-4}))
    for r in RECORDS:
        logger.log(r)
    logger.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
