"""The Flower ClientApp: one fedpdpo client per SuperNode, running the same ``fit``/``evaluate`` as every engine.

Which client a node serves, and from which data, comes from its node config (:class:`NodeClient`):

* **node-local data** (a real federation; ``fedpdpo node --client-id N --data FILE``): ``client-id``,
  ``data-path``, optionally ``test-path`` and ``on-bad-record`` (this node's choice, else the run config's
  ``data.on_bad_record``). The node's file is its client's whole data, loaded by the same
  :func:`fedpdpo.data.load_client_files` as the in-process ``partition.method = "by_file"``; nothing else is read.
* **shared data** (simulation, loopback without ``--node-data``): ``partition-id``. The node builds every
  partition from the run config's ``data.path``, as the in-process engine does, and serves its own.

The client's private state (local modules, optimizer, reference log-probs) is kept by a :class:`ClientStore` on the
node's own disk: under ``state-dir/run-<run id>`` when the node config names a state dir (real deployments: each
run apart, so a new run never picks up an old run's modules or cached log-probs), else under the directory the
server names (simulation and loopback, where server and nodes share a disk). Before it loads its state the node
checks it against the last round whose trained state the server's run saw it return: a lost or replaced state
directory is refused, not silently continued from. The state is not kept in Flower's ``Context.state``: that
context is shipped between the SuperNode and the ClientApp process with every message, and the personalized head
alone is vocab x hidden floats.

A problem with the node's input (a bad record, a missing file, state that does not match) is a
:class:`~fedpdpo.errors.FedPDPOError`: the node logs it as one line (``FILE:LINE: problem``) and answers with an
error reply, whose reason the server records in the round's metrics; the next message is served as usual, so a
fixed file is picked up then.

The loaded model and tokenized data are cached per process. A Ray actor and a ``fedpdpo node`` worker
(``worker.py``) keep their process for the whole run, so there the model loads once per node and run config.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedpdpo.client.selection import track_best
from fedpdpo.client.state import ClientStore
from fedpdpo.client.trainer import evaluate, fit
from fedpdpo.config import RunConfig
from fedpdpo.data import ClientData, build_clients, load_client_files
from fedpdpo.data.task import ClientTask, build_task
from fedpdpo.engines.flower.records import (
    ARRAYS,
    CONFIG,
    INFO,
    KEY_CLIENT,
    KEY_NUM_EXAMPLES,
    KEY_ROUND,
    KEY_RUN_CONFIG,
    KEY_RUN_ID,
    KEY_STATE_ROOT,
    KEY_STATE_ROUND,
    METRICS,
    NODE_CLIENT,
    NODE_DATA,
    NODE_ON_BAD_RECORD,
    NODE_PARTITION,
    NODE_STATE_DIR,
    NODE_TEST,
    config_from_text,
    numeric_metrics,
    record_to_tensors,
    tensors_to_record,
)
from fedpdpo.engines.flower.secagg import legacy_train
from fedpdpo.engines.setup import build_model
from fedpdpo.errors import ConfigError, FedPDPOError
from fedpdpo.instructions import pick
from fedpdpo.model import FedPDPOModel
from fedpdpo.strategies import Strategy, get_strategy

log = logging.getLogger(__name__)


class StateMismatch(FedPDPOError):
    """The node's stored client state is older than the run saw it (state directory lost, replaced or restored)."""


@dataclass(frozen=True)
class NodeClient:
    """The client a node serves and where its data comes from, as its node config says."""

    client_id: int
    data_path: str = ""  # "" = shared data: partition ``client_id`` of the run config's data.path
    test_path: str = ""
    on_bad_record: str = ""  # "" = the run config's data.on_bad_record

    @classmethod
    def of(cls, context: Context) -> NodeClient:
        node = context.node_config
        if NODE_DATA in node:
            if NODE_CLIENT not in node:
                raise ConfigError(f"the node config has '{NODE_DATA}' but no '{NODE_CLIENT}' (use fedpdpo node)")
            on_bad = str(node.get(NODE_ON_BAD_RECORD, ""))
            if on_bad not in ("", "error", "skip"):
                raise ConfigError(f"node config '{NODE_ON_BAD_RECORD}' must be 'error' or 'skip', got {on_bad!r}")
            return cls(int(node[NODE_CLIENT]), str(node[NODE_DATA]), str(node.get(NODE_TEST, "")), on_bad)
        if NODE_PARTITION in node:
            return cls(int(node[NODE_PARTITION]))
        raise ConfigError(
            f"the node config names no data: start the node with `fedpdpo node --client-id N --data FILE` (node "
            f"config '{NODE_CLIENT}' + '{NODE_DATA}') or give it '{NODE_PARTITION}=N' for the shared data set"
        )


