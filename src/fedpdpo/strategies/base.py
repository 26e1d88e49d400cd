"""What a federated algorithm is, seen from the engine.

A strategy declares, in Flower's style, and never rewrites the user's config:

1. which local modules the model has and how it is scored (``configure``: an idempotent copy of the config with
   the module switches set, used to build the model; the saved ``config.toml`` stays what the user asked for);
2. what its clients do each round (``fit_instructions``: a small dict such as ``{"proximal-mu": 0.01}`` that
   travels with the shared tensors, see :mod:`fedpdpo.instructions`);
3. which trainable tensors are *shared* (sent to and aggregated by the server; everything else trainable stays on
   its client), and how the server aggregates them;
4. its server-side state (``state_dict`` / ``load_state_dict``), which checkpoints save and restore.

Its own parameters (FedProx's ``mu``, FedAdam's ``eta``) are constructor arguments; :meth:`Strategy.from_config`
reads the ones the config may set. Engines call only this interface, never special-case a strategy.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedpdpo.config import RunConfig
from fedpdpo.data.partition import ClientData
from fedpdpo.errors import FedPDPOError
from fedpdpo.instructions import Instructions
from fedpdpo.model.naming import is_lora


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
    """Base strategy: FedAvg over the shared LoRA with the full FedPDPO model. Subclasses override what differs."""

    name = "base"
    #: Paper or reference for the algorithm (shown in reports).
    reference = ""

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Strategy:
        """The strategy with the parameters ``cfg`` sets for it (none for most strategies)."""
        return cls()

    def configure(self, cfg: RunConfig) -> RunConfig:
        """A copy of ``cfg`` with this algorithm's local modules and evaluation score switched on or off.

        Only module switches, so ``configure(configure(c)) == configure(c)``: the model of a resumed run, of an
        export or of a remote node is the same whichever of the two it is built from."""
        return copy.deepcopy(cfg)

    def prepare_clients(self, clients: list[ClientData]) -> list[ClientData]:
        """The clients' data as this algorithm sees it (identity; ``centralized`` pools the training sets)."""
        return clients

    def fit_instructions(self, server_round: int) -> Instructions:
        """What every client sampled in ``server_round`` is told to do besides plain DPO (nothing by default)."""
        return {}

    def is_shared(self, name: str) -> bool:
        """Whether the trainable tensor ``name`` travels to the server."""
        return is_lora(name)

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

    def state_dict(self) -> dict[str, Any]:
        """The server-side state a resumed run needs (tensors and plain values; empty for stateless strategies)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` from a checkpoint."""
        if state:
            raise FedPDPOError(
                f"the checkpoint holds server state {sorted(state)} but strategy {self.name!r} keeps none; it was "
                "written by another version of fedpdpo. Start the run again in a new --out directory"
            )
