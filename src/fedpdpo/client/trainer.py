"""Local training and evaluation of one client: the algorithm core that every engine calls unchanged.

``fit`` and ``evaluate`` are plain functions of (model, client data, client state, shared tensors, config); they
know nothing about Flower, Ray or the run directory. All randomness in a round is derived from
``(seed, round, client_id)``, so the result does not depend on which engine runs the client, in which order, or
after a restart.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fedpdpo.client.state import ClientState
from fedpdpo.config import RunConfig
from fedpdpo.data.tokenize import PairBatch, TokenizedPair, collate, length_bucketed_batches
from fedpdpo.losses import dpo_loss, fedpdpo_objective, pairwise_accuracy
from fedpdpo.model.policy import FedPDPOModel


@dataclass
class ClientTask:
    """One client's tokenized data, ready for training and evaluation."""

    client_id: int
    train: list[TokenizedPair]
    test: list[TokenizedPair]
    pad_id: int


@dataclass
class FitResult:
    shared: dict[str, torch.Tensor]  # updated shared tensors: the only thing sent to the server
    num_examples: int
    metrics: dict[str, float]
    state: ClientState = field(repr=False)  # stays on the client


def derive_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (no Python ``hash`` randomisation)."""
    value = 0x9E3779B97F4A7C15
    for p in parts:
        value = (value * 6364136223846793005 + int(p) + 1442695040888963407) % (1 << 63)
    return value


def device_of(cfg: RunConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (fp16 where bf16 is unsupported); fp32 on CPU, the fast path there."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _batches(pairs: list[TokenizedPair], batch_size: int, pad_id: int, device: torch.device):
    for chunk in length_bucketed_batches(pairs, batch_size):
        yield collate(chunk, pad_id).to(device)


@torch.no_grad()
def _fill_reference(
    model: FedPDPOModel, pairs: list[TokenizedPair], table: torch.Tensor, cfg: RunConfig, pad_id: int
) -> None:
    """Write the reference log-probs (chosen, rejected) of ``pairs`` into rows ``pair.index`` of ``table``."""
    device = device_of(cfg)
    with autocast(device):
        for batch in _batches(pairs, cfg.eval_batch_size, pad_id, device):
            ref = model.reference_logps(batch, cfg.perf).float().cpu()
            b = batch.num_pairs
            table[batch.index.cpu(), 0] = ref[:b]
            table[batch.index.cpu(), 1] = ref[b:]


def reference_logps(model: FedPDPOModel, pairs: list[TokenizedPair], cfg: RunConfig, pad_id: int) -> torch.Tensor:
    """``[n, 2]`` reference log-probs (chosen, rejected) of every pair."""
    out = torch.zeros(len(pairs), 2, dtype=torch.float32)
    _fill_reference(model, pairs, out, cfg, pad_id)
    return out


def reference_table(state: ClientState, split: str, n: int) -> torch.Tensor:
    """The cached ``[n, 2]`` reference table of a split; rows not computed yet are NaN."""
    table = state.reference.get(split)
    if table is None or table.shape[0] != n:
        table = state.reference[split] = torch.full((n, 2), float("nan"))
    return table


def ensure_reference(
    model: FedPDPOModel, task: ClientTask, state: ClientState, cfg: RunConfig, splits=("train", "test")
) -> None:
    """Fill the missing rows of the reference cache: the reference is frozen, so each pair is computed once."""
    for split in splits:
        pairs = task.train if split == "train" else task.test
        table = reference_table(state, split, len(pairs))
        missing = torch.isnan(table).any(1).nonzero().flatten().tolist()
        if missing:
            _fill_reference(model, [pairs[i] for i in missing], table, cfg, task.pad_id)


def _store_reference(batch: PairBatch, ref: torch.Tensor, table: torch.Tensor) -> None:
    """Cache reference log-probs computed inside a training step (only rows still missing)."""
    idx = batch.index.cpu()
    b = idx.shape[0]
    rows = torch.stack([ref[:b], ref[b:]], 1).detach().float().cpu()
    missing = torch.isnan(table[idx]).any(1)
    table[idx[missing]] = rows[missing]


def _ref_for(batch: PairBatch, table: torch.Tensor, device: torch.device) -> torch.Tensor:
    rows = table[batch.index.cpu()]
    return torch.cat([rows[:, 0], rows[:, 1]]).to(device)


def load_client(model: FedPDPOModel, shared: dict[str, torch.Tensor], state: ClientState, initial) -> None:
    """Put the global shared tensors and this client's local tensors (or the initial ones) into ``model``."""
    local_names = [n for n in model.trainable() if n not in shared]
    model.set_tensors({n: state.local.get(n, initial[n]) for n in local_names})
    model.set_tensors(shared)


