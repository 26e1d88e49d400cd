"""The Flower ServerApp: fedpdpo's server loop (``engines/server.py``) with clients reached through a Flower Grid.

:class:`GridTransport` is the only Flower-specific part of the server: it turns ``fit``/``evaluate`` calls into
train/evaluate Messages (the shared tensors in one ArrayRecord), waits for the replies, and turns failures
(error replies, timeouts, nodes that are gone) into failed :class:`FitReply` entries, which the server loop logs,
records in metrics (naming the node and the reason) and leaves out of the aggregate. Which node holds which fedpdpo
client is asked with a query message (the node answers with its client id); nodes that join later, or come back
after a crash with a new node id, are discovered the same way before each round. A node answering for a client id
outside ``0..num_clients-1`` is ignored; when two live nodes answer for the same client, the newer one serves it.

The server never opens a data file: it builds the model only for the round-0 shared tensors and learns each
client's number of training pairs (the FedAvg weights) from its replies. So a run config for nodes that hold their
own files needs no ``data.path``. With ``resume`` the ServerApp continues the run in ``out`` after its last
checkpoint, exactly as the in-process engine does; the clients' state is on the nodes, which check it themselves
against the rounds the checkpoint records (``client_app._load_state``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from fedpdpo.config import RunConfig, load_config
from fedpdpo.engines.checkpoint import CLIENTS_DIR, clear_run_state
from fedpdpo.engines.fingerprint import checked_resume
from fedpdpo.engines.flower.client_app import check_node_data
from fedpdpo.engines.flower.privacy import check_secagg, clipping_config, with_privacy
from fedpdpo.engines.flower.records import (
    ARRAYS,
    INFO,
    KEY_CLIENT,
    KEY_NUM_EXAMPLES,
    KEY_ROUND,
    KEY_RUN_CONFIG,
    KEY_RUN_ID,
    KEY_STATE_ROOT,
    KEY_STATE_ROUND,
    METRICS,
    config_text,
    instruction,
    record_to_tensors,
    tensors_to_record,
)
from fedpdpo.engines.flower.secagg import secure_fit
from fedpdpo.engines.server import TASK_FIELDS, EvalReply, FitReply, RunRecord, ServerSpec, run_server
from fedpdpo.engines.setup import build_model, resolve
from fedpdpo.errors import ConfigError
from fedpdpo.instructions import FitPlan, Instructions
from fedpdpo.model.backbone import resolve_model
from fedpdpo.report.writer import write_config
from fedpdpo.rundir import resume_source, run_directory

log = logging.getLogger(__name__)


@dataclass
class ServerParams:
    """What the ServerApp is told at launch (the Flower run config key of each, for ``flwr run``, in brackets)."""

    # [config] path of the TOML file on the SuperLink machine; [set] space-separated overrides. With resume: the
    # run's own config.toml (config and set may then be left out)
    cfg: RunConfig
    out: str  # [out] run directory on the SuperLink machine
    engine: str = "flower-deploy"  # [engine] recorded in summary.json
    overwrite: bool = False  # [overwrite]
    lock: bool = True  # [lock] false when the launcher already holds the run directory (simulation, loopback)
    min_fit_replies: int = 1  # [min-fit-replies] fewer accepted updates: the round keeps the old global
    reply_timeout: float = 0.0  # [reply-timeout] seconds to wait for one round's replies; 0 = no limit
    node_wait: float = 120.0  # [node-wait] seconds to wait at the start for a node per client
    quiet: bool = True
    resume: bool = False  # [resume] continue the run in out after its last checkpoint
    rounds: int | None = None  # [rounds] with resume: raise the run's number of rounds (0 = unchanged)

    @classmethod
    def from_run_config(cls, rc: dict[str, Any]) -> ServerParams:
        resume = bool(rc.get("resume", False))
        if not rc.get("out") or (not rc.get("config") and not resume):
            raise ConfigError("the ServerApp needs run config keys 'config' (TOML path) and 'out' (run directory)")
        out = str(rc["out"])
        if resume:
            if rc.get("config") or rc.get("set"):
                raise ConfigError("run config key 'resume' uses the run's own config.toml; drop 'config' and 'set'")
            cfg = load_config(resume_source(Path(out)) / "config.toml")
        else:
            cfg = load_config(str(rc["config"]), str(rc.get("set", "")).split())
        return cls(
            cfg=cfg,
            out=out,
            engine=str(rc.get("engine", "flower-deploy")),
            overwrite=bool(rc.get("overwrite", False)),
            lock=bool(rc.get("lock", True)),
            min_fit_replies=int(rc.get("min-fit-replies", 1)),
            reply_timeout=float(rc.get("reply-timeout", 0.0)),
            node_wait=float(rc.get("node-wait", 120.0)),
            resume=resume,
            rounds=int(rc.get("rounds", 0)) or None,
        )


#: Seconds between two looks for replies (a pull from the SuperLink: one small request on a deployment).
REPLY_POLL_S = 0.25

#: Error codes meaning the node itself is unreachable (the SuperLink answers for it), not that its ClientApp failed.
NODE_GONE = {ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE}


def reply_error(msg: Message) -> str:
    """Why a reply failed, naming its node (the reason of a node's own error is its one-line message)."""
    if not msg.has_error():
        return ""
    code = "" if msg.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION else f" (Flower error code {msg.error.code})"
    return f"node {msg.metadata.src_node_id}: {msg.error.reason}{code}"


class GridTransport:
    """Reaches fedpdpo clients through a Flower Grid (Ray simulation, SuperLink, or the in-process grid)."""

    def __init__(self, grid: Grid, cfg: RunConfig, state_root: Path, timeout: float | None) -> None:
        self.grid = grid
        self.cfg_text = config_text(cfg)
        self.num_clients = cfg.num_clients
        self.local_steps = cfg.local_steps
        self.transfer_dtype = cfg.transfer_dtype
        self.state_root = str(state_root)
        self.timeout = timeout
        self.extra = clipping_config(cfg)
        self.secagg = cfg.privacy.secagg
        self.run = RunRecord("")
        self.n_train: dict[int, int] = {}  # training pairs per client, from the evaluation replies (SecAgg+ weights)
        self.node_of: dict[int, int] = {}  # fedpdpo client id -> node id
        self.silent: set[int] = set()  # nodes that did not answer the client query, or were replaced or ignored

    def attach(self, run: RunRecord) -> None:
        self.run = run

    def exchange(self, messages: list[Message]) -> list[Message]:
        """Send ``messages`` and collect their replies until all are in or ``timeout`` has passed.

        Flower's ``Grid.send_and_receive``, except that it looks for replies every ``REPLY_POLL_S`` seconds instead
        of every 3: on a deployment each exchange would otherwise wait 1.5 s longer on average for nothing."""
        pending = set(self.grid.push_messages(messages)) if messages else set()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        replies: list[Message] = []
        while pending:
            got = list(self.grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(REPLY_POLL_S)
        return replies

    def _config(self, server_round: int) -> dict[str, Any]:
        """What every message of the round says besides the client's own keys (:meth:`_client_config`)."""
        config = {KEY_ROUND: server_round, KEY_RUN_CONFIG: self.cfg_text, KEY_STATE_ROOT: self.state_root}
        return config | {KEY_RUN_ID: self.run.run_id}

    def _client_config(self, cid: int) -> dict[str, Any]:
        return {KEY_CLIENT: cid, KEY_STATE_ROUND: self.run.state_rounds.get(cid, -1)}

    def discover(self) -> None:
        """Ask nodes not seen before which client they hold; a newer node for a client replaces the old."""
        online = set(self.grid.get_node_ids())
        self.node_of = {c: n for c, n in self.node_of.items() if n in online}
        self.silent &= online  # a node the SuperLink dropped may come back under its id (node authentication)
        new = sorted(online - set(self.node_of.values()) - self.silent)
        if not new:
            return
        query = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY, group_id="discover") for n in new]
        answered = set()
        for reply in self.exchange(query):
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                log.warning("node %d did not say which client it holds: %s", node, reply_error(reply))
                continue
            cid = int(reply.content.config_records[INFO][KEY_CLIENT])
            if not 0 <= cid < self.num_clients:
                log.warning(
                    "node %d holds client %d, outside 0..%d (num_clients): ignored", node, cid, self.num_clients - 1
                )
                self.silent.add(node)
                continue
            if cid in self.node_of:  # restarted (new node id; the old one is gone), or two nodes claim one client
                log.warning("node %d now serves client %d instead of node %d", node, cid, self.node_of[cid])
                self.silent.add(self.node_of[cid])
            self.node_of[cid] = node
        self.silent |= set(new) - answered

    def wait_for_clients(self, num_clients: int, patience: float, poll: float = 1.0) -> None:
        """Wait up to ``patience`` seconds until a node answers for every client (nodes may start after the server).

        Round 0 evaluates every client, so starting before all nodes are up would record avoidable failures; after
        ``patience`` the run starts anyway and absent clients are reported as failed until their node joins.
        """
        deadline = time.monotonic() + patience
        while True:
            self.discover()
            if len(self.node_of) >= num_clients or time.monotonic() >= deadline:
                break
            time.sleep(poll)
        absent = sorted(set(range(num_clients)) - set(self.node_of))
        if absent:
            log.warning(
                "starting without a node for client(s) %s after waiting %.0f s (they join when their node connects)",
                absent,
                patience,
            )

    def _send(
        self,
        kind: str,
        server_round: int,
        client_ids: list[int],
        shared: dict[str, torch.Tensor],
        instructions: Instructions | None = None,
    ) -> tuple[dict[int, Message], dict[int, str]]:
        """Send to every reachable client; return the replies by client id and the reason for each missing one."""
        self.discover()
        missing = {c: "no SuperNode holds this client" for c in client_ids if c not in self.node_of}
        arrays = tensors_to_record(shared)
        config = self._config(server_round) | self.extra | (instructions or {})
        by_node = {self.node_of[c]: c for c in client_ids if c in self.node_of}
        msgs = [
            Message(
                instruction(arrays, config | self._client_config(cid)),
                dst_node_id=node,
                message_type=kind,
                group_id=str(server_round),
            )
            for node, cid in by_node.items()
        ]
        replies: dict[int, Message] = {}
        for reply in self.exchange(msgs):
            node = reply.metadata.src_node_id
            if node not in by_node:
                continue
            if not reply.has_error():
                replies[by_node[node]] = reply
                continue
            missing[by_node[node]] = reply_error(reply)
            if reply.error.code in NODE_GONE:  # the SuperLink answers for a node it lost: forget the node
                self.node_of.pop(by_node[node], None)
                self.silent.add(node)
        for node, cid in by_node.items():  # timed out: maybe slow, maybe dead; a restarted node replaces it when found
            if cid not in replies:
                missing.setdefault(cid, f"node {node}: no reply within {self.timeout} s")
        return replies, missing

    def fit(
        self,
        server_round: int,
        client_ids: list[int],
        shared: dict[str, torch.Tensor],
        instructions: Instructions,
        on_step: Callable[[float], None],
    ) -> list[FitReply]:
        steps = FitPlan.parse(instructions, self.local_steps).pass_steps  # progress: a remote client reports once
        if self.secagg:
            return self._secure_fit(server_round, client_ids, shared, instructions, steps, on_step)
        replies, missing = self._send(MessageType.TRAIN, server_round, client_ids, shared, instructions)
        out = []
        for cid in client_ids:
            if cid in missing:
                out.append(FitReply(cid, 0, None, error=missing[cid]))
                continue
            content = replies[cid].content
            metrics = {k: float(v) for k, v in content.metric_records[METRICS].items()}
            n = int(metrics.pop(KEY_NUM_EXAMPLES))
            for _ in range(steps):
                on_step(metrics["loss"])
            out.append(FitReply(cid, n, record_to_tensors(content.array_records[ARRAYS], self.transfer_dtype), metrics))
        return out

    def _secure_fit(
        self,
        server_round: int,
        client_ids: list[int],
        shared: dict[str, torch.Tensor],
        instructions: Instructions,
        steps: int,
        on_step: Callable,
    ) -> list[FitReply]:
        """SecAgg+: every contributing client's reply carries the (only visible) weighted average of all of them."""
        self.discover()
        by_node = {self.node_of[c]: c for c in client_ids if c in self.node_of}
        config = self._config(server_round) | instructions
        max_weight = float(max([self.n_train.get(c, 1) for c in client_ids] + [1]))
        aggregate, contributed = secure_fit(
            self.grid, server_round, sorted(by_node), shared, config, max_weight, self.timeout
        )
        out = []
        for cid in client_ids:
            node = self.node_of.get(cid)
            if aggregate is None or node not in contributed:
                why = "no SecAgg+ result this round" if node is not None else "no SuperNode holds this client"
                out.append(FitReply(cid, 0, None, error=why))
                continue
            n, metrics = contributed[node]
            metrics.pop(KEY_NUM_EXAMPLES, None)
            for _ in range(steps):
                on_step(metrics["loss"])
            out.append(FitReply(cid, n, {k: v.clone() for k, v in aggregate.items()}, metrics))
        return out

    def evaluate(self, server_round: int, client_ids: list[int], shared: dict[str, torch.Tensor]) -> list[EvalReply]:
        replies, missing = self._send(MessageType.EVALUATE, server_round, client_ids, shared)
        out = []
        for cid, why in sorted(missing.items()):
            log.warning("round %d: no evaluation from client %d: %s", server_round, cid, why)
            out.append(EvalReply(cid, {}, error=why))
        for cid, reply in sorted(replies.items()):
            info: ConfigRecord = reply.content.config_records[INFO]
            metrics: dict[str, Any] = dict(reply.content.metric_records[METRICS])
            metrics |= {k: info[k] for k in TASK_FIELDS if k in info}
            self.n_train[cid] = int(metrics["n_train"])
            metrics |= {"conflict": bool(info["conflict"]), "domains": list(info["domains"])}
            out.append(EvalReply(cid, metrics))
        return out


