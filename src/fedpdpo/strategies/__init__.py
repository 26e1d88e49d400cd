"""Federated algorithms: FedPDPO and baselines, each a small :class:`Strategy` class."""

from __future__ import annotations

from fedpdpo.config import RunConfig
from fedpdpo.errors import ConfigError
from fedpdpo.strategies.ablations import FedPDPOImplicitEval, FedPDPONoAdapter, FedPDPONoHead, FedPDPONoReward
from fedpdpo.strategies.base import ClientUpdate, Strategy, weighted_average
from fedpdpo.strategies.centralized import Centralized
from fedpdpo.strategies.ditto import Ditto
from fedpdpo.strategies.fedavg import FedAvg
from fedpdpo.strategies.fedopt import FedAdam, FedYogi
from fedpdpo.strategies.fedpdpo import FedPDPO
from fedpdpo.strategies.fedper import FedPer
from fedpdpo.strategies.fedprox import FedProx
from fedpdpo.strategies.fedrep import FedRep
from fedpdpo.strategies.fedsa_lora import FedSALoRA
from fedpdpo.strategies.lg_fedavg import LGFedAvg
from fedpdpo.strategies.local import LocalOnly

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FedPDPO,
        FedAvg,
        LocalOnly,
        Centralized,
        FedProx,
        FedAdam,
        FedYogi,
        FedPer,
        FedRep,
        Ditto,
        FedSALoRA,
        LGFedAvg,
        FedPDPONoHead,
        FedPDPONoReward,
        FedPDPONoAdapter,
        FedPDPOImplicitEval,
    )
}


def get_strategy(name: str, cfg: RunConfig | None = None) -> Strategy:
    """The strategy ``name`` with the parameters ``cfg`` sets for it (its defaults without ``cfg``)."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ConfigError(
            f"config key 'algorithm': unknown algorithm {name!r}; choose one of {', '.join(sorted(STRATEGIES))}"
        ) from None
    return cls() if cfg is None else cls.from_config(cfg)


__all__ = ["STRATEGIES", "ClientUpdate", "Strategy", "get_strategy", "weighted_average"]
