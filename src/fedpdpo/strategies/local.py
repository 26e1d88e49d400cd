"""Local-only DPO: every client trains its own LoRA on its own data and never communicates (lower reference).

Same model as FedAvg-DPO (LoRA, no local modules, implicit-reward evaluation), so ``fedavg - local`` is the value of
federation itself. Nothing is shared: ``is_shared`` is always false, so the trainer keeps each client's LoRA in its
private state and the server has nothing to aggregate (0 bytes communicated).
"""

from __future__ import annotations

from fedpdpo.config import RunConfig
from fedpdpo.strategies.base import Strategy
from fedpdpo.strategies.fedavg import without_local_modules


class LocalOnly(Strategy):
    name = "local"
    reference = "local training baseline (no communication)"

    def configure(self, cfg: RunConfig) -> RunConfig:
        return without_local_modules(super().configure(cfg))

    def is_shared(self, name: str) -> bool:
        return False
