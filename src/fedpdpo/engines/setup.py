"""Everything an engine needs before round 1, built the same way by every engine (same seed, same tensors)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fedpdpo.client.trainer import device_of
from fedpdpo.config import RunConfig
from fedpdpo.data import ClientData, build_clients
from fedpdpo.data.task import ClientTask, build_task
from fedpdpo.errors import ConfigError
from fedpdpo.model import FedPDPOModel, load_backbone
from fedpdpo.strategies import Strategy, get_strategy
from fedpdpo.timing import phase

log = logging.getLogger(__name__)


@dataclass
class RunSetup:
    cfg: RunConfig  # the model's config: the run's config with the strategy's module switches (``configure``)
    strategy: Strategy
    model: FedPDPOModel
    tokenizer: Any  # a transformers tokenizer
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
    every process); ``cfg`` is a model config (see :func:`resolve`). A 4-bit backbone is loaded onto its GPU, and
    the whole model is moved there."""
    if cfg.model_quantization == "none":
        backbone, tokenizer = load_backbone(cfg.model)
    else:
        check_quantization(cfg)
        device = device_of(cfg)
        backbone, tokenizer = load_backbone(cfg.model, quantization=cfg.model_quantization, device=device)
    torch.manual_seed(cfg.seed)
    model = FedPDPOModel(backbone, cfg.lora, cfg.method, cfg.perf)
    if cfg.model_quantization != "none":
        model.to(device)
    return model, tokenizer


def check_quantization(cfg: RunConfig) -> None:
    """Refuse a quantized backbone where it cannot run, before anything is written: bitsandbytes' 4-bit kernels need
    a CUDA device and the ``quant`` extra."""
    if cfg.model_quantization == "none":
        return
    device = device_of(cfg)
    if device.type != "cuda":
        raise ConfigError(
            f"config key 'model_quantization' is {cfg.model_quantization!r}, which needs a CUDA GPU (bitsandbytes), "
            f'but the run\'s device is {device.type}; use model_quantization = "none"'
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"config key 'model_quantization' is {cfg.model_quantization!r}, but bitsandbytes is not installed; "
            "install it with `pip install 'fedpdpo[quant]'`"
        ) from None


def check_device(device: str) -> None:
    """Refuse a CUDA device this machine does not have before anything is written (it would fail at round 0)."""
    if not device.startswith("cuda"):
        return
    index = int(device.partition(":")[2] or 0)
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ConfigError(f'config key \'device\' is {device!r}, but {why}; use device = "auto" or "cpu"')
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"config key 'device' is {device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s) "
            '(cuda:0 ...); use another index or device = "auto"'
        )


def build_setup(cfg: RunConfig, on_stage: Callable[[str], None] | None = None) -> RunSetup:
    """Data, model and tasks of a run; ``on_stage`` hears what is being done (for the progress display)."""
    stage = on_stage or (lambda _text: None)
    strategy, cfg = resolve(cfg)
    check_device(cfg.device)
    check_quantization(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    stage("reading and partitioning the data")
    with phase("data"):
        clients = strategy.prepare_clients(build_clients(cfg)[0])
    stage(f"loading the model {cfg.model!r}")
    with phase("model load"):
        model, tokenizer = build_model(cfg)
    stage("tokenizing")
    with phase("tokenization"):
        tasks = [build_task(c, tokenizer, cfg) for c in clients]
    initial = model.initial_tensors()
    shared = strategy.shared_names(list(initial))
    if not shared and strategy.name != "local":
        log.warning("strategy %s shares no tensors", strategy.name)
    return RunSetup(cfg, strategy, model, tokenizer, clients, tasks, initial, shared)
