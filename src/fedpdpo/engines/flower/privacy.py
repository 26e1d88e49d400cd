"""Central differential privacy on the shared update, the way Flower's client-side fixed clipping does it.

Each node clips its update (new shared tensors - received shared tensors) to L2 norm ``privacy.clipping_norm`` with
Flower's ``fixedclipping_mod`` before the update leaves the node (see ``client_app.py``); the server aggregates
with the run's strategy and adds Gaussian noise with standard deviation
``noise_multiplier * clipping_norm / sampled_clients`` (Flower's ``compute_stdv``), as
``flwr.serverapp.strategy.DifferentialPrivacyClientSideFixedClipping`` does. Flower's wrapper cannot be used as is:
it wraps a Flower strategy, and fedpdpo's server loop aggregates with fedpdpo strategies (which choose the shared
tensors). :class:`DifferentialPrivacy` is the same idea for them: a strategy that wraps another, delegates
everything to it and adds the noise after its aggregation; its server state is the wrapped strategy's. The noise is
drawn from a generator seeded by (seed, round), so a DP run is reproducible.

Guarantee caveats (as in Flower): the (epsilon, delta) accounting assumes uniform client weights; fedpdpo's
FedAvg weights clients by their number of pairs, which is uniform only for equal-sized partitions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_stdv

from fedpdpo.client.trainer import derive_seed
from fedpdpo.config import RunConfig
from fedpdpo.data.partition import ClientData
from fedpdpo.errors import ConfigError
from fedpdpo.instructions import Instructions
from fedpdpo.strategies import ClientUpdate, Strategy

NOISE_STREAM = 0xD9  # separates the noise generator's seed from the clients' training seeds


def clipping_config(cfg: RunConfig) -> dict[str, Any]:
    """The key that switches on ``fixedclipping_mod`` on the nodes (empty when DP is off)."""
    return {KEY_CLIPPING_NORM: float(cfg.privacy.clipping_norm)} if cfg.privacy.clipping_norm > 0 else {}


def clients_per_round(strategy: Strategy, cfg: RunConfig) -> int:
    """How many clients ``strategy`` samples per round (``centralized``: one, whatever ``client_fraction`` says)."""
    return len(strategy.sample_clients(1, cfg.num_clients, cfg.client_fraction, cfg.seed))


def noise_std(cfg: RunConfig, sampled_clients: int) -> float:
    """Flower's ``compute_stdv``: ``noise_multiplier * clipping_norm / sampled clients``."""
    return compute_stdv(cfg.privacy.noise_multiplier, cfg.privacy.clipping_norm, sampled_clients)


def check_secagg(strategy: Strategy, cfg: RunConfig) -> None:
    """SecAgg+ hides one update only among others: refuse a strategy that trains fewer than 2 clients per round."""
    if cfg.privacy.secagg and clients_per_round(strategy, cfg) < 2:
        raise ConfigError(
            f"config key 'privacy.secagg' needs at least 2 clients per round; algorithm '{strategy.name}' trains "
            f"{clients_per_round(strategy, cfg)}"
        )


class DifferentialPrivacy(Strategy):
    """``strategy`` with seeded Gaussian noise of standard deviation ``std`` added to every aggregate."""

    def __init__(self, strategy: Strategy, std: float, seed: int) -> None:
        self.strategy, self.std, self.seed = strategy, std, seed
        self.name, self.reference = strategy.name, strategy.reference

    def configure(self, cfg: RunConfig) -> RunConfig:
        return self.strategy.configure(cfg)

    def prepare_clients(self, clients: list[ClientData]) -> list[ClientData]:
        return self.strategy.prepare_clients(clients)

    def fit_instructions(self, server_round: int) -> Instructions:
        return self.strategy.fit_instructions(server_round)

    def is_shared(self, name: str) -> bool:
        return self.strategy.is_shared(name)

    def shared_names(self, trainable: Sequence[str]) -> list[str]:
        return self.strategy.shared_names(trainable)

    def sample_clients(self, server_round: int, num_clients: int, fraction: float, seed: int) -> list[int]:
        return self.strategy.sample_clients(server_round, num_clients, fraction, seed)

    def aggregate(
        self, server_round: int, current: dict[str, torch.Tensor], updates: Sequence[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        new = self.strategy.aggregate(server_round, current, updates)
        if not updates:
            return new
        gen = torch.Generator().manual_seed(derive_seed(self.seed, server_round, NOISE_STREAM))
        return {k: v + self.std * torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in new.items()}

    def state_dict(self) -> dict[str, Any]:
        return self.strategy.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.load_state_dict(state)


def with_privacy(strategy: Strategy, cfg: RunConfig) -> Strategy:
    """``strategy`` wrapped in :class:`DifferentialPrivacy` (unchanged when ``noise_multiplier`` is 0)."""
    if cfg.privacy.noise_multiplier <= 0:
        return strategy
    return DifferentialPrivacy(strategy, noise_std(cfg, clients_per_round(strategy, cfg)), cfg.seed)
