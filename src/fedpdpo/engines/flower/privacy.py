"""Central differential privacy on the shared update, the way Flower's client-side fixed clipping does it.

Each node clips its update (new shared tensors - received shared tensors) to L2 norm ``privacy.clipping_norm`` with
Flower's ``fixedclipping_mod`` before the update leaves the node (see ``client_app.py``); the server aggregates
with the run's strategy and adds Gaussian noise with standard deviation
``noise_multiplier * clipping_norm / sampled_clients`` (Flower's ``compute_stdv``), as
``flwr.serverapp.strategy.DifferentialPrivacyClientSideFixedClipping`` does. The wrapper cannot be used as is: it
wraps a Flower strategy, and fedpdpo's server loop aggregates with fedpdpo strategies (which choose the shared
tensors). The noise is drawn from a generator seeded by (seed, round), so a DP run is reproducible.

Guarantee caveats (as in Flower): the (epsilon, delta) accounting assumes uniform client weights; fedpdpo's
FedAvg weights clients by their number of pairs, which is uniform only for equal-sized partitions.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_stdv

from fedpdpo.client.trainer import derive_seed
from fedpdpo.config import RunConfig
from fedpdpo.strategies import ClientUpdate, Strategy

NOISE_STREAM = 0xD9  # separates the noise generator's seed from the clients' training seeds


def clipping_config(cfg: RunConfig) -> dict[str, Any]:
    """The key that switches on ``fixedclipping_mod`` on the nodes (empty when DP is off)."""
    return {KEY_CLIPPING_NORM: float(cfg.privacy.clipping_norm)} if cfg.privacy.clipping_norm > 0 else {}


def noise_std(cfg: RunConfig) -> float:
    """Flower's ``compute_stdv``: ``noise_multiplier * clipping_norm / sampled clients``."""
    n_sampled = max(1, round(cfg.client_fraction * cfg.num_clients))
    return compute_stdv(cfg.privacy.noise_multiplier, cfg.privacy.clipping_norm, n_sampled)


def with_privacy(strategy: Strategy, cfg: RunConfig) -> Strategy:
    """``strategy`` whose ``aggregate`` adds seeded Gaussian noise (unchanged when ``noise_multiplier`` is 0).

    Built as a subclass of the strategy's own class with the noise settings as class attributes, so the instance
    attributes (the strategy's server state, which checkpoints save and restore) stay exactly the strategy's.
    """
    if cfg.privacy.noise_multiplier <= 0:
        return strategy
    base = type(strategy)

    class Noisy(base):  # type: ignore[misc, valid-type]
        std = noise_std(cfg)
        seed = cfg.seed

        def aggregate(
            self, server_round: int, current: dict[str, torch.Tensor], updates: Sequence[ClientUpdate]
        ) -> dict[str, torch.Tensor]:
            new = super().aggregate(server_round, current, updates)
            if not updates:
                return new
            gen = torch.Generator().manual_seed(derive_seed(self.seed, server_round, NOISE_STREAM))
            return {k: v + self.std * torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in new.items()}

    Noisy.__name__ = Noisy.__qualname__ = f"Noisy{base.__name__}"
    noisy = copy.copy(strategy)
    noisy.__class__ = Noisy
    return noisy
