"""Experiment tracking the way transformers and TRL do it: ``report_to = ["tensorboard", "trackio", "wandb"]``.

The server loop (:func:`fedpdpo.engines.server.run_server`, so every engine) hands each tracker

* every local training step's loss, as ``step/train_loss`` over the run's step count (``train_step``);
* after each evaluation, every client's held-out metrics and the training metrics of its round, as
  ``round/client_<id>/<metric>``, and their mean over clients as ``round/mean/<metric>``, over ``round``.

Each backend is an optional package (``pip install 'fedpdpo[tracking]'`` for TensorBoard); none is required unless
named, and a named backend that is not installed stops the run before it starts, with the command that installs it.
TensorBoard writes to ``OUT/tensorboard`` (``tensorboard --logdir OUT/tensorboard``); trackio and wandb to their own
places (trackio: a local project ``fedpdpo`` unless ``TRACKIO_PROJECT`` names another; wandb: project
``WANDB_PROJECT`` or ``fedpdpo``, honouring ``WANDB_MODE=offline``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from fedpdpo.config import TRACKERS
from fedpdpo.errors import ConfigError

#: backend -> (the module it needs, the pip requirement that installs it)
BACKENDS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "fedpdpo[tracking]"),
    "trackio": ("trackio", "trackio"),
    "wandb": ("wandb", "wandb"),
}
assert tuple(BACKENDS) == TRACKERS
TENSORBOARD_DIR = "tensorboard"
#: Per-round metrics a tracker receives, besides every ``train/...`` metric of the client's round.
EVAL_KEYS = (
    "accuracy",
    "accuracy_implicit",
    "accuracy_explicit",
    "accuracy_combined",
    "accuracy_logp",
    "reward_margin",
    "explicit_margin",
    "loss",
)


class Tracker(Protocol):
    def log(self, metrics: Mapping[str, float], axis: str, step: int) -> None:
        """Log ``metrics`` at ``step`` of ``axis`` ("round" or "train_step")."""
        ...

    def close(self) -> None: ...


def check_backends(names: Sequence[str]) -> None:
    """Refuse unknown backends and ones whose package is not installed (before anything runs)."""
    for name in names:
        if name not in BACKENDS:
            raise ConfigError(f"config key 'report_to' names {name!r}; known: {', '.join(BACKENDS)}")
        module, requirement = BACKENDS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"config key 'report_to' names {name!r}, but the {module} package is not installed; "
                f"install it with `pip install '{requirement}'`, or drop it from report_to"
            )


class TensorBoardTracker:
    def __init__(self, out: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR))

    def log(self, metrics: Mapping[str, float], axis: str, step: int) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class TrackioTracker:
    def __init__(self, run_name: str, config: dict[str, Any]) -> None:
        self.trackio = importlib.import_module("trackio")
        project = os.environ.get("TRACKIO_PROJECT") or "fedpdpo"
        self.trackio.init(project=project, name=run_name, config=config)

    def log(self, metrics: Mapping[str, float], axis: str, step: int) -> None:
        self.trackio.log({**metrics, axis: step})

    def close(self) -> None:
        self.trackio.finish()


class WandbTracker:
    def __init__(self, out: Path, run_name: str, config: dict[str, Any]) -> None:
        wandb = importlib.import_module("wandb")
        project = os.environ.get("WANDB_PROJECT") or "fedpdpo"
        self.run = wandb.init(project=project, name=run_name, config=config, dir=str(out))
        # two x axes, as wandb expects them declared: rounds for per-round metrics, steps for the training loss
        for axis, pattern in (("round", "round/*"), ("train_step", "step/*")):
            self.run.define_metric(axis)
            self.run.define_metric(pattern, step_metric=axis)

    def log(self, metrics: Mapping[str, float], axis: str, step: int) -> None:
        self.run.log({**metrics, axis: step})

    def close(self) -> None:
        self.run.finish()


def _open(name: str, out: Path, run_name: str, config: dict[str, Any]) -> Tracker:
    if name == "tensorboard":
        return TensorBoardTracker(out)
    if name == "trackio":
        return TrackioTracker(run_name, config)
    return WandbTracker(out, run_name, config)


def round_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """What a tracker logs for one evaluation: each client's metrics and their mean over clients."""
    per_client: dict[str, dict[str, float]] = {}
    for row in rows:
        values = {
            key: float(value)
            for key, value in row.items()
            if (key in EVAL_KEYS or key.startswith("train/")) and isinstance(value, int | float)
        }
        per_client[str(row["client"])] = values
    metrics = {f"round/client_{c}/{k}": v for c, values in per_client.items() for k, v in values.items()}
    for key in sorted({k for values in per_client.values() for k in values}):
        present = [values[key] for values in per_client.values() if key in values]
        metrics[f"round/mean/{key}"] = statistics.fmean(present)
    return metrics


class Trackers:
    """The run's trackers, fed by the server loop; none when ``report_to`` is empty."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers
        self.steps = 0

    def step(self, loss: float) -> None:
        self.steps += 1
        for t in self.trackers:
            t.log({"step/train_loss": loss}, "train_step", self.steps)

    def evaluated(self, server_round: int, rows: Sequence[Mapping[str, Any]]) -> None:
        if self.trackers and rows:
            metrics = round_metrics(rows)
            for t in self.trackers:
                t.log(metrics, "round", server_round)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def open_trackers(names: Sequence[str], out: Path, run_name: str, config: dict[str, Any]) -> Trackers:
    """Start the backends in ``names`` for a run writing to ``out`` (``config``: the run's settings, recorded by the
    backends that keep them)."""
    check_backends(names)
    return Trackers([_open(name, out, run_name, config) for name in dict.fromkeys(names)])
