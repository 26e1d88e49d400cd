"""What a federated algorithm is, seen from the engine.

A strategy declares (1) how it sets up the model's local modules and objective (``configure``), (2) which trainable
tensors are *shared* (sent to and aggregated by the server; everything else trainable stays on its client), and
(3) how the server aggregates the shared tensors. Engines call only this interface, never special-case a strategy.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedpdpo.config import RunConfig
from fedpdpo.data.partition import ClientData


@dataclass
class ClientUpdate:
    client_id: int
    num_examples: int
    tensors: dict[str, torch.Tensor]


def weighted_average(updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
    """Sample-weighted FedAvg, summed in float64 in client-id order so every engine gets identical bits."""
    ordered = sorted(updates, key=lambda u: u.client_id)
    total = sum(u.num_examples for u in ordered)
    out: dict[str, torch.Tensor] = {}
    for name, first in ordered[0].tensors.items():
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for u in ordered:
            acc += u.tensors[name].to(torch.float64) * (u.num_examples / total)
        out[name] = acc.to(first.dtype)
    return out


class Strategy:
    """Base strategy: FedAvg over the shared LoRA. Subclasses override what differs."""

    name = "base"
    #: Paper or reference for the algorithm (shown in reports).
    reference = ""

    def configure(self, cfg: RunConfig) -> RunConfig:
        """Return the run config with this algorithm's modules and loss terms set (the input is not modified)."""
        return copy.deepcopy(cfg)

    def prepare_clients(self, clients: list[ClientData]) -> list[ClientData]:
        """The clients' data as this algorithm sees it (identity; ``centralized`` pools the training sets)."""
        return clients

    def is_shared(self, name: str) -> bool:
        """Whether the trainable tensor ``name`` travels to the server."""
        return ".lora_" in name

    def shared_names(self, trainable: Sequence[str]) -> list[str]:
        return [n for n in trainable if self.is_shared(n)]

    def sample_clients(self, server_round: int, num_clients: int, fraction: float, seed: int) -> list[int]:
        """The clients that train in ``server_round``: a seeded sample of ``round(fraction * num_clients)``."""
        k = max(1, round(fraction * num_clients))
        if k >= num_clients:
            return list(range(num_clients))
        gen = torch.Generator().manual_seed(seed * 1_000_003 + server_round)
        return sorted(torch.randperm(num_clients, generator=gen)[:k].tolist())

    def aggregate(
        self, server_round: int, current: dict[str, torch.Tensor], updates: Sequence[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        """New global shared tensors from the clients' updates (sample-weighted FedAvg by default)."""
        if not updates:
            return current
        return weighted_average(updates)
