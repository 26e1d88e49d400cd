"""FedPDPO: federated personalized DPO.

Shared: the LoRA adapter (FedAvg, sample-weighted). Local, never sent: personalized LM head, explicit reward head,
bottleneck adapter. Objective ``L = L_DPO + lambda * L_BT``; evaluation ranks pairs by
``beta * h + alpha * (r_w - r_l)``. See docs/method.md.
"""

from __future__ import annotations

from fedpdpo.strategies.base import Strategy


class FedPDPO(Strategy):
    name = "fedpdpo"
    reference = "FedPDPO: federated personalized direct preference optimization (this package, docs/method.md)"
