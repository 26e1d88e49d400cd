"""fedpdpo: federated, personalized preference alignment of LLMs (FedPDPO)."""

from fedpdpo.errors import ConfigError, DataError, FedPDPOError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "FedPDPOError", "__version__"]
