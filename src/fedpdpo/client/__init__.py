"""Client side: local training and evaluation (engine-independent) and the client's private state store."""

from fedpdpo.client.state import ClientState, ClientStore
from fedpdpo.client.trainer import ClientTask, FitResult, evaluate, fit

__all__ = ["ClientState", "ClientStore", "ClientTask", "FitResult", "evaluate", "fit"]
