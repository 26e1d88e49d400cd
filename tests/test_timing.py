"""The phase clock charges each phase its exclusive time, and a run records its phases."""

from __future__ import annotations

import time

from fedpdpo.timing import CLOCK, PhaseClock


def test_nested_phases_are_charged_exclusive_time():
    clock = PhaseClock()
    with clock.phase("outer"):
        time.sleep(0.02)
        with clock.phase("inner"):
            time.sleep(0.05)
        with clock.phase("inner"):
            pass
    totals = clock.as_dict()
    assert totals["inner"]["calls"] == 2 and totals["outer"]["calls"] == 1
    assert totals["inner"]["wall_s"] >= 0.05
    assert 0.02 <= totals["outer"]["wall_s"] < 0.05  # the inner sleep is not counted twice


def test_inprocess_run_records_its_phases(tiny_cfg, tmp_path):
    from fedpdpo.engines.inprocess import run_inprocess

    tiny_cfg.rounds = 1
    CLOCK.reset()
    run_inprocess(tiny_cfg, tmp_path / "run", quiet=True)
    names = set(CLOCK.as_dict())
    expected = {"data", "model load", "tokenization", "reference pass", "round 0: evaluation", "round 1: training"}
    expected |= {"round 1: evaluation", "client state save", "client state load", "checkpoint", "summary"}
    assert expected <= names
