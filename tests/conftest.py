"""Shared fixtures. Every test runs offline and with Flower's background behaviour switched off."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny.toml"
TINY_DATA = ROOT / "data" / "tiny_pairs.jsonl"
#: The shared IMDB pairs the real-model tests read (skipped where ../shared/data is absent).
IMDB = ROOT.parent / "shared" / "data" / "imdb_sentiment_pairs.jsonl"
#: ``--set`` overrides of configs/tiny.toml for the smallest real SmolLM2 job: one client, 2 steps, 4 + 4 pairs.
SMOLLM2_SMALL = [
    'model="smollm2"',
    "num_clients=1",
    "local_steps=2",
    "batch_size=2",
    "max_length=64",
    "data.max_prompt_length=0",
    "lr=1e-3",
    "lora.last_n_layers=2",
    "method.adapter_dim=16",
    "data.max_train_per_client=4",
    "data.max_test_per_client=4",
    "partition.conflict_fraction=0.0",
]
#: For subprocesses: this checkout's package first (a virtualenv's editable install may point at another checkout).
#: (An inherited PYTHONPATH stays after them: packages installed with ``pip --target`` are found too.)
PYTHONPATH = os.pathsep.join([str(ROOT / "src"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a ``python -m fedpdpo.cli`` subprocess that runs this checkout's code (src/ first, whatever
    fedpdpo the interpreter has installed) offline."""
    return os.environ | {"PYTHONPATH": PYTHONPATH, "HF_HUB_OFFLINE": "1"} | extra


@pytest.fixture(autouse=True, scope="session")
def _offline_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    os.environ.setdefault("FLWR_HOME", str(tmp_path_factory.mktemp("flwr_home")))


@pytest.fixture
def tiny_cfg():
    """The tiny config (random 2-layer model, fixture data); tests may modify the returned object."""
    from fedpdpo.config import load_config

    return load_config(TINY_CONFIG)


def interrupt_at_checkpoint(monkeypatch: pytest.MonkeyPatch, server_round: int) -> None:
    """Make the next run stop like a Ctrl-C just before it checkpoints ``server_round``: the directory is then what a
    kill leaves (the checkpoint of the round before, clients' state of this round maybe written)."""
    from fedpdpo.engines import server

    real = server.save_checkpoint

    def save(out, ckpt):
        if ckpt.server_round == server_round:
            monkeypatch.setattr(server, "save_checkpoint", real)
            raise KeyboardInterrupt
        real(out, ckpt)

    monkeypatch.setattr(server, "save_checkpoint", save)
