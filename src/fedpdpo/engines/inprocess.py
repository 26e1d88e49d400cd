"""The in-process engine: every client, sequentially, in this process, deterministically.

One model lives in memory; each client's private state (local modules, optimizer, reference log-probs) is loaded
from ``OUT/clients/client_<id>`` before the client runs and written back after, so memory stays flat in the
number of clients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedpdpo.client.state import ClientStore
from fedpdpo.client.trainer import evaluate, fit
from fedpdpo.config import RunConfig
from fedpdpo.engines.checkpoint import CLIENTS_DIR, clear_run_state
from fedpdpo.engines.server import EvalReply, FitReply, ServerSpec, run_server
from fedpdpo.engines.setup import RunSetup, build_setup
from fedpdpo.instructions import Instructions
from fedpdpo.model.backbone import resolve_model
from fedpdpo.report.writer import prepare_out_dir, write_config

log = logging.getLogger(__name__)


class InProcessTransport:
    """Reaches clients by calling the algorithm core directly."""

    def __init__(self, setup: RunSetup, store: ClientStore) -> None:
        self.setup = setup
        self.store = store

    def fit(
        self,
        server_round: int,
        client_ids: list[int],
        shared: dict[str, torch.Tensor],
        instructions: Instructions,
        on_step: Callable[[float], None],
    ) -> list[FitReply]:
        s = self.setup
        replies = []
        for cid in client_ids:
            state = self.store.load(cid, as_of_round=server_round - 1)
            try:
                result = fit(
                    s.model,
                    s.tasks[cid],
                    state,
                    shared,
                    s.initial,
                    s.cfg,
                    server_round,
                    instructions=instructions,
                    on_step=lambda _step, m: on_step(m["loss"]),
                )
            except FloatingPointError as exc:  # rejected for this round; the client keeps its previous state
                replies.append(FitReply(cid, len(s.tasks[cid].train), None, error=str(exc)))
                continue
            self.store.save(cid, result.state, server_round)
            replies.append(FitReply(cid, result.num_examples, result.shared, result.metrics))
        return replies

    def evaluate(self, server_round: int, client_ids: list[int], shared: dict[str, torch.Tensor]) -> list[EvalReply]:
        s = self.setup
        replies = []
        for cid in client_ids:
            state = self.store.load(cid, as_of_round=server_round)
            had_reference = bool(state.reference)
            metrics = evaluate(s.model, s.tasks[cid], state, shared, s.initial, s.cfg)
            if not had_reference:
                self.store.save_reference(cid, state.reference)  # computed once, then cached
            info = s.clients[cid].describe()
            replies.append(EvalReply(cid, {k: info[k] for k in ("n_train", "n_test", "conflict", "domains")} | metrics))
        return replies


def run_inprocess(
    cfg: RunConfig, out: str | Path, quiet: bool = False, overwrite: bool = False, resume: bool = False
) -> dict[str, Any]:
    """Run a whole federated job and write config.toml, metrics.jsonl and summary.json to ``out``.

    Config, data and model are checked (``build_setup``) before anything is written, so a bad input leaves no
    partial run behind and ``--overwrite`` deletes the old run only once the new one can start. ``config.toml`` is
    ``cfg`` as given: the strategy derives everything else from it again, so with ``resume`` (``cfg`` is the run's
    own ``config.toml``) the run continues after its last checkpoint exactly as it would have gone on.
    """
    out = Path(out).resolve()
    setup = build_setup(cfg)
    if not resume:
        prepare_out_dir(out, overwrite=overwrite)
        clear_run_state(out)
        write_config(out, cfg)
    spec = ServerSpec(setup.cfg, setup.strategy, setup.initial_global(), resolve_model(cfg.model), "inprocess")
    store = ClientStore(out / CLIENTS_DIR)
    summary = run_server(spec, InProcessTransport(setup, store), out, quiet=quiet, resume=resume)
    store.finalize(range(setup.cfg.num_clients))  # finished: drop what only resuming needed
    return summary