def fit(
    model: FedPDPOModel,
    task: ClientTask,
    state: ClientState,
    shared: dict[str, torch.Tensor],
    initial: dict[str, torch.Tensor],
    cfg: RunConfig,
    server_round: int,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> FitResult:
    """Train the client for ``cfg.local_steps`` steps starting from the global ``shared`` tensors."""
    device = device_of(cfg)
    model.to(device)
    load_client(model, shared, state, initial)
    # With perf.fused_reference the training pairs' reference is computed inside the steps that first see them.
    ensure_reference(model, task, state, cfg, ("test",) if cfg.perf.fused_reference else ("train", "test"))

    seed = derive_seed(cfg.seed, server_round, task.client_id)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    params = model.trainable()
    shared_params = [p for n, p in params.items() if n in shared]
    local_params = [p for n, p in params.items() if n not in shared]
    # LoRA trains at ``lr`` whether it is shared or kept local (local, fedsa-lora, lg-fedavg); only the local
    # modules ("local.*": head, reward head, adapter) take the smaller step.
    # The reward head is a linear probe and needs a larger step than the 28M-parameter personalized head.
    module_params = [p for n, p in params.items() if n.startswith("local.") and not n.startswith("local.reward_head")]
    reward_params = [p for n, p in params.items() if n.startswith("local.reward_head")]
    groups = [{"params": [p for n, p in params.items() if not n.startswith("local.")], "lr": cfg.lr}]
    if module_params:
        groups.append({"params": module_params, "lr": cfg.lr * cfg.method.local_lr_scale})
    if reward_params:
        groups.append({"params": reward_params, "lr": cfg.lr * cfg.method.reward_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    anchor = [p.detach().clone() for p in shared_params] if cfg.method.proximal_mu > 0 else None

    model.train()
    n = len(task.train)
    order: list[int] = []
    sums: dict[str, float] = {}
    ref_table = reference_table(state, "train", n)
    for step in range(cfg.local_steps):
        while len(order) < cfg.batch_size:
            order.extend(torch.randperm(n, generator=gen).tolist())
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        # de-duplicate when the client has fewer pairs than the batch size
        batch = collate([task.train[i] for i in dict.fromkeys(idx)], task.pad_id).to(device)
        with autocast(device):
            need_ref = cfg.perf.fused_reference and bool(torch.isnan(ref_table[batch.index.cpu()]).any())
            out = model(batch, with_reference=need_ref, perf=cfg.perf)
            if need_ref:
                _store_reference(batch, out.ref_logps, ref_table)
            result = fedpdpo_objective(
                out.logps.float(),
                _ref_for(batch, ref_table, device),
                None if out.rewards is None else out.rewards.float(),
                cfg.beta,
                cfg.method.reward_weight,
                cfg.method.loss_type,
                cfg.method.label_smoothing,
            )
        loss = result.loss
        if anchor is not None:
            prox = sum(((p - a) ** 2).sum() for p, a in zip(shared_params, anchor, strict=True))
            loss = loss + 0.5 * cfg.method.proximal_mu * prox
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.method.head_steps:  # FedRep: local tensors first (shared frozen), then the shared ones
            for p in shared_params if step < cfg.method.head_steps else local_params:
                p.grad = None
        grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        result.metrics["grad_norm"] = float(grad_norm)
        if not math.isfinite(loss.item()) or not math.isfinite(float(grad_norm)):
            raise FloatingPointError(f"client {task.client_id}: non-finite loss or gradient at step {step}")
        optimizer.step()
        for k, v in result.metrics.items():
            sums[k] = sums.get(k, 0.0) + v
        if on_step is not None:
            on_step(step, result.metrics)
    model.eval()

    state.local = model.get_tensors([n for n in params if n not in shared])
    state.optimizer = optimizer.state_dict()
    state.rounds_trained += 1
    metrics = {k: v / cfg.local_steps for k, v in sums.items()}
    return FitResult(model.get_tensors(list(shared)), n, metrics, state)


@torch.no_grad()
def evaluate(
    model: FedPDPOModel,
    task: ClientTask,
    state: ClientState,
    shared: dict[str, torch.Tensor],
    initial: dict[str, torch.Tensor],
    cfg: RunConfig,
) -> dict[str, float]:
    """Held-out preference accuracy of the client's personalized model, by implicit, explicit and combined score.

    * implicit: ``beta * h`` (DPO's reward margin); explicit: ``r(x, y_w) - r(x, y_l)``;
      combined: ``beta * h + alpha * (r(x, y_w) - r(x, y_l))``; ``logp``: length-normalised policy log-prob margin.
    * ``accuracy`` is the score chosen by ``method.eval_score``. Ties count half.
    """
    device = device_of(cfg)
    model.to(device)
    load_client(model, shared, state, initial)
    ensure_reference(model, task, state, cfg, ("test",))
    model.eval()
    ref_table = state.reference["test"]
    implicit, explicit, logp_margin, losses = [], [], [], []
    chosen_rewards, rejected_rewards = [], []
    for batch in _batches(task.test, cfg.eval_batch_size, task.pad_id, device):
        with autocast(device):
            out = model(batch)
        b = batch.num_pairs
        logps = out.logps.float()
        ref = _ref_for(batch, ref_table, device)
        loss, r_c, r_r = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], cfg.beta, cfg.method.loss_type)
        losses.append(loss.cpu())
        chosen_rewards.append(r_c.cpu())
        rejected_rewards.append(r_r.cpu())
        implicit.append((r_c - r_r).cpu())
        per_tok = logps / out.n_tokens.clamp_min(1).float()
        logp_margin.append((per_tok[:b] - per_tok[b:]).cpu())
        if out.rewards is not None:
            explicit.append((out.rewards[:b] - out.rewards[b:]).float().cpu())
    imp = torch.cat(implicit)
    metrics = {
        "accuracy_implicit": pairwise_accuracy(imp).item(),
        "accuracy_logp": pairwise_accuracy(torch.cat(logp_margin)).item(),
        "reward_margin": imp.mean().item(),
        "rewards/chosen": torch.cat(chosen_rewards).mean().item(),
        "rewards/rejected": torch.cat(rejected_rewards).mean().item(),
        "eval_loss": torch.cat(losses).mean().item(),
    }
    if explicit:
        exp = torch.cat(explicit)
        combined = imp + cfg.method.eval_reward_weight * exp
        metrics["accuracy_explicit"] = pairwise_accuracy(exp).item()
        metrics["accuracy_combined"] = pairwise_accuracy(combined).item()
        metrics["explicit_margin"] = exp.mean().item()
    metrics["accuracy"] = metrics[f"accuracy_{cfg.method.eval_score}"]
    return metrics
