"""Secure aggregation of the shared update with Flower's SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod``).

With ``privacy.secagg`` the server never sees one client's shared tensors: each sampled node masks its
sample-weighted tensors with pairwise and private masks, and the server can only unmask their sum. Flower 1.42
ships SecAgg+ for the *legacy* server API only: the workflow needs a ``LegacyContext`` with a legacy
``flwr.server.strategy.Strategy`` (``configure_fit`` / ``aggregate_fit`` with ``FitIns``/``FitRes``) and the
ClientApp's reply in the legacy ``FitRes`` record layout. This module adapts both ends, one round at a time:

* server: :func:`secure_fit` runs the workflow for one round with :class:`_RoundStrategy`, which hands the
  sampled nodes their ``FitIns`` (shared tensors as ordered arrays, names and run config in the config) and keeps
  what ``aggregate_fit`` receives: per-client ``FitRes`` whose parameters Flower has already replaced by the
  unmasked weighted average;
* client: :func:`legacy_train` turns the ``FitIns`` into fedpdpo's train content and the reply into a ``FitRes``;
  ``secaggplus_mod`` (run by the ClientApp when the message carries SecAgg+ configs) does the masking.

Costs and limits: four message rounds per training round instead of one (in a deployment each starts a ClientApp
process); parameters are clipped to +-``CLIPPING_RANGE`` and quantized to 2**22 levels, so the aggregate equals
plain FedAvg up to ~1e-5; at least 2 clients per round, and a dropped client can be recovered only while enough of
its neighbours remain (with 2 clients, none can drop). DP clipping (``fixedclipping_mod``) is not combined with it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedpdpo.engines.flower.records import ARRAYS, CONFIG, KEY_NUM_EXAMPLES, METRICS

KEY_NAMES = "shared-names"  # newline-separated tensor names: legacy Parameters are an ordered list without names
CLIPPING_RANGE = 8.0  # SecAgg+ clips every parameter value to [-8, 8] before quantizing


class _RoundStrategy(LegacyStrategy):
    """The legacy strategy interface that ``SecAggPlusWorkflow`` drives, for one round: hand out, then keep."""

    def __init__(self, proxies: list[ClientProxy], config: dict[str, Any]) -> None:
        self.proxies = proxies
        self.config = config
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.failures: list[Any] = []

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        return [(proxy, FitIns(parameters, dict(self.config))) for proxy in self.proxies]

    def aggregate_fit(self, server_round: int, results, failures):
        self.results, self.failures = list(results), list(failures)
        return (results[0][1].parameters if results else None), {}

    # evaluation goes through fedpdpo's own evaluate messages, never through this strategy
    def initialize_parameters(self, client_manager: ClientManager) -> None:
        return None

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        return []

    def aggregate_evaluate(self, server_round: int, results, failures):
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters):
        return None


def secure_fit(
    grid: Grid,
    server_round: int,
    nodes: list[int],
    shared: dict[str, torch.Tensor],
    config: dict[str, Any],
    max_weight: float,
    timeout: float | None,
) -> tuple[dict[str, torch.Tensor] | None, dict[int, tuple[int, dict[str, float]]]]:
    """One SecAgg+ training round on ``nodes``: (the weighted average of their tensors, or None when the protocol
    could not finish; node id -> (num_examples, metrics) of each node that contributed)."""
    names = list(shared)
    proxies = [GridClientProxy(node, grid, grid.run.run_id) for node in nodes]
    strategy = _RoundStrategy(proxies, config | {KEY_NAMES: "\n".join(names)})
    context = LegacyContext(
        Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        strategy=strategy,
        client_manager=SimpleClientManager(),
    )
    params = ndarrays_to_parameters([shared[n].detach().cpu().float().numpy() for n in names])
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(params, keep_input=True)
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,
        reconstruction_threshold=0.5,
        max_weight=max_weight,
        clipping_range=CLIPPING_RANGE,
        timeout=timeout,
    )
    workflow(grid, context)
    if not strategy.results:
        return None, {}
    arrays = parameters_to_ndarrays(strategy.results[0][1].parameters)
    aggregate = {
        n: torch.from_numpy(np.array(a, dtype=np.float32)).reshape(shared[n].shape)
        for n, a in zip(names, arrays, strict=True)
    }
    contributed = {
        proxy.node_id: (int(res.num_examples), {k: float(v) for k, v in res.metrics.items()})
        for proxy, res in strategy.results
    }
    return aggregate, contributed


def legacy_train(train_content):
    """Wrap fedpdpo's ``train_content(content, context) -> RecordDict`` as a handler of legacy ``FitIns`` messages."""

    def handler(msg: Message, context: Context) -> Message:
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        config = dict(fitins.config)
        names = str(config.pop(KEY_NAMES)).split("\n")
        arrays = parameters_to_ndarrays(fitins.parameters)
        tensors = {n: torch.from_numpy(np.array(a, dtype=np.float32)) for n, a in zip(names, arrays, strict=True)}
        content = RecordDict({ARRAYS: ArrayRecord(torch_state_dict=tensors), CONFIG: ConfigRecord(config)})
        reply = train_content(content, context)
        metrics = {k: float(v) for k, v in reply[METRICS].items()}
        n = int(metrics.pop(KEY_NUM_EXAMPLES))
        updated = reply[ARRAYS].to_torch_state_dict()
        parameters = ndarrays_to_parameters([updated[name].numpy() for name in names])
        fitres = FitRes(Status(Code.OK, ""), parameters, n, metrics)
        return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)

    return handler
