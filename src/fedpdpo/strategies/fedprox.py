"""FedProx-DPO (Li et al. 2020, https://arxiv.org/abs/1812.06127): FedAvg plus a proximal term on the client.

Client objective: ``L_DPO(w) + mu/2 * ||w - w_global||^2`` over the shared LoRA tensors, which limits client drift
under heterogeneous data. Server side is plain sample-weighted FedAvg. As Flower's FedProx does, the server sends
``mu`` to the clients with every round's instructions (``proximal-mu``) and the trainer adds the term. ``mu`` is
``method.proximal_mu`` from the config, :attr:`FedProx.default_mu` when the config leaves it at 0.
"""

from __future__ import annotations

from fedpdpo.config import RunConfig
from fedpdpo.instructions import PROXIMAL_MU, Instructions
from fedpdpo.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    name = "fedprox"
    reference = "https://arxiv.org/abs/1812.06127"
    default_mu = 0.01

    def __init__(self, proximal_mu: float = default_mu) -> None:
        self.proximal_mu = proximal_mu

    @classmethod
    def from_config(cls, cfg: RunConfig) -> FedProx:
        return cls(proximal_mu=cfg.method.proximal_mu if cfg.method.proximal_mu > 0 else cls.default_mu)

    def fit_instructions(self, server_round: int) -> Instructions:
        return {PROXIMAL_MU: self.proximal_mu}
