"""Centralized DPO: one model trained on the pooled training data of all clients (upper reference for sharing).

How it runs on the unchanged federated engine:

* ``prepare_clients`` gives client 0 the union of every client's training pairs (conflicting clients' pairs
  included, swapped as that client sees them); the other clients keep their own sets but never train.
* ``sample_clients`` picks only client 0 every round, and its instructions (``local-steps``) make it run
  ``num_clients * local_steps`` steps, so the total number of gradient steps (and pairs seen) equals that of the
  federated runs.
* Aggregation is the identity on client 0's LoRA; every client is then evaluated on its *own* test set with that
  single model (implicit reward, no local modules), exactly like FedAvg's global model.

This is "centralized" in the data sense (one optimizer sees all data), not a claim of being an upper bound under
preference conflict: a single model cannot satisfy opposite preferences, which is the point of personalization.
"""

from __future__ import annotations

import dataclasses

from fedpdpo.config import RunConfig
from fedpdpo.data.partition import ClientData
from fedpdpo.instructions import LOCAL_STEPS, Instructions
from fedpdpo.strategies.base import Strategy
from fedpdpo.strategies.fedavg import without_local_modules

TRAINER = 0  # the client that holds the pooled data


class Centralized(Strategy):
    name = "centralized"
    reference = "centralized training on pooled data (reference, not federated)"

    def __init__(self, steps_per_round: int | None = None) -> None:
        #: Steps of the pooled client per round; None: the config's ``local_steps`` (``from_config`` sets
        #: ``num_clients * local_steps``, the federated runs' total).
        self.steps_per_round = steps_per_round

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Centralized:
        return cls(steps_per_round=cfg.num_clients * cfg.local_steps)

    def configure(self, cfg: RunConfig) -> RunConfig:
        return without_local_modules(super().configure(cfg))

    def fit_instructions(self, server_round: int) -> Instructions:
        return {} if self.steps_per_round is None else {LOCAL_STEPS: self.steps_per_round}

    def prepare_clients(self, clients: list[ClientData]) -> list[ClientData]:
        pooled = [r for c in clients for r in c.train]
        return [dataclasses.replace(c, train=pooled) if c.client_id == TRAINER else c for c in clients]

    def sample_clients(self, server_round: int, num_clients: int, fraction: float, seed: int) -> list[int]:
        return [TRAINER]
