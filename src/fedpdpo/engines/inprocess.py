"""The in-process engine: every round and every client, sequentially, in one process, deterministically.

One model lives in memory; each client's private state (local modules, optimizer, reference log-probs) is loaded
from its directory under ``OUT/clients`` before the client runs and written back after, so memory stays flat in
the number of clients.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from fedpdpo.client.state import ClientStore
from fedpdpo.client.trainer import evaluate, fit
from fedpdpo.config import RunConfig
from fedpdpo.engines.setup import RunSetup, build_setup
from fedpdpo.model.backbone import resolve_model
from fedpdpo.report.progress import RunProgress
from fedpdpo.report.writer import (
    append_metrics,
    build_summary,
    prepare_out_dir,
    read_metrics,
    write_config,
    write_summary,
)
from fedpdpo.strategies import ClientUpdate

log = logging.getLogger(__name__)


def eval_rows(
    setup: RunSetup, store: ClientStore, global_: dict, server_round: int, train: dict
) -> list[dict]:
    """Evaluate every client's personalized model (global shared tensors + its local state) on its test split."""
    rows = []
    for client, task in zip(setup.clients, setup.tasks, strict=True):
        state = store.load(client.client_id)
        had_reference = bool(state.reference)
        metrics = evaluate(setup.model, task, state, global_, setup.initial, setup.cfg)
        if not had_reference:
            store.save(client.client_id, state)  # reference log-probs are computed once, then cached
        row: dict[str, Any] = {
            "round": server_round,
            "client": client.client_id,
            "conflict": client.conflict,
            "n_train": len(task.train),
            "n_test": len(task.test),
            **metrics,
        }
        if client.client_id in train:
            row.update(train[client.client_id])
        rows.append(row)
    return rows


def run_summary(setup: RunSetup, rows: list[dict], elapsed: float) -> dict[str, Any]:
    meta = {
        "algorithm": setup.strategy.name,
        "model": resolve_model(setup.cfg.model),
        "engine": "inprocess",
        "rounds": setup.cfg.rounds,
        "seed": setup.cfg.seed,
        "num_clients": setup.cfg.num_clients,
        "eval_score": setup.cfg.method.eval_score,
        "time_s": round(elapsed, 2),
    }
    communication = {
        "shared_parameters": setup.shared_names,
        "uplink_bytes_per_client_round": setup.uplink_bytes(),
        "downlink_bytes_per_client_round": setup.uplink_bytes(),
    }
    return build_summary(rows, meta, [c.describe() for c in setup.clients], communication)


def run_inprocess(
    cfg: RunConfig, out: str | Path, quiet: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Run a whole federated job and write config.toml, metrics.jsonl and summary.json to ``out``."""
    start = time.perf_counter()
    out = Path(out).resolve()
    prepare_out_dir(out, overwrite=overwrite)
    setup = build_setup(cfg)
    cfg = setup.cfg
    write_config(out, cfg)
    store = ClientStore(out / "clients")
    strategy = setup.strategy
    global_ = setup.initial_global()
    n_sampled = max(1, round(cfg.client_fraction * cfg.num_clients))

    with RunProgress(cfg.rounds * n_sampled * cfg.local_steps, quiet=quiet) as progress:
        progress.describe("round 0 eval")
        rows = eval_rows(setup, store, global_, 0, {})
        append_metrics(out, rows)
        progress.round_table(0, rows)
        for server_round in range(1, cfg.rounds + 1):
            sampled = strategy.sample_clients(server_round, cfg.num_clients, cfg.client_fraction, cfg.seed)
            updates, train_metrics = [], {}
            for cid in sampled:
                progress.describe(f"round {server_round}/{cfg.rounds} client {cid}")
                state = store.load(cid)
                try:
                    result = fit(
                        setup.model,
                        setup.tasks[cid],
                        state,
                        global_,
                        setup.initial,
                        cfg,
                        server_round,
                        on_step=lambda _s, m: progress.step(m["loss"]),
                    )
                except FloatingPointError as exc:
                    log.warning("round %d: rejected the update of client %d: %s", server_round, cid, exc)
                    train_metrics[cid] = {"train/rejected": 1.0}
                    continue
                store.save(cid, result.state)
                updates.append(ClientUpdate(cid, result.num_examples, result.shared))
                train_metrics[cid] = {"train_loss": result.metrics["loss"]} | {
                    f"train/{k}": v for k, v in result.metrics.items()
                }
            global_ = strategy.aggregate(server_round, global_, updates)
            progress.describe(f"round {server_round}/{cfg.rounds} eval")
            rows = eval_rows(setup, store, global_, server_round, train_metrics)
            append_metrics(out, rows)
            progress.round_table(server_round, rows)

    summary = run_summary(setup, read_metrics(out), time.perf_counter() - start)
    write_summary(out, summary)
    return summary
