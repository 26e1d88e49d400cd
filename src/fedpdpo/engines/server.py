"""The server loop shared by every engine: sample, fit, aggregate, evaluate, record; transport is pluggable.

An engine supplies a :class:`ClientTransport` that reaches clients (direct calls in-process, Flower messages
otherwise). Everything else (client sampling, aggregation by the strategy, metrics rows, summary) happens here,
once, so the same config and seed give the same results in every engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file

from fedpdpo.client.state import atomic_write
from fedpdpo.config import RunConfig
from fedpdpo.report.progress import RunProgress
from fedpdpo.report.writer import append_metrics, build_summary, read_metrics, write_summary
from fedpdpo.strategies import ClientUpdate, Strategy

log = logging.getLogger(__name__)

#: File in the run directory holding the final global shared tensors.
GLOBAL_FILE = "global.safetensors"


@dataclass
class FitReply:
    """What a client returns from training: its shared tensors (None when the client failed) and metrics."""

    client_id: int
    num_examples: int
    tensors: dict[str, torch.Tensor] | None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""


@dataclass
class EvalReply:
    client_id: int
    metrics: dict[str, Any]  # includes n_train, n_test, conflict, domains for the summary


class ClientTransport(Protocol):
    def fit(
        self,
        server_round: int,
        client_ids: list[int],
        shared: dict[str, torch.Tensor],
        on_step: Callable[[float], None],
    ) -> list[FitReply]:
        """Train ``client_ids`` from ``shared``; call ``on_step(loss)`` per local step (or per client, remotely)."""
        ...

    def evaluate(
        self, server_round: int, client_ids: list[int], shared: dict[str, torch.Tensor]
    ) -> list[EvalReply]: ...


@dataclass
class ServerSpec:
    """What the server knows: the config, the strategy, and the initial shared tensors."""

    cfg: RunConfig
    strategy: Strategy
    initial_shared: dict[str, torch.Tensor]
    model_name: str
    engine: str

    def uplink_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.initial_shared.values())


CLIENT_FIELDS = ("n_train", "n_test", "conflict", "domains")


def eval_to_rows(server_round: int, replies: list[EvalReply], train: dict[int, dict[str, float]]) -> list[dict]:
    rows = []
    for reply in sorted(replies, key=lambda r: r.client_id):
        row = {"round": server_round, "client": reply.client_id}
        row.update({k: v for k, v in reply.metrics.items() if k != "domains"})
        row.update(train.get(reply.client_id, {}))
        rows.append(row)
    return rows


def train_metrics(reply: FitReply) -> dict[str, float]:
    if reply.tensors is None:
        return {"train/failed": 1.0}
    return {"train_loss": reply.metrics["loss"]} | {f"train/{k}": v for k, v in reply.metrics.items()}


def run_server(spec: ServerSpec, transport: ClientTransport, out: Path, quiet: bool = False) -> dict[str, Any]:
    """Round 0 evaluation, then ``rounds`` rounds of fit -> aggregate -> evaluate; writes metrics and summary."""
    start = time.perf_counter()
    cfg, strategy = spec.cfg, spec.strategy
    all_clients = list(range(cfg.num_clients))
    global_ = {k: v.clone() for k, v in spec.initial_shared.items()}
    n_sampled = max(1, round(cfg.client_fraction * cfg.num_clients))
    client_info: dict[int, dict[str, Any]] = {}

    def evaluate_all(server_round: int, train: dict[int, dict[str, float]]) -> None:
        replies = transport.evaluate(server_round, all_clients, global_)
        for r in replies:
            client_info[r.client_id] = {"id": r.client_id} | {k: r.metrics[k] for k in CLIENT_FIELDS if k in r.metrics}
        rows = eval_to_rows(server_round, replies, train)
        append_metrics(out, rows)
        progress.round_table(server_round, rows)

    with RunProgress(cfg.rounds * n_sampled * cfg.local_steps, quiet=quiet) as progress:
        progress.describe("round 0 eval")
        evaluate_all(0, {})
        for server_round in range(1, cfg.rounds + 1):
            sampled = strategy.sample_clients(server_round, cfg.num_clients, cfg.client_fraction, cfg.seed)
            progress.describe(f"round {server_round}/{cfg.rounds} fit")
            replies = transport.fit(server_round, sampled, global_, progress.step)
            updates = []
            for reply in replies:
                if reply.tensors is None:
                    log.warning("round %d: no update from client %d: %s", server_round, reply.client_id, reply.error)
                    continue
                updates.append(ClientUpdate(reply.client_id, reply.num_examples, reply.tensors))
            global_ = strategy.aggregate(server_round, global_, updates)
            progress.describe(f"round {server_round}/{cfg.rounds} eval")
            evaluate_all(server_round, {r.client_id: train_metrics(r) for r in replies})

    meta = {
        "algorithm": strategy.name,
        "model": spec.model_name,
        "engine": spec.engine,
        "rounds": cfg.rounds,
        "seed": cfg.seed,
        "num_clients": cfg.num_clients,
        "eval_score": cfg.method.eval_score,
        "time_s": round(time.perf_counter() - start, 2),
    }
    communication = {
        "shared_parameters": sorted(spec.initial_shared),
        "uplink_bytes_per_client_round": spec.uplink_bytes(),
        "downlink_bytes_per_client_round": spec.uplink_bytes(),
    }
    clients = [client_info[c] for c in all_clients]
    # The final global shared tensors (the LoRA), by model parameter name: what `fedpdpo export` and
    # `fedpdpo generate` combine with a client's local.safetensors to rebuild its personalized model.
    final_shared = {k: v.detach().cpu().contiguous() for k, v in global_.items()}
    atomic_write(out / GLOBAL_FILE, lambda p: save_file(final_shared, p))
    summary = build_summary(read_metrics(out), meta, clients, communication)
    write_summary(out, summary)
    return summary
