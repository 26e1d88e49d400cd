"""Personalization that cannot hurt: each client ranks pairs by its own score unless another candidate, the global
policy (shared tensors, no local modules) among them, is clearly more accurate on its own validation pairs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedpdpo.client.state import ClientState
from fedpdpo.client.trainer import SCORES, _choose, evaluate, fit
from fedpdpo.config import load_config
from fedpdpo.engines.setup import build_setup
from tests.conftest import TINY_CONFIG


def test_choose_keeps_the_own_score_unless_another_is_clearly_more_accurate():
    right, wrong = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([-1.0, 2.0, -0.5])
    val = {"implicit": wrong, "combined": wrong, "explicit": right, "global": right}
    # explicit and global both win 2 of the 3 pairs against combined: z = 2 / sqrt(2) = 1.41
    assert _choose(val, "auto", 0.0) == "explicit"  # explicit and global tie at 100 %: explicit comes first
    assert _choose(val, "auto", 1.4) == "explicit"
    assert _choose(val, "auto", 1.5) == "combined"  # not clear enough: the method's own score
    assert _choose({"implicit": right, "global": right}, "auto", 0.0) == "implicit"  # a tie keeps the own policy
    assert _choose({"implicit": wrong, "global": right}, "auto", 0.0) == "global"
    assert _choose({"implicit": wrong, "global": right}, "auto", 1.5) == "implicit"
    assert _choose(val, "combined") == "combined"  # a fixed score is kept whatever validation says
    empty = torch.zeros(0)
    assert _choose({"implicit": empty, "combined": empty}, "auto") == "combined"  # no validation pairs
    assert _choose({}, "auto") == "implicit"


def test_choose_switch_statistic_is_mcnemars_and_counts_a_zero_margin_half():
    # 20 pairs: explicit is right on 8 where combined is wrong, wrong on 2 where combined is right, the same on 10
    combined = torch.tensor([-1.0] * 8 + [1.0] * 2 + [1.0] * 6 + [-1.0] * 4)
    explicit = torch.tensor([1.0] * 8 + [-1.0] * 2 + [1.0] * 6 + [-1.0] * 4)
    val = {"implicit": -torch.ones(20), "combined": combined, "explicit": explicit}
    z = (8 - 2) / (8 + 2) ** 0.5  # 1.897
    assert _choose(val, "auto", z - 0.01) == "explicit"
    assert _choose(val, "auto", z + 0.01) == "combined"
    # a margin of exactly 0 is half right: two pairs at 0 against two right differ by d = 0.5 each, z = 1 / sqrt(0.5)
    half = {"implicit": torch.zeros(2), "combined": torch.zeros(2), "explicit": torch.ones(2)}
    assert _choose(half, "auto", 1.41) == "explicit"
    assert _choose(half, "auto", 1.42) == "combined"


@pytest.fixture(scope="module")
def trained():
    cfg = load_config(TINY_CONFIG, ["data.validation_fraction=0.25", "method.global_weight=0.5"])
    setup = build_setup(cfg)
    result = fit(setup.model, setup.tasks[0], ClientState(), setup.initial_global(), setup.initial, setup.cfg, 1)
    return setup, result


def test_validation_scores_and_the_selected_accuracy(trained):
    setup, result = trained
    assert setup.tasks[0].val and "loss/global" in result.metrics
    metrics = evaluate(setup.model, setup.tasks[0], result.state, result.shared, setup.initial, setup.cfg)
    for name in SCORES:
        assert 0.0 <= metrics[f"accuracy_{name}"] <= 1.0 and 0.0 <= metrics[f"val/accuracy_{name}"] <= 1.0
    chosen = SCORES[int(metrics["selected_score"])]
    assert metrics["accuracy"] == metrics[f"accuracy_{chosen}"]
    # the default guard (switch_z = 1.645): the own score, or one more accurate on the validation pairs
    assert chosen == "combined" or metrics[f"val/accuracy_{chosen}"] > metrics["val/accuracy_combined"]
    assert (
        metrics["accuracy_policy"] == metrics["accuracy_implicit" if metrics["selected_policy"] else "accuracy_global"]
    )
    # without the guard (switch_z = 0): the most accurate on the validation pairs, the own score and policy on a tie
    cfg = dataclasses.replace(setup.cfg, method=dataclasses.replace(setup.cfg.method, switch_z=0.0))
    plain = evaluate(setup.model, setup.tasks[0], result.state, result.shared, setup.initial, cfg)
    chosen = SCORES[int(plain["selected_score"])]
    assert plain[f"val/accuracy_{chosen}"] == max(plain[f"val/accuracy_{name}"] for name in SCORES)
    own_policy = plain["val/accuracy_implicit"] >= plain["val/accuracy_global"]
    assert plain["selected_policy"] == float(own_policy)
    assert plain["accuracy_policy"] == plain["accuracy_implicit" if own_policy else "accuracy_global"]


def test_global_score_is_the_global_policy_fedavg_would_rank_by(trained):
    """The global candidate ranks by the shared LoRA alone: exactly FedAvg's model with the same shared tensors."""
    setup, result = trained
    metrics = evaluate(setup.model, setup.tasks[0], result.state, result.shared, setup.initial, setup.cfg)
    fedavg = build_setup(dataclasses.replace(setup.cfg, algorithm="fedavg"))
    plain = evaluate(fedavg.model, fedavg.tasks[0], ClientState(), result.shared, fedavg.initial, fedavg.cfg)
    assert metrics["accuracy_global"] == plain["accuracy_implicit"]
    assert metrics["val/accuracy_global"] == plain["val/accuracy_implicit"]
    assert "accuracy_global" not in plain  # FedAvg's own model is the global one


