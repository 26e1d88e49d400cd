"""Personalization that cannot hurt: each client ranks pairs by the score that is most accurate on its own
validation pairs, the global policy (shared tensors, no local modules) among the candidates."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedpdpo.client.state import ClientState
from fedpdpo.client.trainer import SCORES, _choose, evaluate, fit
from fedpdpo.config import load_config
from fedpdpo.engines.setup import build_setup
from tests.conftest import TINY_CONFIG


def test_choose_takes_the_most_accurate_on_validation_and_breaks_ties_by_order():
    right, wrong = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([-1.0, 2.0, -0.5])
    val = {"implicit": wrong, "combined": wrong, "explicit": right, "global": right}
    assert _choose(val, "auto") == "explicit"  # explicit and global tie at 100 %: explicit comes first
    assert _choose({"implicit": right, "global": right}, "auto") == "implicit"
    assert _choose({"implicit": wrong, "global": right}, "auto") == "global"
    assert _choose(val, "combined") == "combined"  # a fixed score is kept whatever validation says
    empty = torch.zeros(0)
    assert _choose({"implicit": empty, "combined": empty}, "auto") == "combined"  # no validation pairs
    assert _choose({}, "auto") == "implicit"


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
    best = max(metrics[f"val/accuracy_{name}"] for name in SCORES)
    assert metrics[f"val/accuracy_{chosen}"] == best
    own_policy = metrics["val/accuracy_implicit"] >= metrics["val/accuracy_global"]
    assert metrics["selected_policy"] == float(own_policy)
    assert metrics["accuracy_policy"] == metrics["accuracy_implicit" if own_policy else "accuracy_global"]


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
