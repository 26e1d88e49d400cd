"""DPO, the explicit-reward Bradley-Terry loss, and the FedPDPO objective (formulas in docs/method.md).

Notation for one pair (x, y_w, y_l): ``h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]``.

* DPO (sigmoid, Rafailov et al. 2023) with label smoothing eps (cDPO):
  ``L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``
* IPO (Azar et al. 2023): ``L = (h - 1 / (2 beta))^2``
* DPOP (Pal et al. 2024, "DPO-Positive"): ``h`` above becomes ``h - mu * max(0, log pi_ref(y_w) - log pi(y_w))``
  (``mu = method.dpop_lambda``), so a step that lowers the chosen side below the reference is penalised inside the
  loss; the margins that rank pairs stay ``beta * h``
* explicit reward (Bradley-Terry): ``L_r = -log sigmoid(r(x, y_w) - r(x, y_l))``
* RPO (Pang et al. 2024; TRL's ``rpo_alpha``): ``L_NLL = -sum log pi(y_w) / |y_w|`` over the batch's chosen tokens
  (with ``rpo_scope = "local"`` its gradient reaches the client's local tensors only)
* FedPDPO: ``L = L_DPO + lambda * L_r (+ rho * L_NLL when method.rpo_alpha = rho > 0)
  (+ gamma * L_DPO of the global policy, when method.global_weight = gamma > 0)``

Metric names follow TRL's DPOTrainer: ``rewards/chosen`` is ``beta * (log pi - log pi_ref)`` of the chosen side.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.nn import functional as F


def read_scalars(values: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The 0-dim tensors ``values`` as floats, in one device-to-host copy: on a GPU each ``.item()`` makes the host
    wait until the device's queue is empty, so a step that read its ten metrics one by one would stall ten times."""
    if not values:
        return {}
    flat = torch.stack([v.detach().reshape(()).float() for v in values.values()]).tolist()
    return dict(zip(values, flat, strict=True))


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, what is back-propagated
    values: dict[str, torch.Tensor]  # the metrics as detached 0-dim tensors, still on the loss's device
    margins: torch.Tensor  # [B] implicit reward margins beta * h per pair (detached): what evaluation ranks by
    # A term of the objective whose gradient goes to the client's local tensors only (the NLL with
    # rpo_scope = "local"): the trainer back-propagates it with ``inputs=`` those tensors; not part of ``loss``.
    local_loss: torch.Tensor | None = None

    @property
    def metrics(self) -> dict[str, float]:
        """The metrics as floats (TRL's names), read in one copy (:func:`read_scalars`)."""
        return read_scalars(self.values)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    dpop_lambda: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the implicit rewards ``beta * log(pi / pi_ref)`` of both sides. ``dpop_lambda`` > 0
    subtracts DPOP's penalty on the chosen side's fall below the reference from ``h`` inside the loss only."""
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    h = chosen_logratio - rejected_logratio
    if dpop_lambda > 0:
        h = h - dpop_lambda * (-chosen_logratio).clamp_min(0)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r} (use 'sigmoid' or 'ipo')")
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def reward_bt_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair Bradley-Terry loss of the explicit reward head."""
    return -F.logsigmoid(reward_chosen - reward_rejected)


def pairwise_correct(margin: torch.Tensor) -> torch.Tensor:
    """Per pair, 1 when ranked correctly, 0 when not, and 0.5 for a tie (margin exactly 0), like a coin flip."""
    return (margin > 0).float() + 0.5 * (margin == 0).float()


def pairwise_accuracy(margin: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs ranked correctly (:func:`pairwise_correct`'s mean)."""
    return pairwise_correct(margin).mean()


def fedpdpo_objective(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor | None,
    beta: float,
    reward_weight: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    global_logps: torch.Tensor | None = None,
    global_weight: float = 0.0,
    n_tokens: torch.Tensor | None = None,
    rpo_alpha: float = 0.0,
    rpo_scope: str = "all",
    dpop_lambda: float = 0.0,
) -> LossOutput:
    """The FedPDPO loss for a batch laid out as [chosen..., rejected...] (see ``PairBatch``); ``global_logps`` are
    the log-probs of the global policy (shared tensors, no local modules), whose DPO loss is added with weight
    ``global_weight``; ``n_tokens`` (response tokens per sequence) gives the chosen side's per-token negative
    log-likelihood, added with weight ``rpo_alpha``: DPO alone can lower the likelihood of both sides and let a
    policy that ranks pairs well generate degenerate text; the NLL keeps it generating the client's chosen kind.
    With ``rpo_scope = "local"`` the NLL is returned as ``local_loss`` instead of being added to ``loss``.
    ``dpop_lambda``: DPOP's weight (module docstring), for the client's DPO term and the global policy's alike."""
    b = policy_logps.shape[0] // 2
    local_loss = None
    losses, r_chosen, r_rejected = dpo_loss(
        policy_logps[:b], policy_logps[b:], ref_logps[:b], ref_logps[b:], beta, loss_type, label_smoothing, dpop_lambda
    )
    loss = losses.mean()
    margins = r_chosen - r_rejected
    metrics: dict[str, torch.Tensor] = {
        "loss/dpo": loss.detach(),
        "rewards/chosen": r_chosen.mean(),
        "rewards/rejected": r_rejected.mean(),
        "rewards/margins": margins.mean(),
        "rewards/accuracies": pairwise_accuracy(margins),
        "logps/chosen": policy_logps[:b].detach().mean(),
        "logps/rejected": policy_logps[b:].detach().mean(),
    }
    if dpop_lambda > 0:  # nats per chosen response below the reference: what DPOP's term penalises
        metrics["dpop/chosen_drop"] = (ref_logps[:b] - policy_logps[:b].detach()).clamp_min(0).mean()
    if rewards is not None and reward_weight > 0:
        rm_loss = reward_bt_loss(rewards[:b], rewards[b:]).mean()
        loss = loss + reward_weight * rm_loss
        explicit_margin = (rewards[:b] - rewards[b:]).detach()
        metrics["loss/reward"] = rm_loss.detach()
        metrics["explicit/margins"] = explicit_margin.mean()
        metrics["explicit/accuracies"] = pairwise_accuracy(explicit_margin)
    if n_tokens is not None and rpo_alpha > 0:
        nll = -policy_logps[:b].sum() / n_tokens[:b].sum().clamp_min(1)
        if rpo_scope == "local":
            local_loss = rpo_alpha * nll
        else:
            loss = loss + rpo_alpha * nll
        metrics["loss/nll"] = nll.detach()
    if global_logps is not None and global_weight > 0:
        g_losses, g_chosen, g_rejected = dpo_loss(
            global_logps[:b],
            global_logps[b:],
            ref_logps[:b],
            ref_logps[b:],
            beta,
            loss_type,
            label_smoothing,
            dpop_lambda,
        )
        loss = loss + global_weight * g_losses.mean()
        metrics["loss/global"] = g_losses.mean().detach()
        metrics["global/accuracies"] = pairwise_accuracy(g_chosen - g_rejected)
    metrics["loss"] = (loss if local_loss is None else loss + local_loss).detach()
    return LossOutput(loss, metrics, margins, local_loss)
