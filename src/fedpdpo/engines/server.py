"""The server loop shared by every engine: sample, fit, aggregate, evaluate, record; transport is pluggable.

An engine supplies a :class:`ClientTransport` that reaches clients (direct calls in-process, Flower messages
otherwise). Everything else (client sampling, aggregation by the strategy, metrics rows, summary) happens here,
once, so the same config and seed give the same results in every engine. So do the checkpoint after every round,
the exact resume after a kill, and the screening of client updates (see docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file

from fedpdpo.client.state import atomic_write
from fedpdpo.client.trainer import precision_used
from fedpdpo.config import RunConfig, config_to_dict
from fedpdpo.engines.checkpoint import (
    CHECKPOINT_FILE,
    ServerCheckpoint,
    capture_rng,
    load_checkpoint,
    restore_rng,
    rewind_metrics,
    save_checkpoint,
)
from fedpdpo.engines.fingerprint import config_fingerprint
from fedpdpo.errors import FedPDPOError
from fedpdpo.instructions import FitPlan, Instructions
from fedpdpo.report.progress import RunProgress
from fedpdpo.report.tracking import open_trackers
from fedpdpo.report.writer import append_metrics, build_summary, read_metrics, write_summary
from fedpdpo.strategies import ClientUpdate, Strategy
from fedpdpo.timing import phase
from fedpdpo.transfer import from_wire, to_wire, wire_bytes

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
    metrics: dict[str, Any]  # includes the TASK_FIELDS, conflict and domains for the summary
    error: str = ""  # why the client could not be evaluated (metrics then empty)


@dataclass
class RunRecord:
    """What the server tells its clients about the run besides the round (remote engines need it, see
    ``attach``): which run this is, so that a node keeps each run's state apart, and per client the last round
    whose trained state the client returned, so that a node can tell its stored state is the one this run saw."""

    run_id: str
    state_rounds: dict[int, int] = field(default_factory=dict)


class ClientTransport(Protocol):
    def attach(self, run: RunRecord) -> None:
        """Take the run's record before the first message; the server keeps updating it in place."""
        ...

    def fit(
        self,
        server_round: int,
        client_ids: list[int],
        shared: dict[str, torch.Tensor],
        instructions: Instructions,
        on_step: Callable[[float], None],
    ) -> list[FitReply]:
        """Train ``client_ids`` from ``shared`` as the strategy's ``instructions`` say; call ``on_step(loss)`` per
        local step (or per client, remotely)."""
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
    # Fewer accepted updates than this in a round (clients crashed, timed out, were rejected): keep the old global.
    min_fit_replies: int = 1
    # Extra checkpoint fingerprint after a round (the in-process engine adds its clients' state files).
    fingerprint: Callable[[int], dict[str, Any]] | None = None
    # The run's config as config.toml records it (``cfg`` is the model config the strategy derives from it), which
    # a resume compares with the checkpoint; None: ``cfg``.
    run_cfg: RunConfig | None = None

    def uplink_bytes(self) -> int:
        return wire_bytes(self.initial_shared, self.cfg.transfer_dtype)


#: What a client reports about its data (sizes, the length limits it chose, truncation shares: data/task.py).
TASK_FIELDS = (
    "n_train",
    "n_val",
    "n_test",
    "max_length",
    "max_prompt_length",
    "prompts_truncated",
    "responses_truncated",
)
CLIENT_FIELDS = (*TASK_FIELDS, "conflict", "domains")


def eval_to_rows(server_round: int, replies: list[EvalReply], train: dict[int, dict[str, Any]]) -> list[dict]:
    """One row per client: its evaluation (or ``eval/failed`` and ``eval/error`` saying why) and its training."""
    rows = []
    for reply in sorted(replies, key=lambda r: r.client_id):
        row: dict[str, Any] = {"round": server_round, "client": reply.client_id}
        if reply.error:
            row |= {"eval/failed": 1.0, "eval/error": reply.error}
        row.update({k: v for k, v in reply.metrics.items() if k != "domains"})
        row.update(train.get(reply.client_id, {}))
        rows.append(row)
    return rows


def train_metrics(reply: FitReply) -> dict[str, Any]:
    if reply.tensors is None:
        return {"train/failed": 1.0, "train/error": reply.error or "client returned no update"}
    return {"train_loss": reply.metrics["loss"]} | {f"train/{k}": v for k, v in reply.metrics.items()}


def rejection_reason(reply: FitReply) -> str:
    """Why the server must not aggregate this reply ("" when it may): a failed client or a non-finite tensor."""
    if reply.tensors is None:
        return reply.error or "client returned no update"
    bad = sorted(name for name, t in reply.tensors.items() if not torch.isfinite(t).all())
    if bad:
        return f"non-finite values in {len(bad)} shared tensor(s), e.g. {bad[0]}"
    return ""


