"""LG-FedAvg (Liang et al. 2020, https://arxiv.org/abs/2001.01523): local representations, global top layers.

LG-FedAvg keeps the lower layers (the representation) on each client and federates the top layers. On a LoRA
model the trainable layers are the LoRA'd transformer blocks: the LoRA tensors of the lower half of them (by layer
index) stay local, the upper half is FedAvg-aggregated. LoRA only, DPO objective, implicit-reward evaluation.

Which layers are "upper" depends on the model, so the split is fixed in :meth:`shared_names` (called once with
the model's trainable names when a run is set up); :meth:`is_shared` answers from that split.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedpdpo.config import RunConfig
from fedpdpo.model.naming import is_lora, layer_of, lora_names
from fedpdpo.strategies.base import Strategy
from fedpdpo.strategies.fedavg import without_local_modules


class LGFedAvg(Strategy):
    name = "lg-fedavg"
    reference = "https://arxiv.org/abs/2001.01523"

    def __init__(self) -> None:
        self.global_layers: set[int] | None = None

    def configure(self, cfg: RunConfig) -> RunConfig:
        return without_local_modules(super().configure(cfg))

    def shared_names(self, trainable: Sequence[str]) -> list[str]:
        layers = sorted({layer for n in lora_names(trainable) if (layer := layer_of(n)) is not None})
        self.global_layers = set(layers[len(layers) // 2 :])
        return [n for n in trainable if self.is_shared(n)]

    def is_shared(self, name: str) -> bool:
        if self.global_layers is None:
            raise RuntimeError("lg-fedavg: call shared_names(model trainable names) before is_shared")
        return is_lora(name) and layer_of(name) in self.global_layers
