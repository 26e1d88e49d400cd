"""fedpdpo: federated, personalized preference alignment of LLMs (FedPDPO).

The Python API (docs/api.md)::

    import fedpdpo

    summary = fedpdpo.run("configs/tiny.toml", out="runs/tiny", data=records)   # config: path, dict or RunConfig
    comparison = fedpdpo.compare("configs/tiny.toml", ["fedpdpo", "fedavg"], out="runs/cmp", seeds=[0, 1])
    fedpdpo.export_client("runs/tiny", 0, "runs/tiny-client0", save_base=True)
    client = fedpdpo.load_personalized("runs/tiny-client0")

``import fedpdpo`` stays cheap: torch, transformers and the rest load when a function is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from fedpdpo.errors import ConfigError, DataError, FedPDPOError

__version__ = "0.1.0"

#: Public name -> the module that defines it (imported on first use).
_LAZY = {
    "run": "fedpdpo.api",
    "resume": "fedpdpo.api",
    "compare": "fedpdpo.api",
    "export_client": "fedpdpo.export",
    "load_personalized": "fedpdpo.export",
    "load_config": "fedpdpo.config",
    "RunConfig": "fedpdpo.config",
}

__all__ = ["ConfigError", "DataError", "FedPDPOError", "__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedpdpo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