def serve(grid: Grid, params: ServerParams) -> dict[str, Any]:
    """Set up the server side (no client data needed: only the model, for the round-0 shared tensors) and run.

    The ServerApp holds the run directory (:mod:`fedpdpo.rundir`) unless its launcher does (``params.lock`` false).
    """
    out = Path(params.out).resolve()
    if not params.lock:
        return _serve(grid, params, out)
    with run_directory(out, overwrite=params.overwrite, resume=params.resume) as target:
        return _serve(grid, params, target)


def _serve(grid: Grid, params: ServerParams, out: Path) -> dict[str, Any]:
    run_cfg = params.cfg
    if params.resume:
        run_cfg = checked_resume(params.cfg, out, params.rounds, store=None)
        if run_cfg.rounds != params.cfg.rounds:
            write_config(out, run_cfg)  # the run's own record of its length, before the first new round
    strategy, cfg = resolve(run_cfg)
    check_secagg(strategy, cfg)
    if not cfg.data.path:  # the nodes hold their own files: fail now, not at every node's first message
        check_node_data(cfg, strategy)
    if not params.resume:
        clear_run_state(out)
        write_config(out, run_cfg)
    model, _ = build_model(cfg)
    initial = model.initial_tensors()
    shared = {n: initial[n].clone() for n in strategy.shared_names(list(initial))}
    del model
    spec = ServerSpec(
        cfg,
        with_privacy(strategy, cfg),
        shared,
        resolve_model(cfg.model),
        params.engine,
        params.min_fit_replies,
        run_cfg=run_cfg,
    )
    transport = GridTransport(grid, cfg, out / CLIENTS_DIR, params.reply_timeout or None)
    transport.wait_for_clients(cfg.num_clients, params.node_wait)
    return run_server(spec, transport, out, quiet=params.quiet, resume=params.resume)


def make_server_app(
    params: ServerParams | None = None, on_done: Callable[[dict[str, Any]], None] | None = None
) -> ServerApp:
    """A ServerApp bound to ``params`` (simulation, in-process grid) or reading them from the Flower run config.

    ``on_done`` receives the summary: Flower's runners return nothing from the app, and a failed run must not look
    like a finished one.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        summary = serve(grid, params or ServerParams.from_run_config(dict(context.run_config)))
        if on_done is not None:
            on_done(summary)

    return server_app


#: The ServerApp of ``flwr run`` (deployment); its parameters come from ``--run-config``.
app = make_server_app()
