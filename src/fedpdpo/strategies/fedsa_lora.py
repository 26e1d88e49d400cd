"""FedSA-LoRA (Guo et al. 2025, https://arxiv.org/abs/2410.01463): share LoRA's A matrices, keep B local.

The paper finds A learns general knowledge and B client-specific knowledge, so only ``lora_A`` tensors are
FedAvg-aggregated; each client's ``lora_B`` stays in its private state (trained at the full learning rate). LoRA
only, DPO objective, implicit-reward evaluation. Communication is half of FedAvg's for square-ish targets.
"""

from __future__ import annotations

from fedpdpo.config import RunConfig
from fedpdpo.model.naming import is_lora_a
from fedpdpo.strategies.base import Strategy
from fedpdpo.strategies.fedavg import without_local_modules


class FedSALoRA(Strategy):
    name = "fedsa-lora"
    reference = "https://arxiv.org/abs/2410.01463"

    def configure(self, cfg: RunConfig) -> RunConfig:
        return without_local_modules(super().configure(cfg))

    def is_shared(self, name: str) -> bool:
        return is_lora_a(name)
