"""``fedpdpo tune``: grid parsing, the validation rule that chooses, resume, the written table, bad input."""

from __future__ import annotations

import json
import statistics
import tomllib
from pathlib import Path

import pytest

from fedpdpo.cli import main
from fedpdpo.errors import ConfigError, FedPDPOError
from fedpdpo.tune import parse_grid, run_tune, split_values, validation_score, variants
from tests.conftest import TINY_CONFIG

FAST = ["rounds=1", "local_steps=2"]


def test_grid_values_split_at_top_level_commas_only():
    assert split_values("1e-3, 5e-4") == ["1e-3", "5e-4"]
    assert split_values('["q_proj","v_proj"],["q_proj"]') == ['["q_proj","v_proj"]', '["q_proj"]']
    assert split_values('"a,b",c') == ['"a,b"', "c"]
    grid = parse_grid(["max_length=128,256", 'lora.target_modules=["q_proj","v_proj"],["q_proj"]'])
    points = variants(grid)
    assert [v.sets for v in points] == [
        ("max_length=128", 'lora.target_modules=["q_proj","v_proj"]'),
        ("max_length=128", 'lora.target_modules=["q_proj"]'),
        ("max_length=256", 'lora.target_modules=["q_proj","v_proj"]'),
        ("max_length=256", 'lora.target_modules=["q_proj"]'),
    ]
    assert len({v.name for v in points}) == 4  # distinct directories


@pytest.mark.parametrize("spec", ["lr", "lr=", "=1,2", "lr=1,,2"])
def test_malformed_grid_is_a_config_error(spec):
    with pytest.raises(ConfigError, match="--grid expects"):
        parse_grid([spec])


def test_a_key_given_twice_is_refused():
    with pytest.raises(ConfigError, match="names 'lr' twice"):
        parse_grid(["lr=1e-3", "lr=5e-4"])


@pytest.mark.parametrize(("key", "option"), [("algorithm", "--algorithm"), ("seed", "--seeds")])
def test_algorithm_and_seed_are_not_grid_keys(key, option):
    with pytest.raises(ConfigError, match=f"cannot vary '{key}': use {option}"):
        parse_grid([f"{key}=1,2"])


def test_validation_score_averages_the_chosen_score_and_the_implicit_reward():
    summary = {
        "clients": [
            {"selected_score": "combined", "val/accuracy_combined": 0.9, "val/accuracy_implicit": 0.7},
            {"val/accuracy_implicit": 0.6},  # an algorithm with the implicit reward only
        ]
    }
    assert validation_score(summary) == pytest.approx(statistics.fmean([0.8, 0.6]))
    assert validation_score({"clients": [{"accuracy": 0.5}]}) is None


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Path:
    """A real sweep on the tiny config through the CLI: two learning rates x two seeds, two runs at a time."""
    out = tmp_path_factory.mktemp("tune") / "out"
    sets = [a for s in FAST for a in ("--set", s)]
    argv = ["tune", "--config", str(TINY_CONFIG), "--grid", "lr=5e-3,1e-5", "--seeds", "0,1", "--jobs", "2"]
    argv += ["--out", str(out)]
    assert main([*argv, "--quiet", *sets]) == 0
    return out


def test_tune_chooses_the_best_validation_score_and_reports_test_beside_it(tuned: Path):
    tune = json.loads((tuned / "tune.json").read_text())
    assert [v["sets"] for v in tune["variants"]] == [["lr=5e-3"], ["lr=1e-5"]]
    by_name = {}
    for v in tune["variants"]:
        runs = [json.loads((tuned / v["name"] / "fedpdpo" / f"seed{s}" / "summary.json").read_text()) for s in (0, 1)]
        scores = [validation_score(r) for r in runs]
        assert v["validation_score"]["mean"] == pytest.approx(statistics.fmean(scores))
        accuracy = statistics.fmean(statistics.fmean(c["accuracy"] for c in r["clients"]) for r in runs)
        assert v["test"]["accuracy"]["mean"] == pytest.approx(accuracy)
        saved = tomllib.loads((tuned / v["name"] / "fedpdpo" / "seed0" / "config.toml").read_text())
        assert saved["lr"] == float(v["sets"][0].split("=")[1])  # each variant ran with its own setting
        by_name[v["name"]] = v["validation_score"]["mean"]
    best = max(by_name.values())
    assert tune["chosen"] == next(name for name, score in by_name.items() if score == best)
    table = (tuned / "tune.md").read_text()
    assert table.count("(chosen)") == 1 and "| validation score | test accuracy |" in table


def test_tune_resumes_without_rerunning_finished_runs(tuned: Path):
    summary = tuned / "lr=5e-3" / "fedpdpo" / "seed0" / "summary.json"
    before = summary.stat().st_mtime_ns
    run_tune(TINY_CONFIG, parse_grid(["lr=5e-3,1e-5"]), "fedpdpo", [0, 1], tuned, FAST, quiet=True)
    assert summary.stat().st_mtime_ns == before


def test_runs_without_validation_pairs_cannot_be_tuned(tmp_path: Path):
    with pytest.raises(FedPDPOError, match="no validation pairs"):
        run_tune(TINY_CONFIG, parse_grid(["lr=5e-3"]), "fedavg", [0], tmp_path, [*FAST, "data.validation_fraction=0.0"])


def test_cli_unknown_grid_key_is_one_line_and_runs_nothing(tmp_path: Path, capsys):
    out = tmp_path / "out"
    argv = ["tune", "--config", str(TINY_CONFIG), "--grid", "no_such_key=1,2", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_key" in err[0]
    assert not out.exists()
