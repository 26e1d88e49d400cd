"""Server-side adaptive optimizers on the shared LoRA: FedAdam and FedYogi (Reddi et al. 2021,
https://arxiv.org/abs/2003.00295).

The server treats the FedAvg average as a pseudo-gradient and steps an optimizer whose state lives here:

    Delta_t = sum_k n_k/n * x_k - x_{t-1}
    m_t     = beta1 * m_{t-1} + (1 - beta1) * Delta_t
    v_t     = beta2 * v_{t-1} + (1 - beta2) * Delta_t^2                               (Adam)
    v_t     = v_{t-1} - (1 - beta2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2)           (Yogi)
    x_t     = x_{t-1} + eta_t * m_t / (sqrt(v_t) + tau)

with ``m_0 = v_0 = 0``. Exactly Flower's ``flwr.serverapp.strategy.FedAdam``/``FedYogi`` (flwr 1.42), including
FedAdam's bias correction ``eta_t = eta * sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1))`` (FedYogi: ``eta_t = eta``);
``tests/test_strategies.py`` checks the numbers against Flower's classes. Computed in float64.

``eta`` is smaller than Flower's default 0.1: the server step is about ``eta`` per element, and LoRA entries are of
order 1e-2, so 0.1 destroys the adapter in one round. These values are not tuned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from fedpdpo.strategies.base import ClientUpdate, weighted_average
from fedpdpo.strategies.fedavg import FedAvg


class FedAdam(FedAvg):
    name = "fedadam"
    reference = "https://arxiv.org/abs/2003.00295"

    def __init__(self, eta: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        self.eta, self.beta1, self.beta2, self.tau = eta, beta1, beta2, tau
        self.m: dict[str, torch.Tensor] = {}  # server optimizer state, one run per strategy instance
        self.v: dict[str, torch.Tensor] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.m, self.v = dict(state["m"]), dict(state["v"])

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * delta**2

    def step_size(self, server_round: int) -> float:
        return self.eta * math.sqrt(1 - self.beta2 ** (server_round + 1)) / (1 - self.beta1 ** (server_round + 1))

    def aggregate(
        self, server_round: int, current: dict[str, torch.Tensor], updates: Sequence[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        if not updates:
            return current
        average = weighted_average(updates)
        eta_t = self.step_size(server_round)
        out = {}
        for name, x in current.items():
            x64 = x.to(torch.float64)
            delta = average[name].to(torch.float64) - x64
            m = self.beta1 * self.m.get(name, torch.zeros_like(delta)) + (1 - self.beta1) * delta
            v = self.second_moment(self.v.get(name, torch.zeros_like(delta)), delta)
            self.m[name], self.v[name] = m, v
            out[name] = (x64 + eta_t * m / (v.sqrt() + self.tau)).to(x.dtype)
        return out


class FedYogi(FedAdam):
    name = "fedyogi"
    reference = "https://arxiv.org/abs/2003.00295"

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta2) * delta**2 * torch.sign(v - delta**2)

    def step_size(self, server_round: int) -> float:
        return self.eta
