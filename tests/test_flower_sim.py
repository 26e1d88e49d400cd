"""``fedpdpo run --engine flower-sim`` (Flower's Ray simulation engine) gives the in-process engine's results."""

from __future__ import annotations

import json

import pytest

from fedpdpo.cli import main
from tests.conftest import TINY_CONFIG


def run_cli(engine: str, out, *overrides: str) -> dict:
    sets = [arg for o in overrides for arg in ("--set", o)]
    assert main(["run", "--config", str(TINY_CONFIG), "--engine", engine, "--out", str(out), "--quiet", *sets]) == 0
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


def test_flower_sim_keeps_the_same_best_validation_rounds(tmp_path):
    """``select_round = "best_val"``: the snapshot is taken on the client's side (the ClientApp on a node), and the
    kept rounds and their accuracies are the in-process engine's."""
    overrides = ("rounds=4", "lr=5e-2", "select_round=best_val", "data.validation_fraction=0.25")
    ref = run_cli("inprocess", tmp_path / "inprocess", *overrides)
    sim = run_cli("flower-sim", tmp_path / "sim", *overrides)
    assert [c["selected_round"] for c in sim["clients"]] == [c["selected_round"] for c in ref["clients"]]
    assert min(c["selected_round"] for c in ref["clients"]) < 4
    for a, b in zip(ref["clients"], sim["clients"], strict=True):
        assert b["accuracy_implicit"] == pytest.approx(a["accuracy_implicit"], rel=1e-4, abs=1e-6)
    assert (tmp_path / "sim" / "clients" / "client_0" / "best").is_dir()
