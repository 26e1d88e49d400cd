"""One objective for training and evaluation: evaluation reports the training loss's metrics, under the same names
and with the same settings (``loss_type``, ``label_smoothing``)."""

from __future__ import annotations

import dataclasses

import pytest

from fedpdpo.client.state import ClientState
from fedpdpo.client.trainer import evaluate, fit
from fedpdpo.engines.setup import build_setup


@pytest.fixture(scope="module")
def trained():
    """Client 0 after one round of FedPDPO on the tiny config (so that margins are not all zero)."""
    from fedpdpo.config import load_config
    from tests.conftest import TINY_CONFIG

    setup = build_setup(load_config(TINY_CONFIG))
    task = setup.tasks[0]
    result = fit(setup.model, task, ClientState(), setup.initial_global(), setup.initial, setup.cfg, server_round=1)
    return setup, result


def _evaluate(setup, result, **method):
    cfg = dataclasses.replace(setup.cfg, method=dataclasses.replace(setup.cfg.method, **method))
    return evaluate(setup.model, setup.tasks[0], result.state, result.shared, setup.initial, cfg)


def test_evaluation_carries_the_training_metric_names(trained):
    setup, result = trained
    metrics = _evaluate(setup, result)
    assert set(result.metrics) - {"grad_norm", "steps"} <= set(metrics)
    assert metrics["loss"] == pytest.approx(
        metrics["loss/dpo"]
        + setup.cfg.method.reward_weight * metrics["loss/reward"]
        + setup.cfg.method.rpo_alpha * metrics["loss/nll"]
    )
    assert metrics["rewards/accuracies"] == metrics["accuracy_implicit"]
    assert metrics["reward_margin"] == metrics["rewards/margins"]


def test_evaluation_honours_label_smoothing(trained):
    """cDPO's loss is linear in the smoothing eps: L(eps) = (1 - eps) L(0) + eps L(1); rankings do not change."""
    setup, result = trained
    by_eps = {eps: _evaluate(setup, result, label_smoothing=eps) for eps in (0.0, 0.3, 1.0)}
    plain, smoothed, flipped = by_eps[0.0], by_eps[0.3], by_eps[1.0]
    assert smoothed["loss/dpo"] != plain["loss/dpo"]
    assert smoothed["loss/dpo"] == pytest.approx(0.7 * plain["loss/dpo"] + 0.3 * flipped["loss/dpo"], rel=1e-5)
    assert {k: v for k, v in smoothed.items() if k.startswith("accuracy")} == {
        k: v for k, v in plain.items() if k.startswith("accuracy")
    }
    ipo = _evaluate(setup, result, loss_type="ipo")
    assert ipo["loss/dpo"] != plain["loss/dpo"] and ipo["accuracy"] == plain["accuracy"]
