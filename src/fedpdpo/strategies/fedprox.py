"""FedProx-DPO (Li et al. 2020, https://arxiv.org/abs/1812.06127): FedAvg plus a proximal term on the client.

Client objective: ``L_DPO(w) + mu/2 * ||w - w_global||^2`` over the shared LoRA tensors, which limits client drift
under heterogeneous data. Server side is plain sample-weighted FedAvg. ``mu`` comes from ``method.proximal_mu``;
when the config leaves it at 0 this strategy uses :attr:`FedProx.default_mu` (Flower's FedProx sends the same
value to clients as ``proximal-mu``; the trainer adds the term).
"""

from __future__ import annotations

from fedpdpo.config import RunConfig
from fedpdpo.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    name = "fedprox"
    reference = "https://arxiv.org/abs/1812.06127"
    default_mu = 0.01

    def configure(self, cfg: RunConfig) -> RunConfig:
        cfg = super().configure(cfg)
        if cfg.method.proximal_mu <= 0:
            cfg.method.proximal_mu = self.default_mu
        return cfg
