"""FedPer-DPO (Arivazhagan et al. 2019, https://arxiv.org/abs/1912.00818): shared base, personal head.

The base (frozen backbone + LoRA) is FedAvg-aggregated; each client's output head (a copy of the LM head, trained
with ``method.local_lr_scale``) never leaves it. DPO objective only, no explicit reward head or adapter; pairs are
ranked by the implicit reward of the personalized policy. This is FedPDPO minus reward head and adapter.
"""

from __future__ import annotations

from fedpdpo.config import RunConfig
from fedpdpo.strategies.base import Strategy
from fedpdpo.strategies.fedavg import without_local_modules


class FedPer(Strategy):
    name = "fedper"
    reference = "https://arxiv.org/abs/1912.00818"

    def configure(self, cfg: RunConfig) -> RunConfig:
        cfg = without_local_modules(super().configure(cfg))
        cfg.method.personal_head = True
        return cfg
