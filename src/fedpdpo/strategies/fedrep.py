"""FedRep-DPO (Collins et al. 2021, https://arxiv.org/abs/2102.07078): shared representation, personal head,
trained in alternation.

Each round the client first updates only its personal head with the representation (LoRA) frozen, for
``head_steps`` steps, then only the representation with the head frozen, for the remaining
``local_steps - head_steps`` steps; only the representation is sent and FedAvg-aggregated. The server sends
``head_steps`` with every round's instructions (``head-steps``) and the trainer does the phase switch (it drops the
gradients of the frozen group). ``method.head_steps`` left at 0 in the config means half of the local steps (the
paper uses many head epochs per body epoch; our total step budget stays that of the others).
"""

from __future__ import annotations

from fedpdpo.config import RunConfig
from fedpdpo.errors import ConfigError
from fedpdpo.instructions import HEAD_STEPS, Instructions
from fedpdpo.strategies.fedper import FedPer


class FedRep(FedPer):
    name = "fedrep"
    reference = "https://arxiv.org/abs/2102.07078"

    def __init__(self, head_steps: int = 1) -> None:
        self.head_steps = head_steps

    @classmethod
    def from_config(cls, cfg: RunConfig) -> FedRep:
        head_steps = cfg.method.head_steps if cfg.method.head_steps > 0 else max(1, cfg.local_steps // 2)
        if head_steps >= cfg.local_steps:
            raise ConfigError(
                f"config key 'method.head_steps' ({head_steps}) must be smaller than 'local_steps' "
                f"({cfg.local_steps}) for fedrep, or the shared representation never trains"
            )
        return cls(head_steps=head_steps)

    def fit_instructions(self, server_round: int) -> Instructions:
        return {HEAD_STEPS: self.head_steps}