@dataclass
class ProcessSetup:
    """What this process has built for one run config: the model (shared by every client the process serves) and
    the clients it has served so far, tokenized."""

    cfg: RunConfig
    strategy: Strategy
    model: FedPDPOModel
    tokenizer: object
    initial: dict[str, torch.Tensor]
    partitions: list[ClientData] | None = None  # shared data: every partition, built on first use
    clients: dict[NodeClient, tuple[ClientData, ClientTask]] = field(default_factory=dict)


@dataclass
class NodeSetup:
    """What one node needs to run its client: the model, its data, its tokenized data and the round-0 tensors."""

    model: FedPDPOModel
    client: ClientData
    task: ClientTask
    initial: dict[str, torch.Tensor]


_CACHE: dict[str, ProcessSetup] = {}


def check_node_data(cfg: RunConfig, strategy: Strategy) -> None:
    """Refuse what cannot run on participants' own files (the server checks the same before it starts)."""
    if cfg.partition.conflict_fraction > 0:
        raise ConfigError(
            "config key 'partition.conflict_fraction' must be 0 when nodes hold their own data: a participant's "
            "file already holds its own preferences (swapping them is a simulation device)"
        )
    if type(strategy).prepare_clients is not Strategy.prepare_clients:
        raise ConfigError(
            f"algorithm {strategy.name!r} pools the clients' data, which nodes holding their own files never share"
        )


def _client_data(proc: ProcessSetup, node: NodeClient) -> ClientData:
    if node.data_path:
        check_node_data(proc.cfg, proc.strategy)
        cfg = proc.cfg
        if node.on_bad_record:
            on_bad: Literal["error", "skip"] = "skip" if node.on_bad_record == "skip" else "error"
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, on_bad_record=on_bad))
        return load_client_files(node.client_id, node.data_path, node.test_path, cfg)[0]
    if proc.partitions is None:
        proc.partitions = proc.strategy.prepare_clients(build_clients(proc.cfg)[0])
    if not 0 <= node.client_id < len(proc.partitions):
        raise ConfigError(f"partition-id {node.client_id} is outside 0..{len(proc.partitions) - 1} (num_clients)")
    return proc.partitions[node.client_id]


def node_setup(cfg_text: str, node: NodeClient) -> NodeSetup:
    """The model is built once per process and run config (a Ray actor serves several clients in turn, and a
    client's own tensors are loaded into the model at every call); each client's data is loaded and tokenized once
    (:func:`~fedpdpo.data.task.build_task`, the path every engine takes). Failures are not cached: a node whose file
    was fixed serves its next message."""
    if cfg_text not in _CACHE:
        _CACHE.clear()  # a new run: free the previous model
        cfg = config_from_text(cfg_text)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        model, tokenizer = build_model(cfg)
        _CACHE[cfg_text] = ProcessSetup(cfg, get_strategy(cfg.algorithm), model, tokenizer, model.initial_tensors())
    proc = _CACHE[cfg_text]
    if node not in proc.clients:
        client = _client_data(proc, node)
        proc.clients[node] = (client, build_task(client, proc.tokenizer, proc.cfg))
    client, task = proc.clients[node]
    return NodeSetup(proc.model, client, task, proc.initial)


def _store(context: Context, config: ConfigRecord) -> ClientStore:
    state_dir = context.node_config.get(NODE_STATE_DIR)
    if state_dir:
        return ClientStore(Path(str(state_dir)) / f"run-{config[KEY_RUN_ID]}")
    return ClientStore(str(config[KEY_STATE_ROOT]))


