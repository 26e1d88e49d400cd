"""Everything an engine needs before round 1, built the same way by every engine (same seed, same tensors)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fedpdpo.client.trainer import ClientTask
from fedpdpo.config import RunConfig
from fedpdpo.data import ClientData, PairTokenizer, build_clients
from fedpdpo.data.lengths import check_prompt_lengths
from fedpdpo.model import FedPDPOModel, load_backbone
from fedpdpo.strategies import Strategy, get_strategy

log = logging.getLogger(__name__)


@dataclass
class RunSetup:
    cfg: RunConfig  # the model's config: the run's config with the strategy's module switches (``configure``)
    strategy: Strategy
    model: FedPDPOModel
    tokenizer: object
    clients: list[ClientData]
    tasks: list[ClientTask]
    initial: dict[str, torch.Tensor]  # round-0 values of every trainable tensor
    shared_names: list[str]

    def initial_global(self) -> dict[str, torch.Tensor]:
        return {n: self.initial[n].clone() for n in self.shared_names}


def resolve(cfg: RunConfig) -> tuple[Strategy, RunConfig]:
    """The run's strategy (with the parameters ``cfg`` sets for it) and the config its model is built from.

    ``cfg`` itself is not changed: it is what ``config.toml`` records and what a resumed run starts from again."""
    strategy = get_strategy(cfg.algorithm, cfg)
    model_cfg = strategy.configure(cfg)
    model_cfg.validate()
    return strategy, model_cfg


def build_model(cfg: RunConfig) -> tuple[FedPDPOModel, object]:
    """Backbone + LoRA + the local modules ``cfg.method`` switches on, initialised from ``cfg.seed`` (identical in
    every process); ``cfg`` is a model config (see :func:`resolve`)."""
    backbone, tokenizer = load_backbone(cfg.model)
    torch.manual_seed(cfg.seed)
    return FedPDPOModel(backbone, cfg.lora, cfg.method, cfg.perf), tokenizer


def tokenize_clients(clients: list[ClientData], tokenizer, cfg: RunConfig) -> list[ClientTask]:
    pair_tok = PairTokenizer(tokenizer, cfg.max_length, cfg.data.max_prompt_length)
    return [
        ClientTask(c.client_id, pair_tok.encode_all(c.train), pair_tok.encode_all(c.test), pair_tok.pad_id)
        for c in clients
    ]


def build_setup(cfg: RunConfig) -> RunSetup:
    strategy, cfg = resolve(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    clients = strategy.prepare_clients(build_clients(cfg)[0])
    model, tokenizer = build_model(cfg)
    clients = check_prompt_lengths(clients, tokenizer, cfg.max_length, cfg.data.on_bad_record)
    tasks = tokenize_clients(clients, tokenizer, cfg)
    initial = model.initial_tensors()
    shared = strategy.shared_names(list(initial))
    if not shared and strategy.name != "local":
        log.warning("strategy %s shares no tensors", strategy.name)
    return RunSetup(cfg, strategy, model, tokenizer, clients, tasks, initial, shared)
