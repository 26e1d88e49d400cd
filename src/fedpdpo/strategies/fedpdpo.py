"""FedPDPO: federated personalized DPO.

Shared: the LoRA adapter (FedAvg, sample-weighted). Local, never sent: personalized LM head, explicit reward head,
bottleneck adapter. Objective ``L = L_DPO + lambda * L_BT``; evaluation ranks pairs by
``beta * h + alpha * (r_w - r_l)``. See docs/method.md.
"""

from __future__ import annotations

from fedpdpo.config import RunConfig
from fedpdpo.instructions import PERSONAL_FIRST_STEPS, Instructions
from fedpdpo.strategies.base import Strategy


class FedPDPO(Strategy):
    name = "fedpdpo"
    reference = "FedPDPO: federated personalized direct preference optimization (this package, docs/method.md)"

    def __init__(self, personal_first_steps: int = 0) -> None:
        self.personal_first_steps = personal_first_steps

    @classmethod
    def from_config(cls, cfg: RunConfig) -> FedPDPO:
        return cls(personal_first_steps=cfg.method.personal_first_steps)

    def fit_instructions(self, server_round: int) -> Instructions:
        """``personal-first-steps`` when set: the local modules first fit the global LoRA they will be evaluated
        with (after the previous aggregation), then everything trains jointly (docs/method.md)."""
        return {PERSONAL_FIRST_STEPS: self.personal_first_steps} if self.personal_first_steps else {}
