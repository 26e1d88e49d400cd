"""fedpdpo: federated, personalized preference alignment of LLMs (FedPDPO)."""

from __future__ import annotations

from typing import Any

from fedpdpo.errors import ConfigError, DataError, FedPDPOError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "FedPDPOError", "__version__", "load_personalized"]


def __getattr__(name: str) -> Any:
    # ``fedpdpo.load_personalized`` imports torch/transformers only when used, so ``import fedpdpo`` stays cheap
    if name == "load_personalized":
        from fedpdpo.export import load_personalized

        return load_personalized
    raise AttributeError(f"module 'fedpdpo' has no attribute {name!r}")
