"""Numerical safety: a client with a NaN loss is rejected for its round, training goes on, nothing non-finite is
ever averaged into the global model."""

from __future__ import annotations

import json
import math

import torch
from safetensors.torch import load_file

from fedpdpo.client import trainer
from fedpdpo.client.state import ClientStore
from fedpdpo.engines import inprocess
from fedpdpo.engines.inprocess import run_inprocess
from fedpdpo.engines.server import EvalReply, FitReply, ServerSpec, rejection_reason, run_server
from fedpdpo.strategies import get_strategy
from fedpdpo.strategies.base import Strategy

POISONED = (1, 1)  # (client, round) whose loss becomes NaN


def _spy_aggregate(monkeypatch) -> list[tuple[int, list]]:
    """Record every update the strategy is asked to average."""
    seen: list[tuple[int, list]] = []
    real = Strategy.aggregate

    def aggregate(self, server_round, current, updates):
        seen.append((server_round, list(updates)))
        return real(self, server_round, current, updates)

    monkeypatch.setattr(Strategy, "aggregate", aggregate)
    return seen


def test_nan_loss_rejects_the_client_for_that_round_only(tiny_cfg, tmp_path, monkeypatch, caplog):
    current = {"client_round": None}
    real_fit, real_objective = inprocess.fit, trainer.fedpdpo_objective

    def fit(model, task, state, shared, initial, cfg, server_round, instructions=None, on_step=None):
        current["client_round"] = (task.client_id, server_round)
        return real_fit(model, task, state, shared, initial, cfg, server_round, instructions, on_step=on_step)

    def objective(*args, **kwargs):
        result = real_objective(*args, **kwargs)
        if current["client_round"] == POISONED:
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(inprocess, "fit", fit)
    monkeypatch.setattr(trainer, "fedpdpo_objective", objective)
    seen = _spy_aggregate(monkeypatch)
    # keep the optimizer state a finished run drops, to read how many rounds client 1 really trained
    monkeypatch.setattr(ClientStore, "finalize", lambda self, client_ids: 0)
    out = tmp_path / "out"
    summary = run_inprocess(tiny_cfg, out, quiet=True)

    # rejected for round 1, logged, reported in metrics and summary
    assert "update of client 1 rejected" in caplog.text
    rows = {(r["round"], r["client"]): r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert rows[(1, 1)]["train/failed"] == 1.0 and "train_loss" not in rows[(1, 1)]
    assert "train_loss" in rows[(1, 0)] and "train_loss" in rows[(2, 1)]  # everyone else, and client 1 later
    assert [(r["round"], r["client"]) for r in summary["rejected_updates"]] == [POISONED]
    assert "non-finite" in summary["rejected_updates"][0]["reason"]
    # the server averaged only finite updates, and only client 0's in round 1
    assert [(r, sorted(u.client_id for u in ups)) for r, ups in seen] == [(1, [0]), (2, [0, 1])]
    assert all(torch.isfinite(t).all() for _, ups in seen for u in ups for t in u.tensors.values())
    assert all(torch.isfinite(t).all() for t in load_file(out / "global.safetensors").values())
    assert all(math.isfinite(c["accuracy"]) for c in summary["clients"])
    # the rejected round left no client state behind: client 1's round 2 started from its initial state
    assert 1 not in ClientStore(out / "clients").versions(1)
    assert ClientStore(out / "clients").load(1).rounds_trained == 1


class NaNTransport:
    """A transport whose client 1 returns a NaN tensor without raising (a buggy or hostile remote client)."""

    def attach(self, run):
        pass

    def fit(self, server_round, client_ids, shared, instructions, on_step):
        replies = []
        for cid in client_ids:
            tensors = {k: v + 1.0 for k, v in shared.items()}
            if cid == 1:
                tensors = {
                    k: torch.full_like(v, float("inf") if i else float("nan"))
                    for i, (k, v) in enumerate(shared.items())
                }
            replies.append(FitReply(cid, 10, tensors, {"loss": 0.5}))
        return replies

    def evaluate(self, server_round, client_ids, shared):
        metrics = {"accuracy": 0.5, "accuracy_implicit": 0.5, "reward_margin": 0.0, "n_train": 10, "n_test": 2}
        return [EvalReply(cid, dict(metrics)) for cid in client_ids]


def test_server_never_averages_a_non_finite_tensor(tiny_cfg, tmp_path, monkeypatch):
    seen = _spy_aggregate(monkeypatch)
    shared = {"a.lora_A.weight": torch.zeros(2, 2), "a.lora_B.weight": torch.zeros(2, 2)}
    spec = ServerSpec(tiny_cfg, get_strategy("fedpdpo"), shared, "fake", "test")
    summary = run_server(spec, NaNTransport(), tmp_path, quiet=True)
    assert [sorted(u.client_id for u in ups) for _, ups in seen] == [[0]] * tiny_cfg.rounds
    final = load_file(tmp_path / "global.safetensors")
    assert all(torch.equal(t, torch.full((2, 2), float(tiny_cfg.rounds))) for t in final.values())
    assert [r["client"] for r in summary["rejected_updates"]] == [1] * tiny_cfg.rounds


def test_rejection_reason():
    ok = FitReply(0, 1, {"w": torch.ones(2)})
    assert rejection_reason(ok) == ""
    assert "non-finite" in rejection_reason(FitReply(0, 1, {"w": torch.tensor([1.0, float("-inf")])}))
    assert rejection_reason(FitReply(0, 1, None, error="client 0: non-finite loss")) == "client 0: non-finite loss"
