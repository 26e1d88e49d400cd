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

from fedpdpo.client.selection import track_best
from fedpdpo.client.state import ClientStore
from fedpdpo.client.trainer import evaluate, fit
from fedpdpo.config import RunConfig
from fedpdpo.engines.checkpoint import CLIENTS_DIR, clear_run_state
from fedpdpo.engines.fingerprint import checked_resume, clients_fingerprint
from fedpdpo.engines.server import EvalReply, FitReply, RunRecord, ServerSpec, run_server
from fedpdpo.engines.setup import RunSetup, build_setup
from fedpdpo.instructions import Instructions
from fedpdpo.model.backbone import resolve_model
from fedpdpo.report.progress import RunProgress
from fedpdpo.report.tracking import check_backends
from fedpdpo.report.writer import write_config
from fedpdpo.rundir import preflight, run_directory
from fedpdpo.timing import phase

log = logging.getLogger(__name__)


class InProcessTransport:
    """Reaches clients by calling the algorithm core directly."""

    def __init__(self, setup: RunSetup, store: ClientStore, progress: RunProgress | None = None) -> None:
        self.setup = setup
        self.store = store
        self.progress = progress  # told when each client's evaluation is done

    def attach(self, run: RunRecord) -> None:
        """Nothing to tell: the clients' state is in the run directory, whose fingerprint a resume checks."""

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
                with phase(f"round {server_round}: training"):
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
            state = self.store.load(cid, as_of_round=server_round, optimizer=False)
            self.store.save_task_info(cid, s.tasks[cid].info)
            had_reference = bool(state.reference)
            with phase(f"round {server_round}: evaluation"):
                metrics = evaluate(s.model, s.tasks[cid], state, shared, s.initial, s.cfg)
            metrics |= track_best(s.cfg, self.store, cid, server_round, metrics, shared)
            if not had_reference:
                self.store.save_reference(cid, state.reference)  # computed once, then cached
            info = s.tasks[cid].info | {"conflict": s.clients[cid].conflict, "domains": s.clients[cid].domains}
            replies.append(EvalReply(cid, info | metrics))
            if self.progress is not None:
                self.progress.client_done("" if had_reference else "reference log-probs computed")
        return replies


def run_inprocess(
    cfg: RunConfig,
    out: str | Path,
    quiet: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    rounds: int | None = None,
) -> dict[str, Any]:
    """Run a whole federated job and write config.toml, metrics.jsonl and summary.json to ``out``.

    Config, data and model are checked (``build_setup``) before anything is written, so a bad input leaves no
    partial run behind, and ``overwrite`` replaces an old run only with a finished new one (:mod:`fedpdpo.rundir`).
    ``config.toml`` is ``cfg`` as given: the strategy derives everything else from it again, so with ``resume``
    (``cfg`` is the run's own ``config.toml``) the run continues after its last checkpoint exactly as it would have
    gone on, once the directory is found as the checkpoint left it; ``rounds`` (if given) raises its number of rounds.
    """
    out = Path(out).resolve()
    check_backends(cfg.report_to)  # a tracker that is not installed: before minutes of setup
    with RunProgress(quiet=quiet) as progress:  # one display from setup to the last evaluation
        if not resume:
            preflight(out, overwrite)
            setup = _setup(cfg, progress)
            with run_directory(out, overwrite=overwrite) as target:
                clear_run_state(target)
                write_config(target, cfg)
                return _run(setup, cfg, target, progress, resume=False)
        with run_directory(out, resume=True) as target:
            resumed = checked_resume(cfg, target, rounds, ClientStore(target / CLIENTS_DIR))
            setup = _setup(resumed, progress)
            if resumed.rounds != cfg.rounds:
                write_config(target, resumed)  # --rounds: the run's own record of its length, before the first round
            return _run(setup, resumed, target, progress, resume=True)


def _setup(cfg: RunConfig, progress: RunProgress) -> RunSetup:
    setup = build_setup(cfg, progress.stage)
    progress.data_sizes({t.client_id: len(t.train) for t in setup.tasks}, sum(len(t.test) for t in setup.tasks))
    progress.setup_done(
        model=setup.cfg.model,
        clients=len(setup.tasks),
        train_pairs=sum(len(t.train) for t in setup.tasks),
        test_pairs=sum(len(t.test) for t in setup.tasks),
    )
    return setup


def _run(setup: RunSetup, run_cfg: RunConfig, out: Path, progress: RunProgress, resume: bool) -> dict[str, Any]:
    store = ClientStore(out / CLIENTS_DIR, bases=setup.model.delta_bases())
    clients = range(setup.cfg.num_clients)
    spec = ServerSpec(
        setup.cfg,
        setup.strategy,
        setup.initial_global(),
        resolve_model(setup.cfg.model),
        "inprocess",
        fingerprint=lambda server_round: {"clients": clients_fingerprint(store, clients, server_round)},
        run_cfg=run_cfg,
    )
    summary = run_server(spec, InProcessTransport(setup, store, progress), out, resume=resume, progress=progress)
    with phase("finalize"):
        store.finalize(clients)  # finished: drop what only resuming needed
    return summary
