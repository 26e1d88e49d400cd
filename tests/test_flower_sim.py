"""``fedpdpo run --engine flower-sim`` (Flower's Ray simulation engine) gives the in-process engine's results."""

from __future__ import annotations

import json

import pytest

from fedpdpo.cli import main
from tests.conftest import TINY_CONFIG


def run_cli(engine: str, out) -> dict:
    assert main(["run", "--config", str(TINY_CONFIG), "--engine", engine, "--out", str(out), "--quiet"]) == 0
    return json.loads((out / "summary.json").read_text())


def test_flower_sim_matches_inprocess_on_tiny_config(tmp_path):
    ref = run_cli("inprocess", tmp_path / "inprocess")
    sim = run_cli("flower-sim", tmp_path / "sim")
    assert sim["engine"] == "flower-sim"
    assert {f.name for f in (tmp_path / "inprocess").iterdir()} <= {f.name for f in (tmp_path / "sim").iterdir()}
    assert [c["id"] for c in sim["clients"]] == [c["id"] for c in ref["clients"]]
    for a, b in zip(ref["clients"], sim["clients"], strict=True):
        for key in ("accuracy", "accuracy_implicit", "accuracy_explicit", "reward_margin"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["id"], key)
    assert sim["mean_accuracy_by_round"] == pytest.approx(ref["mean_accuracy_by_round"], abs=1e-6)