def planned_steps(strategy: Strategy, cfg: RunConfig, rounds: range) -> dict[int, dict[int, int]]:
    """Local steps of the federated pass of each of ``rounds``, by client the strategy samples (what the progress
    display counts: each such step reports once)."""
    return {
        r: dict.fromkeys(
            strategy.sample_clients(r, cfg.num_clients, cfg.client_fraction, cfg.seed),
            FitPlan.parse(strategy.fit_instructions(r), cfg.local_steps).pass_steps,
        )
        for r in rounds
    }


def run_server(
    spec: ServerSpec,
    transport: ClientTransport,
    out: Path,
    quiet: bool = False,
    resume: bool = False,
    progress: RunProgress | None = None,
) -> dict[str, Any]:
    """Round 0 evaluation, then ``rounds`` rounds of fit -> aggregate -> evaluate; writes metrics and summary.

    A checkpoint is written after round 0 and after every round (:mod:`fedpdpo.engines.checkpoint`); with
    ``resume`` the loop continues after the last checkpoint in ``out`` and ends with the same results as an
    uninterrupted run. Updates that failed or hold a non-finite value are rejected for their round (logged, and
    marked ``train/failed`` with the reason in ``train/error`` in the metrics); the others are aggregated as usual.
    A client first evaluated after round 0 (a node that joined late) is recorded with that ``joined_round``.
    ``progress``: the display the engine opened before its setup (one for the whole run); without it the loop
    opens its own.
    """
    start = time.perf_counter()
    cfg, strategy = spec.cfg, spec.strategy
    all_clients = list(range(cfg.num_clients))
    global_ = {k: v.clone() for k, v in spec.initial_shared.items()}
    client_info: dict[int, dict[str, Any]] = {}
    rejected: list[dict[str, Any]] = []
    metrics_lines, elapsed_before, first_round = 0, 0.0, 0
    run = RunRecord(uuid.uuid4().hex[:12])
    display = progress if progress is not None else RunProgress(quiet=quiet)
    trackers = open_trackers(cfg.report_to, out, out.name, config_to_dict(spec.run_cfg or cfg))
    ckpt = load_checkpoint(out) if resume else None
    if resume:
        rewind_metrics(out, ckpt.metrics_lines if ckpt else 0)
    if ckpt is not None:
        if sorted(ckpt.global_shared) != sorted(global_):
            raise FedPDPOError(f"{out / CHECKPOINT_FILE} holds other shared tensors than this run's configuration")
        global_ = ckpt.global_shared
        strategy.load_state_dict(ckpt.strategy_state)
        client_info, rejected = ckpt.client_info, ckpt.rejected
        metrics_lines, elapsed_before, first_round = ckpt.metrics_lines, ckpt.elapsed_s, ckpt.server_round + 1
        run = RunRecord(ckpt.run_id or run.run_id, dict(ckpt.state_rounds))
        restore_rng(ckpt.rng)
        log.info("resuming %s after round %d of %d", out, ckpt.server_round, cfg.rounds)

    transport.attach(run)

    def evaluate_all(server_round: int, train: dict[int, dict[str, Any]]) -> None:
        nonlocal metrics_lines
        display.begin_eval(server_round)
        replies = transport.evaluate(server_round, all_clients, to_wire(global_, cfg.transfer_dtype))
        for r in replies:
            if r.error:
                continue
            joined = client_info.get(r.client_id, {}).get("joined_round", server_round)
            client_info[r.client_id] = (
                {"id": r.client_id}
                | {k: r.metrics[k] for k in CLIENT_FIELDS if k in r.metrics}
                | {"joined_round": joined}
            )
        rows = eval_to_rows(server_round, replies, train)
        answered = {r.client_id for r in replies}
        # a client whose node is unreachable gets a row saying so (remote engines); it rejoins when it is back
        rows += [
            {"round": server_round, "client": c, "eval/failed": 1.0, "eval/error": "no reply"} | train.get(c, {})
            for c in all_clients
            if c not in answered
        ]
        append_metrics(out, rows)
        metrics_lines += len(rows)
        display.evaluated(server_round, [r for r in rows if "accuracy" in r])
        trackers.evaluated(server_round, [r for r in rows if "accuracy" in r])

    def checkpoint(server_round: int) -> None:
        with phase("checkpoint"):  # including the digests of the clients' state files (fingerprint)
            save_checkpoint(out, checkpoint_of(server_round))

    def checkpoint_of(server_round: int) -> ServerCheckpoint:
        return ServerCheckpoint(
            server_round=server_round,
            global_shared=global_,
            strategy_state=strategy.state_dict(),
            client_info=client_info,
            metrics_lines=metrics_lines,
            elapsed_s=elapsed_before + time.perf_counter() - start,
            rejected=rejected,
            rng=capture_rng(),
            fingerprint={"config": config_fingerprint(spec.run_cfg or cfg), "engine": spec.engine}
            | (spec.fingerprint(server_round) if spec.fingerprint else {}),
            run_id=run.run_id,
            state_rounds=run.state_rounds,
        )

    rounds = range(max(first_round, 1), cfg.rounds + 1)
    evaluations = ([0] if first_round == 0 else []) + list(rounds)
    done_before = planned_steps(strategy, cfg, range(1, max(first_round, 1)))
    trackers.steps = sum(sum(by_client.values()) for by_client in done_before.values())  # resumed: count on

    def on_step(loss: float) -> None:
        display.step(loss)
        trackers.step(loss)

    with contextlib.ExitStack() as stack:
        stack.callback(trackers.close)
        if progress is None:
            stack.enter_context(display)
        display.plan(planned_steps(strategy, cfg, rounds), evaluations, cfg.num_clients, cfg.rounds, cfg.batch_size)
        if first_round == 0:
            evaluate_all(0, {})
            checkpoint(0)
        for server_round in rounds:
            sampled = strategy.sample_clients(server_round, cfg.num_clients, cfg.client_fraction, cfg.seed)
            instructions = strategy.fit_instructions(server_round)
            display.begin_fit(server_round)
            shared = to_wire(global_, cfg.transfer_dtype)
            replies = transport.fit(server_round, sampled, shared, instructions, on_step)
            updates: list[ClientUpdate] = []
            train: dict[int, dict[str, Any]] = {}
            for reply in replies:
                if reply.tensors is not None:  # the client stored its state of this round, even if rejected below
                    run.state_rounds[reply.client_id] = server_round
                reason = rejection_reason(reply)
                if reason:
                    log.warning("round %d: update of client %d rejected: %s", server_round, reply.client_id, reason)
                    rejected.append({"round": server_round, "client": reply.client_id, "reason": reason})
                    train[reply.client_id] = {"train/failed": 1.0, "train/error": reason}
                    continue
                assert reply.tensors is not None  # a reply without tensors has a rejection reason
                updates.append(ClientUpdate(reply.client_id, reply.num_examples, from_wire(reply.tensors)))
                train[reply.client_id] = train_metrics(reply)
            if len(updates) >= spec.min_fit_replies:
                global_ = strategy.aggregate(server_round, global_, updates)
            else:
                log.warning(
                    "round %d: %d accepted update(s), fewer than min_fit_replies=%d: global unchanged",
                    server_round,
                    len(updates),
                    spec.min_fit_replies,
                )
            evaluate_all(server_round, train)
            checkpoint(server_round)
        display.finish()

    meta = {
        "algorithm": strategy.name,
        "model": spec.model_name,
        "engine": spec.engine,
        "rounds": cfg.rounds,
        "seed": cfg.seed,
        "num_clients": cfg.num_clients,
        "eval_score": cfg.method.eval_score,
        "select_round": cfg.select_round,
        "precision": cfg.precision,
        # what it resolved to on the machine running the server (in-process: the clients' machine too; a deployed
        # node resolves "auto" on its own hardware)
        "precision_used": precision_used(cfg),
        "time_s": round(elapsed_before + time.perf_counter() - start, 2),
        "rejected_updates": rejected,
    }
    with phase("summary"):
        return _finish(spec, out, global_, client_info, meta)


