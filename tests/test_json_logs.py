"""Progress of a run: the ETA model, ``--json-logs`` events, and plain lines when stderr is not a terminal."""

from __future__ import annotations

import io
import json
import logging

import pytest

from fedpdpo.cli import main
from fedpdpo.report import progress
from fedpdpo.report.progress import EtaModel, RunProgress, expected_new_pairs, use_json_logs
from tests.conftest import TINY_CONFIG


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _phase(eta: EtaModel, clock: Clock, kind: str, server_round: int, units: int, seconds: float) -> None:
    eta.begin(kind, server_round)
    for _ in range(units):
        clock.t += seconds
        eta.advance()


def test_eta_counts_every_kind_of_work_at_its_measured_cost():
    clock = Clock()
    eta = EtaModel(clock)
    assert eta.remaining() is None  # no plan yet
    eta.plan({1: 8, 2: 8, 3: 8}, {0: 2, 1: 2, 2: 2, 3: 2})  # without data sizes: every step costs the same
    assert eta.remaining() is None  # nothing measured yet
    _phase(eta, clock, "eval", 0, 2, 5.0)
    _phase(eta, clock, "fit", 1, 4, 2.0)  # half of round 1's steps, at 2 s
    assert eta.remaining() == pytest.approx(20 * 2.0 + 6 * 5.0)
    clock.t += 8.0  # the other 4 steps, never reported (a client failed): the phase still counts its 8 steps
    eta.begin("eval", 1)  # ends the training phase
    clock.t += 8.0  # round 1's evaluation, reported at once (a remote engine)
    eta.end()
    assert eta.remaining() == pytest.approx(16 * 2.0 + 4 * 4.0)


def test_eta_after_the_first_round_is_exact_when_costs_are_steady():
    clock = Clock()
    eta = EtaModel(clock)
    eta.plan({1: 8, 2: 8, 3: 8}, {0: 2, 1: 2, 2: 2, 3: 2})
    _phase(eta, clock, "eval", 0, 2, 5.0)
    _phase(eta, clock, "fit", 1, 8, 2.0)
    _phase(eta, clock, "eval", 1, 2, 1.5)
    eta.begin("fit", 2)
    assert eta.remaining() == pytest.approx(16 * 2.0 + 4 * 1.5)
    clock.t += 3.0  # a slower step: the current phase's rate moves the estimate by the share of the phase done
    eta.advance()
    assert eta.remaining() == pytest.approx(15 * (3 / 8 + 2 * 7 / 8) + 4 * 1.5)


def test_eta_tells_first_visits_of_pairs_from_later_ones():
    """Measured on SmolLM2 (3 clients, 26 training and 12 held-out pairs each, 4 steps x 4 pairs per round): the
    first round is the dearest because its pairs are new (frozen prefix and reference computed, then cached), so a
    flat cost per step overestimated the rest of the run by 48 % after it; counting new pairs, within 4 %."""
    steps = {r: dict.fromkeys(range(3), 4) for r in range(1, 5)}
    new = expected_new_pairs(steps, 4, dict.fromkeys(range(3), 26))
    assert new[1] == pytest.approx(48) and new[2] == pytest.approx(3 * 16 * 10 / 26)
    assert sum(new.values()) < 3 * 26
    clock = Clock()
    eta = EtaModel(clock)
    eta.plan({r: 12 for r in steps}, dict.fromkeys(range(5), 3), new, test_pairs=36)
    _phase(eta, clock, "eval", 0, 3, 41.3 / 3)  # the measured phase times of that run
    _phase(eta, clock, "fit", 1, 12, 97.8 / 12)
    _phase(eta, clock, "eval", 1, 3, 10.7 / 3)
    eta.begin("fit", 2)
    actual = 69.9 + 15.6 + 54.6 + 9.6 + 55.5 + 14.4  # what the rest of the run took
    assert eta.remaining() == pytest.approx(actual, rel=0.05)
    b = (41.3 - 10.7) / 36  # seconds per new pair, as the evaluations measure it
    a = (97.8 - b * 48) / 12
    assert eta.remaining() == pytest.approx(a * 36 + b * (new[2] + new[3] + new[4]) + 3 * 10.7)