def test_without_the_global_policy_the_own_model_metrics_are_unchanged(trained):
    """``global_policy=False`` (the cross-client matrix) drops the global margins and nothing else."""
    setup, result = trained
    full = evaluate(setup.model, setup.tasks[0], result.state, result.shared, setup.initial, setup.cfg)
    own = evaluate(
        setup.model, setup.tasks[0], result.state, result.shared, setup.initial, setup.cfg, global_policy=False
    )
    assert "accuracy_global" not in own and "val/accuracy_global" not in own
    assert own["selected_policy"] == 1.0 and own["accuracy_policy"] == own["accuracy_implicit"]
    for key, value in own.items():
        if key not in ("selected_policy", "accuracy_policy"):
            assert full[key] == value, key


def test_selection_cv_replays_the_runs_own_choice_and_cross_fits_every_rule(tmp_path):
    """scripts/selection_cv.py (docs/results.md, "Choosing the score on few validation pairs"): the recorded
    per-pair margins, replayed with the library's rule at the run's ``switch_z``, give each client's kept round,
    score and test accuracy from the run's summary; every rule is cross-fitted on validation pairs alone."""
    import importlib.util
    import json

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("selection_cv", ROOT / "scripts" / "selection_cv.py")
    assert spec is not None and spec.loader is not None
    selection_cv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(selection_cv)
    out = tmp_path / "run"
    selection_cv.record(TINY_CONFIG, out, ["data.validation_fraction=0.3", "rounds=3"])
    summary = json.loads((out / "summary.json").read_text())
    result = selection_cv.analyse([out], splits=20, seed=0)
    row = result["rules"]["guarded z>1.645"]  # the default, method.switch_z = 1.645
    for client, chosen, test in zip(summary["clients"], row["chosen"], row["test"], strict=True):
        assert chosen == f"{client['selected_score']}@{client['selected_round']}"
        assert test == pytest.approx(client["accuracy"])
    for rule in result["rules"].values():
        assert all(0.0 <= x <= 1.0 for x in rule["cross_fit_val"]) and rule["cross_fit_val_vs_old"][0] == pytest.approx(
            rule["cross_fit_val_mean"] - result["rules"]["old: most accurate"]["cross_fit_val_mean"]
        )
    # pool: two analyses as one (here the same one twice, the second under the rule's name before 7 December)
    (tmp_path / "a.json").write_text(json.dumps(result))
    legacy = result | {
        "rules": {{"old: most accurate": "argmax (today)"}.get(k, k): v for k, v in result["rules"].items()}
    }
    (tmp_path / "b.json").write_text(json.dumps(legacy))
    pooled = selection_cv.pool([tmp_path / "a.json", tmp_path / "b.json"])
    assert pooled["clients"] == result["clients"] * 2 and pooled["rules"].keys() == result["rules"].keys()
    for name, rule in pooled["rules"].items():
        assert rule["test"] == result["rules"][name]["test"] * 2
        assert rule["cross_fit_val_mean"] == pytest.approx(result["rules"][name]["cross_fit_val_mean"])
        assert rule["test_vs_old"][0] == pytest.approx(result["rules"][name]["test_vs_old"][0])
    assert pooled["policy"].keys() == result["policy"].keys() and result["policy"]
    for z, row in pooled["policy"].items():
        assert row == pytest.approx(result["policy"][z])
    (tmp_path / "c.json").write_text(json.dumps(result | {"rules": 3}))
    for bad in (tmp_path / "run" / "summary.json", tmp_path / "c.json"):  # not an analysis: one line, exit code 2
        with pytest.raises(SystemExit) as exit_info:
            selection_cv.main(["pool", str(bad)])
        assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:  # not a recorded run: one line, exit code 2
        selection_cv.main(["analyse", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:  # a config that does not exist: the same
        selection_cv.main(["record", "--config", str(tmp_path / "none.toml"), "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    # the library is as it was: a plain run afterwards records nothing
    from fedpdpo.client import trainer

    assert trainer._score_split.__name__ == "_score_split"
