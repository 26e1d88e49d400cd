"""Server checkpoints: everything the server loop needs to continue a run exactly after a completed round.

One file, ``OUT/checkpoint.pt``, rewritten atomically (temporary file + fsync + rename) after round 0's evaluation
and after every round, so a kill at any moment leaves the last complete checkpoint. It holds:

* the round counter and the global shared tensors;
* the strategy's server-side state (its ``state_dict()``, e.g. FedAdam's moments);
* the process RNG states (torch, numpy, random), for anything that draws from global generators;
* how many lines of ``metrics.jsonl`` belong to the checkpointed rounds (later lines are dropped on resume), the
  per-client descriptions, the updates rejected so far, and the elapsed time;
* a fingerprint of the resolved config and of each client's state as of the round, which a resume compares with
  the directory (:mod:`fedpdpo.engines.fingerprint`), and the engine that ran it;
* the run's id and, per client, the last round whose trained state it returned (``RunRecord``: remote nodes keep
  each run's state apart by the id and check their state against those rounds).

Clients' private state is not in this file: each client versions its own state by round (see
:mod:`fedpdpo.client.state`) and a client training in round ``r`` loads its state as of round ``r - 1``, so the
server checkpoint of round ``r - 1`` and the clients' stores agree without the server ever seeing client state.
This keeps the mechanism transport-independent: the Flower engines resume through the same server loop.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpdpo.client.state import atomic_write
from fedpdpo.errors import FedPDPOError

CHECKPOINT_FILE = "checkpoint.pt"
CLIENTS_DIR = "clients"  # OUT/clients/client_<id>: the clients' private state (simulation engines)
FORMAT_VERSION = 1


@dataclass
class ServerCheckpoint:
    """The server's state after ``server_round`` (0 = after the initial evaluation)."""

    server_round: int
    global_shared: dict[str, torch.Tensor]
    strategy_state: dict[str, Any]
    client_info: dict[int, dict[str, Any]]
    metrics_lines: int
    elapsed_s: float
    rejected: list[dict[str, Any]] = field(default_factory=list)
    rng: dict[str, Any] = field(default_factory=dict)
    # what the run looked like at this checkpoint (config, clients' state), checked on resume: engines/fingerprint.py
    fingerprint: dict[str, Any] = field(default_factory=dict)
    run_id: str = ""
    state_rounds: dict[int, int] = field(default_factory=dict)


def capture_rng() -> dict[str, Any]:
    """The global RNG states, as tensors and plain values (loadable with ``torch.load(weights_only=True)``)."""
    legacy = np.random.get_state()
    assert isinstance(legacy, tuple)  # the legacy layout, numpy's default
    kind, keys, pos, has_gauss, cached = legacy
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)}
        | {"has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": json.dumps(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, ckpt: ServerCheckpoint) -> None:
    blob = {
        "format": FORMAT_VERSION,
        "server_round": ckpt.server_round,
        "global_shared": {k: v.detach().cpu().contiguous() for k, v in ckpt.global_shared.items()},
        "strategy_state": ckpt.strategy_state,
        # JSON for the free-form parts, so the file loads with weights_only=True (no arbitrary pickles)
        "client_info": json.dumps({str(k): v for k, v in ckpt.client_info.items()}),
        "rejected": json.dumps(ckpt.rejected),
        "metrics_lines": ckpt.metrics_lines,
        "elapsed_s": ckpt.elapsed_s,
        "rng": ckpt.rng,
        "fingerprint": json.dumps(ckpt.fingerprint),
        "run_id": ckpt.run_id,
        "state_rounds": json.dumps({str(k): v for k, v in ckpt.state_rounds.items()}),
    }
    atomic_write(out / CHECKPOINT_FILE, lambda p: torch.save(blob, p))


def load_checkpoint(out: Path) -> ServerCheckpoint | None:
    """The last complete checkpoint in ``out``, or None when the run was killed before its first one."""
    path = out / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise FedPDPOError(
            f"{path} cannot be read ({exc}); it was not written by this version of fedpdpo. "
            "Start the run again in a new --out directory"
        ) from None
    if blob.get("format") != FORMAT_VERSION:
        raise FedPDPOError(
            f"{path} has checkpoint format {blob.get('format')}, this fedpdpo reads format {FORMAT_VERSION}; "
            "resume it with the fedpdpo version that wrote it"
        )
    return ServerCheckpoint(
        server_round=int(blob["server_round"]),
        global_shared=blob["global_shared"],
        strategy_state=blob["strategy_state"],
        client_info={int(k): v for k, v in json.loads(blob["client_info"]).items()},
        metrics_lines=int(blob["metrics_lines"]),
        elapsed_s=float(blob["elapsed_s"]),
        rejected=json.loads(blob["rejected"]),
        rng=blob["rng"],
        fingerprint=json.loads(blob.get("fingerprint", "{}")),
        run_id=str(blob.get("run_id", "")),
        state_rounds={int(k): int(v) for k, v in json.loads(blob.get("state_rounds", "{}")).items()},
    )


def rewind_metrics(out: Path, n_lines: int) -> None:
    """Keep the first ``n_lines`` of ``metrics.jsonl``: rows of rounds after the checkpoint are recomputed."""
    path = out / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []
    if len(lines) < n_lines:
        raise FedPDPOError(
            f"{path} has {len(lines)} lines but the checkpoint in {out} covers {n_lines}; the run directory was "
            "modified by hand, so it cannot be resumed exactly. Start the run again in a new --out directory"
        )
    if len(lines) > n_lines or not path.exists():
        atomic_write(path, lambda p: Path(p).write_text("".join(lines[:n_lines]), encoding="utf-8"))


def clear_run_state(out: Path) -> None:
    """Remove the checkpoint and the clients' state of a run being replaced (``--overwrite``)."""
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    shutil.rmtree(out / CLIENTS_DIR, ignore_errors=True)
