"""Federated algorithms: FedPDPO and baselines, each a small :class:`Strategy` class."""

from __future__ import annotations

from fedpdpo.errors import ConfigError
from fedpdpo.strategies.base import ClientUpdate, Strategy, weighted_average
from fedpdpo.strategies.fedavg import FedAvg
from fedpdpo.strategies.fedpdpo import FedPDPO

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedPDPO, FedAvg)}


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ConfigError(
            f"config key 'algorithm': unknown algorithm {name!r}; choose one of {', '.join(sorted(STRATEGIES))}"
        ) from None


__all__ = ["STRATEGIES", "ClientUpdate", "Strategy", "get_strategy", "weighted_average"]
