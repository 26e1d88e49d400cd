"""How fedpdpo's tensors, config and metrics travel in Flower messages.

A train message holds exactly one ``ArrayRecord`` (the strategy's shared tensors, nothing else) and one
``ConfigRecord`` (round, the model's run config as TOML text, the run's id, the client addressed and the last round
whose trained state it returned, the strategy's instructions for the round such as ``proximal-mu``, optional
clipping norm). Keeping to one record of each
kind is what Flower's ``fixedclipping_mod`` requires, so the same messages work with and without DP. Replies carry
the updated shared tensors and a ``MetricRecord``; evaluation replies add a ``ConfigRecord`` with the
non-numeric client facts (domains, conflict flag) that the summary lists.
"""

from __future__ import annotations

import tomllib
from typing import Any

import tomli_w
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpdpo.config import RunConfig, config_from_dict, config_to_dict

ARRAYS = "shared"
CONFIG = "config"
METRICS = "metrics"
INFO = "info"

KEY_ROUND = "server-round"
KEY_RUN_CONFIG = "run-config"
KEY_STATE_ROOT = "state-root"
KEY_NUM_EXAMPLES = "num-examples"
KEY_RUN_ID = "run-id"
KEY_CLIENT = "client-id"  # in messages: the client addressed; in a query reply: the client the node holds
KEY_STATE_ROUND = "state-round"  # the last round whose trained state the client returned (-1: none)

# Node config keys (``--node-config``, set by ``fedpdpo node`` and the simulation engine).
NODE_PARTITION = "partition-id"  # shared data: serve this partition of the run config's data.path
NODE_CLIENT = "client-id"  # node-local data: this node's client id ...
NODE_DATA = "data-path"  # ... and its own data file
NODE_TEST = "test-path"  # ... and optionally its test file
NODE_ON_BAD_RECORD = "on-bad-record"  # ... and what to do with its bad records (default: the run config's)
NODE_STATE_DIR = "state-dir"  # where the node keeps its clients' state (one subdirectory per run)


def config_text(cfg: RunConfig) -> str:
    return tomli_w.dumps(config_to_dict(cfg))


def config_from_text(text: str) -> RunConfig:
    return config_from_dict(tomllib.loads(text))


def tensors_to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """CPU copies in a fixed order (the clipping mod compares key order), in their own dtype (fp32 or fp16, see
    ``transfer_dtype``); ArrayRecord has no bf16, so bf16 tensors travel as their int16 bit pattern."""
    out = {}
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        out[k] = v.view(torch.int16) if v.dtype == torch.bfloat16 else v
    return ArrayRecord(torch_state_dict=out)


def record_to_tensors(record: ArrayRecord, transfer_dtype: str = "float32") -> dict[str, torch.Tensor]:
    """The tensors of ``record``; bf16 bit patterns (``transfer_dtype = "bfloat16"``) are viewed back as bf16."""
    tensors = {k: v.clone() for k, v in record.to_torch_state_dict().items()}
    if transfer_dtype == "bfloat16":
        tensors = {k: v.view(torch.bfloat16) if v.dtype == torch.int16 else v for k, v in tensors.items()}
    return tensors


def instruction(arrays: ArrayRecord, config: dict[str, Any]) -> RecordDict:
    return RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(config)})


def numeric_metrics(metrics: dict[str, Any]) -> MetricRecord:
    return MetricRecord(
        {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    )
