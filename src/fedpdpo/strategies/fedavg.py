"""FedAvg-DPO: the shared LoRA trained with plain DPO, no local modules (McMahan et al. 2017 + Rafailov et al. 2023).

Every client evaluates the same global model, ranking pairs by DPO's implicit reward.
"""

from __future__ import annotations

from fedpdpo.config import RunConfig
from fedpdpo.strategies.base import Strategy


def without_local_modules(cfg: RunConfig) -> RunConfig:
    cfg.method.personal_head = False
    cfg.method.reward_head = False
    cfg.method.adapter = False
    cfg.method.lora_gate = False
    if cfg.method.eval_score in ("explicit", "combined"):  # no reward head to score with
        cfg.method.eval_score = "auto"
    return cfg


class FedAvg(Strategy):
    name = "fedavg"
    reference = "https://arxiv.org/abs/1602.05629"

    def configure(self, cfg: RunConfig) -> RunConfig:
        return without_local_modules(super().configure(cfg))
