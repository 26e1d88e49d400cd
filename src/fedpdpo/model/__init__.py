"""Backbone loading, the shared LoRA, and the per-client modules."""

from fedpdpo.model.backbone import load_backbone, resolve_model
from fedpdpo.model.modules import BottleneckAdapter, PersonalHead, RewardHead
from fedpdpo.model.policy import FedPDPOModel, PolicyOutput

__all__ = [
    "BottleneckAdapter",
    "FedPDPOModel",
    "PersonalHead",
    "PolicyOutput",
    "RewardHead",
    "load_backbone",
    "resolve_model",
]
