"""``fedpdpo run --json-logs``: progress, round tables and log records become JSON lines."""

from __future__ import annotations

import io
import json
import logging

from fedpdpo.report import progress
from fedpdpo.report.progress import RunProgress, use_json_logs


def test_progress_rounds_and_logs_are_json_lines(monkeypatch):
    stream = io.StringIO()
    root = logging.getLogger()
    saved = list(root.handlers)
    monkeypatch.setattr(progress, "_json_stream", None)
    try:
        use_json_logs(stream)
        with RunProgress(total_steps=2) as bar:
            bar.describe("round 1/1 fit")
            bar.step(0.69)
            bar.step(0.5)
            bar.round_table(1, [{"round": 1, "client": 0, "accuracy": 1.0}, {"round": 1, "client": 1, "accuracy": 0.5}])
        logging.getLogger("fedpdpo.test").warning("client %d rejected", 3)
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved:
            root.addHandler(h)
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["phase", "step", "step", "round", "log"]
    assert events[0]["text"] == "round 1/1 fit"
    assert (events[2]["step"], events[2]["total"], events[2]["loss"]) == (2, 2, 0.5)
    assert events[3]["mean_accuracy"] == 0.75 and [c["client"] for c in events[3]["clients"]] == [0, 1]
    assert events[4] | {"time": 0} == {
        "event": "log",
        "time": 0,
        "level": "warning",
        "logger": "fedpdpo.test",
        "message": "client 3 rejected",
    }


def test_without_json_logs_nothing_is_emitted(monkeypatch, capsys):
    monkeypatch.setattr(progress, "_json_stream", None)
    with RunProgress(total_steps=1, quiet=True) as bar:
        bar.step(0.1)
        bar.round_table(0, [{"round": 0, "client": 0, "accuracy": 0.5, "accuracy_implicit": 0.5, "reward_margin": 0}])
    assert capsys.readouterr() == ("", "")
