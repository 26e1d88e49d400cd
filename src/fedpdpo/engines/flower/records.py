"""How fedpdpo's tensors, config and metrics travel in Flower messages.

A train message holds exactly one ``ArrayRecord`` (the strategy's shared tensors, nothing else) and one
``ConfigRecord`` (round, resolved run config as TOML text, optional clipping norm). Keeping to one record of each
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
KEY_PARTITION = "partition-id"


def config_text(cfg: RunConfig) -> str:
    return tomli_w.dumps(config_to_dict(cfg))


def config_from_text(text: str) -> RunConfig:
    return config_from_dict(tomllib.loads(text))


def tensors_to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """fp32 CPU copies in a fixed order (ArrayRecord cannot hold bf16; the clipping mod compares key order)."""
    return ArrayRecord(
        torch_state_dict={k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    )


def record_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def instruction(
    shared: dict[str, torch.Tensor], cfg_text: str, server_round: int, state_root: str, extra: dict[str, Any]
) -> RecordDict:
    config = {KEY_ROUND: server_round, KEY_RUN_CONFIG: cfg_text, KEY_STATE_ROOT: state_root} | extra
    return RecordDict({ARRAYS: tensors_to_record(shared), CONFIG: ConfigRecord(config)})


def numeric_metrics(metrics: dict[str, Any]) -> MetricRecord:
    return MetricRecord(
        {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    )