def _load_state(store: ClientStore, config: ConfigRecord, client_id: int, as_of_round: int):
    """The client's state as of ``as_of_round``, once it is found to be at least as new as the run saw it."""
    expected = int(config.get(KEY_STATE_ROUND, -1))
    have = store.latest_version(client_id, as_of_round)
    if expected >= 0 and (have is None or have < expected):
        found = f"holds its state of round {have}" if have is not None else "holds no trained state"
        raise StateMismatch(
            f"client {client_id}: {store.path(client_id)} {found}, but this run saw the client return its state of "
            f"round {expected}: the node's state directory was lost or replaced; restore it, or start a new run"
        )
    return store.load(client_id, as_of_round=as_of_round)


def _unpack(content: RecordDict, context: Context):
    config = content.config_records[CONFIG]
    node = NodeClient.of(context)
    if KEY_CLIENT in config and int(config[KEY_CLIENT]) != node.client_id:
        raise ConfigError(
            f"the server addressed client {config[KEY_CLIENT]} to this node, which holds client {node.client_id}"
        )
    setup = node_setup(str(config[KEY_RUN_CONFIG]), node)
    cfg = config_from_text(str(config[KEY_RUN_CONFIG]))
    shared = record_to_tensors(content.array_records[ARRAYS], cfg.transfer_dtype)
    return config, node.client_id, setup, shared, cfg


def dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod`` when the server asks for clipping (the key is in the config), else a no-op.

    The update (new shared - received shared) is clipped on the node, before it leaves, to L2 norm
    ``privacy.clipping_norm``; the server adds the Gaussian noise (see ``privacy.py``).
    """
    config = msg.content.config_records.get(CONFIG)
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def answer(msg: Message, context: Context, work: Callable[[RecordDict, Context], RecordDict]) -> Message:
    """``work``'s reply, or an error reply: a problem with the node's input is logged here as one line and its
    reason goes to the server (no traceback: the message says what and where); a non-finite loss likewise."""
    try:
        return Message(work(msg.content, context), reply_to=msg)
    except (FedPDPOError, FloatingPointError) as exc:
        log.error("%s", exc)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(exc)), reply_to=msg)


app = ClientApp()


def query_content(_content: RecordDict, context: Context) -> RecordDict:
    return RecordDict({INFO: ConfigRecord({KEY_CLIENT: NodeClient.of(context).client_id})})


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which fedpdpo client this node holds (its data is not read for that)."""
    return answer(msg, context, query_content)


def train_content(content: RecordDict, context: Context) -> RecordDict:
    """Train this node's client from the received shared tensors; the reply holds only the updated shared tensors."""
    config, cid, setup, shared, cfg = _unpack(content, context)
    server_round = int(config[KEY_ROUND])
    store = _store(context, config)
    state = _load_state(store, config, cid, server_round - 1)
    result = fit(setup.model, setup.task, state, shared, setup.initial, cfg, server_round, instructions=pick(config))
    store.save(cid, result.state, server_round)
    metrics = numeric_metrics(result.metrics)
    metrics[KEY_NUM_EXAMPLES] = result.num_examples
    return RecordDict({ARRAYS: tensors_to_record(result.shared), METRICS: metrics})


@app.train(mods=[dp_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    if RECORD_KEY_CONFIGS in msg.content.config_records:  # a SecAgg+ round (privacy.secagg; see secagg.py)
        return secaggplus_mod(msg, context, legacy_train(train_content))
    return answer(msg, context, train_content)


def evaluate_content(content: RecordDict, context: Context) -> RecordDict:
    config, cid, setup, shared, cfg = _unpack(content, context)
    store = _store(context, config)
    state = _load_state(store, config, cid, int(config[KEY_ROUND]))
    store.save_task_info(cid, setup.task.info)
    had_reference = bool(state.reference)
    metrics = evaluate(setup.model, setup.task, state, shared, setup.initial, cfg)
    metrics |= track_best(cfg, store, cid, int(config[KEY_ROUND]), metrics, shared)
    if not had_reference:
        store.save_reference(cid, state.reference)  # computed once, then cached on the node
    info = ConfigRecord(dict(setup.task.info) | {"conflict": setup.client.conflict})
    info["domains"] = list(setup.client.domains)
    return RecordDict({METRICS: MetricRecord(metrics), INFO: info})


@app.evaluate()
def evaluate_(msg: Message, context: Context) -> Message:
    return answer(msg, context, evaluate_content)
