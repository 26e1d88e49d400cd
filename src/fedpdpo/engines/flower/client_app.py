"""The Flower ClientApp: one fedpdpo client per SuperNode, running the same ``fit``/``evaluate`` as every engine.

The node's partition comes from its node config (``partition-id``, set by the simulation engine or by
``flower-supernode --node-config``). The client's private state (local modules, optimizer, reference log-probs) is
kept by a :class:`ClientStore` on the node's own disk: under ``state-dir`` from the node config when given (real
deployments), else under the directory the server names (simulation and loopback, where server and nodes share a
disk). It is not kept in Flower's ``Context.state``: that context is shipped between the SuperNode and the
ClientApp process with every message, and the personalized head alone is vocab x hidden floats.

The loaded model and tokenized partition are cached per process (a Ray actor keeps its process for the whole
simulation; a deployed SuperNode starts a fresh ClientApp process per message, so there the cache only saves work
within one message).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedpdpo.client.state import ClientStore
from fedpdpo.client.trainer import evaluate, fit
from fedpdpo.config import RunConfig
from fedpdpo.data import ClientData, build_clients
from fedpdpo.data.task import ClientTask, build_task
from fedpdpo.engines.flower.records import (
    ARRAYS,
    CONFIG,
    INFO,
    KEY_NUM_EXAMPLES,
    KEY_PARTITION,
    KEY_ROUND,
    KEY_RUN_CONFIG,
    KEY_STATE_ROOT,
    METRICS,
    config_from_text,
    numeric_metrics,
    record_to_tensors,
    tensors_to_record,
)
from fedpdpo.engines.flower.secagg import legacy_train
from fedpdpo.engines.setup import build_model
from fedpdpo.errors import ConfigError
from fedpdpo.instructions import pick
from fedpdpo.model import FedPDPOModel
from fedpdpo.strategies import get_strategy

log = logging.getLogger(__name__)


@dataclass
class ProcessSetup:
    """What this process has built for one run config: the model (shared by every partition the process serves) and
    the tokenized partitions it has served so far."""

    cfg: RunConfig
    model: FedPDPOModel
    tokenizer: object
    clients: list[ClientData]
    initial: dict[str, torch.Tensor]
    tasks: dict[int, ClientTask] = field(default_factory=dict)


@dataclass
class NodeSetup:
    """What one node needs to run its client: the model, its tokenized partition and the round-0 tensors."""

    model: FedPDPOModel
    client: ClientData
    task: ClientTask
    initial: dict[str, torch.Tensor]


_CACHE: dict[str, ProcessSetup] = {}


def partition_id(context: Context) -> int:
    if KEY_PARTITION not in context.node_config:
        raise ConfigError(f"SuperNode has no '{KEY_PARTITION}' in its node config (--node-config 'partition-id=N')")
    return int(context.node_config[KEY_PARTITION])


def node_setup(cfg_text: str, pid: int) -> NodeSetup:
    """The model is built once per process and run config (a Ray actor serves several partitions in turn, and a
    client's own tensors are loaded into the model at every call); each partition is tokenized once."""
    if cfg_text not in _CACHE:
        _CACHE.clear()  # a new run: free the previous model
        cfg = config_from_text(cfg_text)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        clients = get_strategy(cfg.algorithm).prepare_clients(build_clients(cfg)[0])
        model, tokenizer = build_model(cfg)
        _CACHE[cfg_text] = ProcessSetup(cfg, model, tokenizer, clients, model.initial_tensors())
    proc = _CACHE[cfg_text]
    if not 0 <= pid < len(proc.clients):
        raise ConfigError(f"partition-id {pid} is outside 0..{len(proc.clients) - 1} (num_clients)")
    if pid not in proc.tasks:
        proc.tasks[pid] = build_task(proc.clients[pid], proc.tokenizer, proc.cfg)
    return NodeSetup(proc.model, proc.clients[pid], proc.tasks[pid], proc.initial)


def _store(context: Context, config: ConfigRecord) -> ClientStore:
    return ClientStore(str(context.node_config.get("state-dir", config[KEY_STATE_ROOT])))


def _unpack(content: RecordDict, context: Context):
    config = content.config_records[CONFIG]
    pid = partition_id(context)
    setup = node_setup(str(config[KEY_RUN_CONFIG]), pid)
    cfg = config_from_text(str(config[KEY_RUN_CONFIG]))
    shared = record_to_tensors(content.array_records[ARRAYS], cfg.transfer_dtype)
    return config, pid, setup, shared, cfg


def dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod`` when the server asks for clipping (the key is in the config), else a no-op.

    The update (new shared - received shared) is clipped on the node, before it leaves, to L2 norm
    ``privacy.clipping_norm``; the server adds the Gaussian noise (see ``privacy.py``).
    """
    config = msg.content.config_records.get(CONFIG)
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition (fedpdpo client id) this node holds."""
    return Message(RecordDict({INFO: ConfigRecord({KEY_PARTITION: partition_id(context)})}), reply_to=msg)


def train_content(content: RecordDict, context: Context) -> RecordDict:
    """Train this node's client from the received shared tensors; the reply holds only the updated shared tensors."""
    config, pid, setup, shared, cfg = _unpack(content, context)
    server_round = int(config[KEY_ROUND])
    store = _store(context, config)
    state = store.load(pid, as_of_round=server_round - 1)
    result = fit(setup.model, setup.task, state, shared, setup.initial, cfg, server_round, instructions=pick(config))
    store.save(pid, result.state, server_round)
    metrics = numeric_metrics(result.metrics)
    metrics[KEY_NUM_EXAMPLES] = result.num_examples
    return RecordDict({ARRAYS: tensors_to_record(result.shared), METRICS: metrics})


@app.train(mods=[dp_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    if RECORD_KEY_CONFIGS in msg.content.config_records:  # a SecAgg+ round (privacy.secagg; see secagg.py)
        return secaggplus_mod(msg, context, legacy_train(train_content))
    try:
        return Message(train_content(msg.content, context), reply_to=msg)
    except FloatingPointError as exc:
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(exc)), reply_to=msg)


@app.evaluate()
def evaluate_(msg: Message, context: Context) -> Message:
    config, pid, setup, shared, cfg = _unpack(msg.content, context)
    store = _store(context, config)
    state = store.load(pid, as_of_round=int(config[KEY_ROUND]))
    store.save_task_info(pid, setup.task.info)
    had_reference = bool(state.reference)
    metrics = evaluate(setup.model, setup.task, state, shared, setup.initial, cfg)
    if not had_reference:
        store.save_reference(pid, state.reference)  # computed once, then cached on the node
    info = ConfigRecord(dict(setup.task.info) | {"conflict": setup.client.conflict})
    info["domains"] = list(setup.client.domains)
    return Message(RecordDict({METRICS: MetricRecord(metrics), INFO: info}), reply_to=msg)
