"""Ditto-DPO (Li et al. 2021, https://arxiv.org/abs/2012.04221): a global model plus a regularised personal one.

Each round a client (1) trains the global shared LoRA with plain DPO for ``local_steps`` steps and sends it, as in
FedAvg, then (2) trains its *personal* copy ``v_k`` of the LoRA for another ``local_steps`` steps on

    L_DPO(v_k) + lambda/2 * ||v_k - w_global||^2

where ``w_global`` is the global LoRA it received this round. ``v_k`` never leaves the client; the client is
evaluated with it. ``lambda`` comes from ``method.ditto_lambda`` (default 0.1 when the config leaves it at 0).
Like the paper, a Ditto client does twice the local steps of FedAvg per round; comparison reports flag the
different step budget.
"""

from __future__ import annotations

from fedpdpo.config import RunConfig
from fedpdpo.strategies.fedavg import FedAvg


class Ditto(FedAvg):
    name = "ditto"
    reference = "https://arxiv.org/abs/2012.04221"
    default_lambda = 0.1

    def configure(self, cfg: RunConfig) -> RunConfig:
        cfg = super().configure(cfg)
        if cfg.method.ditto_lambda <= 0:
            cfg.method.ditto_lambda = self.default_lambda
        return cfg
