"""FedPDPO ablations: the full method with exactly one component removed (same sharing: the LoRA only).

* ``fedpdpo-no-head``: no personalized LM head (the policy uses the frozen original head).
* ``fedpdpo-no-reward``: no explicit reward head and no Bradley-Terry loss; ranked by the implicit reward.
* ``fedpdpo-no-adapter``: no gated bottleneck adapter.
* ``fedpdpo-implicit-eval``: trained exactly like FedPDPO, but pairs are ranked by the implicit DPO reward only,
  which isolates what the explicit reward contributes at evaluation time.
"""

from __future__ import annotations

from fedpdpo.config import RunConfig
from fedpdpo.strategies.fedpdpo import FedPDPO


class FedPDPONoHead(FedPDPO):
    name = "fedpdpo-no-head"
    reference = "FedPDPO ablation: without the personalized head"

    def configure(self, cfg: RunConfig) -> RunConfig:
        cfg = super().configure(cfg)
        cfg.method.personal_head = False
        return cfg


class FedPDPONoReward(FedPDPO):
    name = "fedpdpo-no-reward"
    reference = "FedPDPO ablation: without the explicit reward head"

    def configure(self, cfg: RunConfig) -> RunConfig:
        cfg = super().configure(cfg)
        cfg.method.reward_head = False
        if cfg.method.eval_score in ("explicit", "combined"):  # no reward head to score with
            cfg.method.eval_score = "auto"
        return cfg


class FedPDPONoAdapter(FedPDPO):
    name = "fedpdpo-no-adapter"
    reference = "FedPDPO ablation: without the bottleneck adapter"

    def configure(self, cfg: RunConfig) -> RunConfig:
        cfg = super().configure(cfg)
        cfg.method.adapter = False
        return cfg


class FedPDPOImplicitEval(FedPDPO):
    name = "fedpdpo-implicit-eval"
    reference = "FedPDPO ablation: implicit reward only at evaluation"

    def configure(self, cfg: RunConfig) -> RunConfig:
        cfg = super().configure(cfg)
        cfg.method.eval_score = "implicit"
        return cfg
