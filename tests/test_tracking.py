"""``report_to``: experiment tracking with TensorBoard, trackio and wandb, optional and fed by the server loop."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

from fedpdpo.cli import main
from fedpdpo.report import tracking
from tests.conftest import TINY_CONFIG

RUN = ["run", "--quiet", "--config", str(TINY_CONFIG), "--set", "rounds=2"]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_gets_per_round_per_client_metrics_and_every_step_loss(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main([*RUN, "--out", str(out), "--set", 'report_to=["tensorboard"]']) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    rows = _metrics(out)
    for row in rows:
        logged = {e.step: e.value for e in events.Scalars(f"round/client_{row['client']}/accuracy")}
        assert logged[row["round"]] == pytest.approx(row["accuracy"])
        if "train/loss" in row:
            train = {e.step: e.value for e in events.Scalars(f"round/client_{row['client']}/train/loss")}
            assert train[row["round"]] == pytest.approx(row["train/loss"])
    mean = {e.step: e.value for e in events.Scalars("round/mean/accuracy")}
    summary = json.loads((out / "summary.json").read_text())
    assert mean == pytest.approx({int(r): v for r, v in summary["mean_accuracy_by_round"].items()})
    steps = events.Scalars("step/train_loss")
    assert [e.step for e in steps] == list(range(1, 2 * 2 * 4 + 1))  # 2 rounds x 2 clients x 4 local steps
    assert {"round/client_0/reward_margin", "round/mean/accuracy_implicit"} <= tags


def test_nothing_is_tracked_by_default(tmp_path):
    out = tmp_path / "run"
    assert main([*RUN, "--set", "rounds=1", "--out", str(out)]) == 0
    assert not (out / "tensorboard").exists()


def test_a_backend_that_is_not_installed_stops_the_run_before_it_starts(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    out = tmp_path / "run"
    assert main([*RUN, "--out", str(out), "--set", 'report_to=["tensorboard"]']) == 2
    err = capsys.readouterr().err
    assert "the tensorboard package is not installed" in err and "pip install 'fedpdpo[tracking]'" in err
    assert not out.exists()
    assert main([*RUN, "--out", str(out), "--set", 'report_to=["mlflow"]']) == 2
    assert "config key 'report_to' names 'mlflow'" in capsys.readouterr().err


class _Recorder:
    """Stands in for the trackio and wandb modules: records what fedpdpo calls, with their documented names."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    # trackio: module-level init / log / finish
    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self

    def log(self, metrics, **kwargs):
        self.calls.append(("log", dict(metrics), kwargs))

    def finish(self):
        self.calls.append(("finish",))

    # wandb: init returns a run with define_metric / log / finish
    def define_metric(self, name, **kwargs):
        self.calls.append(("define_metric", name, kwargs))


def test_trackio_and_wandb_receive_both_axes(tmp_path, monkeypatch):
    fakes = {}
    for name in ("trackio", "wandb"):
        fakes[name] = _Recorder()
        module = types.ModuleType(name)
        for attr in ("init", "log", "finish"):
            setattr(module, attr, getattr(fakes[name], attr))
        monkeypatch.setitem(sys.modules, name, module)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in fakes else real(name, *a))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    out = tmp_path / "run"
    assert main([*RUN, "--out", str(out), "--set", 'report_to=["trackio", "wandb"]']) == 0
    for fake in fakes.values():
        init = fake.calls[0]
        assert init[0] == "init" and init[1]["name"] == "run" and init[1]["project"] == "fedpdpo"
        assert init[1]["config"]["report_to"] == ["trackio", "wandb"] and init[1]["config"]["rounds"] == 2
        logs = [c[1] for c in fake.calls if c[0] == "log"]
        assert [m["train_step"] for m in logs if "train_step" in m] == list(range(1, 17))
        assert [m["round"] for m in logs if "round" in m] == [0, 1, 2]
        assert all("round/mean/accuracy" in m for m in logs if "round" in m)
        assert fake.calls[-1] == ("finish",)
    defined = [c[1:] for c in fakes["wandb"].calls if c[0] == "define_metric"]
    assert ("round/*", {"step_metric": "round"}) in defined and ("step/*", {"step_metric": "train_step"}) in defined


def test_round_metrics_are_per_client_and_mean():
    rows = [
        {"round": 1, "client": 0, "accuracy": 1.0, "n_train": 26, "train/loss": 0.5, "conflict": True},
        {"round": 1, "client": 1, "accuracy": 0.5, "n_train": 26},
    ]
    assert tracking.round_metrics(rows) == {
        "round/client_0/accuracy": 1.0,
        "round/client_0/train/loss": 0.5,
        "round/client_1/accuracy": 0.5,
        "round/mean/accuracy": 0.75,
        "round/mean/train/loss": 0.5,
    }
