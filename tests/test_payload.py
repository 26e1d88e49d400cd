"""Privacy: everything a client sends to the server (in-process engine) is only the strategy's declared shared
tensors; the personalized head, reward head, adapter, optimizer state and data never leave the client.

The Flower engines have their own payload test (they serialize the same replies into Flower messages).
"""

from __future__ import annotations

import numbers

import pytest
import torch

from fedpdpo.client.state import ClientStore
from fedpdpo.engines.inprocess import InProcessTransport, run_inprocess
from fedpdpo.strategies import STRATEGIES

LOCAL_MODULES = ("local.head.", "local.reward_head.", "local.adapter.")
FAST = {"fedpdpo", "fedsa-lora", "local"}  # all of LoRA shared / half of it / nothing; the rest run with -m slow


def _capture(monkeypatch) -> tuple[list, list]:
    fits, evals = [], []
    real_fit, real_eval = InProcessTransport.fit, InProcessTransport.evaluate

    def fit(self, server_round, client_ids, shared, instructions, on_step):
        replies = real_fit(self, server_round, client_ids, shared, instructions, on_step)
        fits.extend(replies)
        return replies

    def evaluate(self, server_round, client_ids, shared):
        replies = real_eval(self, server_round, client_ids, shared)
        evals.extend(replies)
        return replies

    monkeypatch.setattr(InProcessTransport, "fit", fit)
    monkeypatch.setattr(InProcessTransport, "evaluate", evaluate)
    return fits, evals


@pytest.mark.parametrize(
    "algorithm", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in sorted(STRATEGIES)]
)
def test_only_declared_shared_tensors_leave_a_client(algorithm, tiny_cfg, tmp_path, monkeypatch):
    tiny_cfg.algorithm, tiny_cfg.rounds, tiny_cfg.local_steps = algorithm, 1, 2  # fedrep needs 2 phases
    fits, evals = _capture(monkeypatch)
    summary = run_inprocess(tiny_cfg, tmp_path / "out", quiet=True)
    declared = set(summary["communication"]["shared_parameters"])

    assert fits, "no client trained"
    for reply in fits:
        assert reply.error == "" and reply.tensors is not None
        assert set(reply.tensors) == declared  # exactly the declared names, nothing else
        assert all(isinstance(t, torch.Tensor) for t in reply.tensors.values())
        assert isinstance(reply.num_examples, int)
        # metrics are scalars: no tensors, no optimizer state, no text from the data
        assert all(isinstance(v, numbers.Real) for v in reply.metrics.values())
        sent = sum(t.numel() * t.element_size() for t in reply.tensors.values())
        assert sent == summary["communication"]["uplink_bytes_per_client_round"]
    for reply in evals:
        for key, value in reply.metrics.items():
            if key == "domains":  # the domain labels of the client's data, reported in summary.json
                assert all(isinstance(d, str) for d in value)
            else:
                assert isinstance(value, numbers.Real), key
    if algorithm.startswith("fedpdpo"):
        assert not any(name.startswith(LOCAL_MODULES) for name in declared)
        assert all(".lora_" in name for name in declared)


def test_fedpdpo_local_modules_train_but_stay_home(tiny_cfg, tmp_path, monkeypatch):
    """The modules that never travel do exist and do train: they are in the client's own store only."""
    tiny_cfg.rounds, tiny_cfg.local_steps = 1, 2
    fits, _ = _capture(monkeypatch)
    monkeypatch.setattr(ClientStore, "finalize", lambda self, client_ids: 0)  # keep the optimizer a finished run drops
    out = tmp_path / "out"
    run_inprocess(tiny_cfg, out, quiet=True)
    sent = {name for reply in fits for name in reply.tensors}
    store = ClientStore(out / "clients")
    for cid in range(tiny_cfg.num_clients):
        state = store.load(cid)
        kept = set(state.local)
        assert {prefix for prefix in LOCAL_MODULES if any(n.startswith(prefix) for n in kept)} == set(LOCAL_MODULES)
        assert not kept & sent
        assert state.optimizer is not None  # optimizer state stays with the client as well
