"""The per-client (local) modules of FedPDPO. None of them ever leaves its client."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class BottleneckAdapter(nn.Module):
    """Gated bottleneck on the final hidden state: ``h' = h + sigmoid(g) * W_up(gelu(W_down(h)))``.

    ``h`` carries the global features (frozen backbone + shared LoRA); the bottleneck learns client-local features
    and the learned gate ``g`` decides how much of them to mix in. ``W_up`` starts at zero so the adapter starts as
    the identity: round-0 behaviour is exactly the global model.
    """

    def __init__(self, hidden_size: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, hidden_size)
        self.gate = nn.Parameter(torch.zeros(1))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + torch.sigmoid(self.gate) * self.up(F.gelu(self.down(hidden)))


class RewardHead(nn.Module):
    """Explicit reward ``r(x, y) = w^T pool(h) + b`` over the response's final hidden states.

    A linear score head, as in reward models (``AutoModelForSequenceClassification``); initialised to zero so that
    all rewards start equal (no preference before training).
    """

    def __init__(self, hidden_size: int, pooling: str = "mean") -> None:
        super().__init__()
        self.pooling = pooling
        self.score = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, hidden: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """``hidden`` [N, L, H], ``response_mask`` [N, L] -> rewards [N]."""
        mask = response_mask.to(hidden.dtype).unsqueeze(-1)
        if self.pooling == "mean":
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        else:  # last response token
            last = response_mask.long().cumsum(1).argmax(1)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.score(pooled).squeeze(-1)


class PersonalHead(nn.Module):
    """The client's own output head, initialised as a copy of the backbone's (untied from the embeddings)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())


class LoraGate(nn.Module):
    """The client's scale of each shared LoRA update: layer m computes ``W_m x + g_m * s * B_m A_m x``.

    One scalar per adapted module, all starting at 1 (the shared LoRA as aggregated). The shared ``A, B`` carry the
    direction most clients pull in; a client that disagrees can shrink it (g -> 0: the frozen backbone there) or turn
    it around (g < 0) for its own policy, and then its DPO gradient on ``A, B`` (scaled by g) points the way the
    others' does. :class:`~fedpdpo.model.policy.FedPDPOModel` applies it with forward hooks on PEFT's ``lora_B``.
    """

    def __init__(self, num_modules: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_modules))
