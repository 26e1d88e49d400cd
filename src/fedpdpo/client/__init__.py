"""Client side: local training and evaluation (engine-independent) and the client's private state store."""

from fedpdpo.client.state import ClientState, ClientStore
from fedpdpo.client.trainer import FitResult, evaluate, fit
from fedpdpo.data.task import ClientTask, build_task

__all__ = ["ClientState", "ClientStore", "ClientTask", "FitResult", "build_task", "evaluate", "fit"]