def _json_events(run) -> list[dict]:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = list(root.handlers)
    try:
        use_json_logs(stream)
        run()
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved:
            root.addHandler(h)
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_progress_rounds_and_logs_are_json_lines(monkeypatch):
    monkeypatch.setattr(progress, "_json_stream", None)

    def run():
        with RunProgress() as bar:
            bar.plan({1: {0: 1, 1: 1}}, [1], clients=2, rounds=1, batch_size=4)
            bar.begin_fit(1)
            bar.step(0.69)
            bar.step(0.5)
            bar.begin_eval(1)
            bar.evaluated(1, [{"round": 1, "client": 0, "accuracy": 1.0}, {"round": 1, "client": 1, "accuracy": 0.5}])
            bar.finish()
        logging.getLogger("fedpdpo.test").warning("client %d rejected", 3)

    events = _json_events(run)
    assert [e["event"] for e in events] == ["phase", "step", "step", "phase", "eval", "eval", "round", "phase", "log"]
    assert events[0]["text"] == "round 1/1 fit" and events[0]["kind"] == "fit"
    assert (events[2]["step"], events[2]["total"], events[2]["loss"]) == (2, 2, 0.5)
    assert events[2]["mean_loss"] == pytest.approx(0.595)  # the round's running mean, not the last step
    assert [(e["client"], e["accuracy"]) for e in events[4:6]] == [(0, 1.0), (1, 0.5)]
    assert events[6]["mean_accuracy"] == 0.75 and [c["client"] for c in events[6]["clients"]] == [0, 1]
    assert events[7]["kind"] == "done"
    assert events[8] | {"time": 0} == {
        "event": "log",
        "time": 0,
        "level": "warning",
        "logger": "fedpdpo.test",
        "message": "client 3 rejected",
    }


def test_a_run_reports_setup_reference_training_and_evaluation(tmp_path, monkeypatch):
    """The JSON events of a whole tiny run: setup stages and facts, every step with a running mean and an ETA, an
    eval event per client and evaluation, the first evaluation's reference pass."""
    monkeypatch.setattr(progress, "_json_stream", None)
    argv = ["run", "--config", str(TINY_CONFIG), "--out", str(tmp_path / "run"), "--set", "rounds=2"]
    events = _json_events(lambda: main(argv))
    kinds = [e["kind"] for e in events if e["event"] == "phase"]
    assert kinds[:3] == ["setup", "setup", "setup"] and kinds[3:] == ["eval", "fit", "eval", "fit", "eval", "done"]
    (setup,) = [e for e in events if e["event"] == "setup"]
    assert setup["clients"] == 2 and setup["train_pairs"] > 0 and setup["model"] == "tiny"
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 17)) and {e["total"] for e in steps} == {16}
    assert all(e["eta_s"] is not None and e["eta_s"] >= 0 for e in steps)  # round 0's evaluation measured a cost
    evals = [(e["round"], e["client"]) for e in events if e["event"] == "eval"]
    assert evals == [(r, c) for r in range(3) for c in range(2)]


def test_plain_lines_when_stderr_is_not_a_terminal(tmp_path, capsys):
    assert main(["run", "--config", str(TINY_CONFIG), "--out", str(tmp_path / "run"), "--set", "rounds=1"]) == 0
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\r" not in err  # no live-bar control characters in a log file
    lines = [line for line in err.splitlines() if line.startswith("[")]
    assert "setup: reading and partitioning the data" in lines[0]
    assert any("setup done in" in line and "clients 2" in line for line in lines)
    assert any(line.endswith("round 1/1 fit · ETA " + line.rsplit(" ", 1)[-1]) for line in lines)
    assert "done in" in lines[-1]
    assert "mean accuracy" in err  # the round tables


def test_without_json_logs_or_display_nothing_is_emitted(monkeypatch, capsys):
    monkeypatch.setattr(progress, "_json_stream", None)
    with RunProgress(quiet=True) as bar:
        bar.plan({1: {0: 1}}, [0, 1], clients=1, rounds=1, batch_size=4)
        bar.begin_fit(1)
        bar.step(0.1)
        bar.evaluated(0, [{"round": 0, "client": 0, "accuracy": 0.5, "accuracy_implicit": 0.5, "reward_margin": 0}])
        bar.finish()
    assert capsys.readouterr() == ("", "")
