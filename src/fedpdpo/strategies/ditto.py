"""Ditto-DPO (Li et al. 2021, https://arxiv.org/abs/2012.04221): a global model plus a regularised personal one.

Each round a client (1) trains the global shared LoRA with plain DPO for ``local_steps`` steps and sends it, as in
FedAvg, then (2) trains its *personal* copy ``v_k`` of the LoRA for another ``local_steps`` steps on

    L_DPO(v_k) + lambda/2 * ||v_k - w_global||^2

where ``w_global`` is the global LoRA it received this round. ``v_k`` never leaves the client; the client is
evaluated with it. The server sends ``lambda`` with every round's instructions (``ditto-lambda``); it is
``method.ditto_lambda`` from the config, :attr:`Ditto.default_lambda` when the config leaves it at 0. Like the
paper, a Ditto client does twice the local steps of FedAvg per round; the clients report the steps they ran
(``summary.json``) and comparison reports flag the different step budget.
"""

from __future__ import annotations

from fedpdpo.config import RunConfig
from fedpdpo.instructions import DITTO_LAMBDA, Instructions
from fedpdpo.strategies.fedavg import FedAvg


class Ditto(FedAvg):
    name = "ditto"
    reference = "https://arxiv.org/abs/2012.04221"
    default_lambda = 0.1

    def __init__(self, ditto_lambda: float = default_lambda) -> None:
        self.ditto_lambda = ditto_lambda

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Ditto:
        return cls(ditto_lambda=cfg.method.ditto_lambda if cfg.method.ditto_lambda > 0 else cls.default_lambda)

    def fit_instructions(self, server_round: int) -> Instructions:
        return {DITTO_LAMBDA: self.ditto_lambda}
