"""Which round's model a client ends with: ``select_round = "best_val"`` keeps its best on its own validation pairs.

With a fixed budget, the local modules overfit a client's few pairs after some rounds (docs/results.md: on
``imdb-3c-full`` the test accuracy peaked at round 3 of 6 and fell 5 points by the end). No single round count suits
every client and data set, and only the client can tell: its validation pairs are held out from its own training
pairs and never leave it. So after each round's evaluation the client compares its validation accuracy (by the
score it ranks by and by its policy's implicit reward, averaged: :func:`validation_accuracy`) with the best so far,
and when it is at least as high (ties go to the later round, which has seen more data) keeps a *snapshot*: the
shared tensors it was evaluated with and its local modules of then. The snapshot is what a finished run's
``evaluate``, ``export`` and ``generate`` rebuild (:func:`load_final`), and its round is the row the summary reports
for the client (``best_round`` in the metrics).

On disk: ``client_<id>/best/round_<r>/`` with ``shared.safetensors``, ``best.json`` and the local tensors as a hard
link to the version file of that round (no copy while the version exists; it stays when the version is pruned).
A snapshot is written to a temporary directory and renamed into place before the older one is deleted, so a kill
leaves at least one complete snapshot; the newest complete one counts. Because a round's evaluation is
deterministic, a resumed run that evaluates a round again writes the same snapshot again.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedpdpo.client.state import (
    BEST_DIR,
    COMPACT_FILE,
    DAMAGED,
    LOCAL_FILE,
    VERSION_PREFIX,
    ClientState,
    ClientStore,
    atomic_dir,
    link_or_copy,
    read_checked,
)
from fedpdpo.client.trainer import SCORES
from fedpdpo.config import RunConfig

SHARED_FILE = "shared.safetensors"
META_FILE = "best.json"


@dataclass(frozen=True)
class Snapshot:
    round: int  # the server round whose evaluation it is
    val_accuracy: float | None  # None: the client has no validation pairs (it then keeps the latest round)
    path: Path


def validation_accuracy(metrics: dict[str, Any]) -> float | None:
    """What a round's model is judged by: the mean of the client's validation accuracy by the score it ranks by and
    by its policy's implicit reward (None without validation pairs).

    Both, because the personalized model is a scorer *and* the policy that generates: on the demo the reward head
    ranks the validation pairs best after round 1, when the policy has barely moved (implicit 44-64 %), and a
    selection by the score alone would keep that early policy. Strategies whose only score is the implicit one
    (FedAvg) are judged by it alone."""
    if "selected_score" not in metrics:
        return None
    values = [
        metrics.get(f"val/accuracy_{SCORES[int(metrics['selected_score'])]}"),
        metrics.get("val/accuracy_implicit"),
    ]
    present = [float(v) for v in values if v is not None]
    return sum(present) / len(present) if present else None


def best_snapshot(store: ClientStore, client_id: int) -> Snapshot | None:
    """The client's kept snapshot (the newest complete one), or None when it has none."""
    parent = store.path(client_id) / BEST_DIR
    for path in sorted(parent.glob(f"{VERSION_PREFIX}*"), reverse=True):
        if (path / META_FILE).is_file():
            meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
            return Snapshot(int(meta["round"]), meta["val_accuracy"], path)
    return None


def track_best(
    cfg: RunConfig,
    store: ClientStore,
    client_id: int,
    server_round: int,
    metrics: dict[str, Any],
    shared: dict[str, torch.Tensor],
) -> dict[str, float]:
    """What every engine calls after a client's evaluation: with ``select_round = "best_val"``, keep the snapshot
    if it is the best yet and report the kept round as ``best_round`` (trained rounds only: round 0 is the start)."""
    if cfg.select_round != "best_val" or server_round < 1:
        return {}
    return {"best_round": float(keep_if_best(store, client_id, server_round, metrics, shared))}


def keep_if_best(
    store: ClientStore, client_id: int, server_round: int, metrics: dict[str, Any], shared: dict[str, torch.Tensor]
) -> int:
    """After the client's evaluation of ``server_round`` (with ``shared``, giving ``metrics``): keep this round's
    model when it ranks the validation pairs at least as well as the kept one. Returns the round now kept."""
    value = validation_accuracy(metrics)
    kept = best_snapshot(store, client_id)
    if kept is not None and kept.round != server_round and below(value, kept.val_accuracy):
        return kept.round
    _write(store, client_id, server_round, value, shared)
    return server_round


def below(value: float | None, best: float | None) -> bool:
    """Whether ``value`` is below ``best``; a round without a figure (no validation pairs) is no evidence either way."""
    return value is not None and best is not None and value < best


def _write(
    store: ClientStore, client_id: int, server_round: int, value: float | None, shared: dict[str, torch.Tensor]
) -> None:
    version = store.latest_version(client_id, server_round)

    def fill(tmp: Path) -> None:
        if version is not None:  # the local modules it was evaluated with (none before its first training)
            source = store.version_dir(client_id, version)
            for name in (LOCAL_FILE, COMPACT_FILE):
                if (source / name).is_file():
                    link_or_copy(source / name, tmp / name)
                    break
        save_file({k: v.detach().float().cpu().contiguous() for k, v in shared.items()}, tmp / SHARED_FILE)
        meta = {"round": server_round, "version": version, "val_accuracy": value}
        (tmp / META_FILE).write_text(json.dumps(meta), encoding="utf-8")

    target = store.path(client_id) / BEST_DIR / f"{VERSION_PREFIX}{server_round:05d}"
    atomic_dir(target, fill)
    for old in target.parent.iterdir():  # older snapshots, and one being written when a run was killed
        if old != target:
            shutil.rmtree(old, ignore_errors=True)


def load_final(
    store: ClientStore, client_id: int, global_: dict[str, torch.Tensor]
) -> tuple[ClientState, dict[str, torch.Tensor]]:
    """What a finished run's client ends with: its kept snapshot's local tensors and shared tensors when it has one
    (``select_round = "best_val"``), else its newest local tensors and the final global shared tensors."""
    kept = best_snapshot(store, client_id)
    if kept is None:
        return store.load(client_id, optimizer=False), global_
    state = ClientState(local=store.read_local(kept.path), reference=store.reference(client_id))
    return state, read_checked(kept.path / SHARED_FILE, load_file, DAMAGED)