def _finish(
    spec: ServerSpec, out: Path, global_: dict[str, torch.Tensor], client_info: dict[int, dict[str, Any]], meta: dict
) -> dict[str, Any]:
    """Write the final global shared tensors and summary.json; return the summary."""
    cfg = spec.cfg
    all_clients = list(range(cfg.num_clients))
    communication = {
        "shared_parameters": sorted(spec.initial_shared),
        "uplink_bytes_per_client_round": spec.uplink_bytes(),
        "downlink_bytes_per_client_round": spec.uplink_bytes(),
    }
    last_round = [r for r in read_metrics(out) if r["round"] == cfg.rounds and "accuracy" in r]
    clients = [client_info[c] for c in all_clients if c in {r["client"] for r in last_round}]
    if not clients:  # remote engines: every node failed or was gone in the last round
        raise FedPDPOError(
            f"no client was evaluated in the last round ({cfg.rounds}; metrics.jsonl says why), so {out} has no "
            "summary; bring the nodes back and continue with one more round: fedpdpo run --resume DIR --rounds N"
        )
    # The final global shared tensors (the LoRA), by model parameter name: what `fedpdpo export` and
    # `fedpdpo generate` combine with a client's local.safetensors to rebuild its personalized model.
    final_shared = {k: v.detach().cpu().contiguous() for k, v in global_.items()}
    atomic_write(out / GLOBAL_FILE, lambda p: save_file(final_shared, p))
    summary = build_summary(read_metrics(out), meta, clients, communication)
    write_summary(out, summary)
    return summary
