"""What a checkpoint records about its run, so that a resume can tell it continues the same run.

A resumed run is exact only if it starts from what the checkpoint saw: the same resolved config and each client's
state as of the checkpointed round. Both can change behind fedpdpo's back (config.toml edited by hand, a client
directory deleted or copied from another run), and the run would then continue silently as a hybrid of two. So the
checkpoint stores

* ``config``: every setting of the resolved config, by dotted key;
* ``clients`` (engines that keep client state in the run directory): per client, the round of the state version it
  holds as of the checkpoint and a SHA-256 of each file of that version (local modules, optimizer state); a finished
  run's compacted local tensors count as the file they were made from (``ClientStore.finalize``);

and :func:`check_resume` compares them with the directory before anything runs. The reference log-prob cache is not
fingerprinted (training adds rows to it between checkpoints, and missing rows are computed again from the frozen
model); it is only checked to be readable.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedpdpo.client.state import (
    COMPACT_FILE,
    LOCAL_FILE,
    OPTIMIZER_FILE,
    REFERENCE_FILE,
    ClientStore,
    compacted_from,
)
from fedpdpo.config import RunConfig, config_to_dict
from fedpdpo.engines.checkpoint import load_checkpoint
from fedpdpo.errors import FedPDPOError, first_line

log = logging.getLogger(__name__)

#: Config keys an explicit resume option may change (``fedpdpo run --resume DIR --rounds N``).
EXTENSIBLE = ("rounds",)

# file digests by (path, inode, size, mtime): each checkpoint hashes only the client versions written since the last
_digests: dict[tuple[str, int, int, int], str] = {}


def config_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    return dict(_flatten(config_to_dict(cfg)))


def _flatten(data: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def file_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        _digests[key] = h.hexdigest()
    return _digests[key]


def clients_fingerprint(store: ClientStore, client_ids: Iterable[int], as_of_round: int) -> dict[str, Any]:
    """Per client: the state version a resume after ``as_of_round`` starts from, and a digest of each of its files."""
    prints = {}
    for cid in client_ids:
        version = store.latest_version(cid, as_of_round)
        files: dict[str, str] = {}
        if version is not None:
            d = store.version_dir(cid, version)
            files = {f.name: file_digest(f) for f in sorted(d.iterdir()) if f.is_file() and f.name != COMPACT_FILE}
            if LOCAL_FILE not in files and (d / COMPACT_FILE).is_file():  # finished: the file it was made from
                files[LOCAL_FILE] = compacted_from(d / COMPACT_FILE)
        prints[str(cid)] = {"round": version, "files": files}
    return prints


def check_resume(
    recorded: dict[str, Any],
    cfg: RunConfig,
    run_dir: Path,
    store: ClientStore | None,
    as_of_round: int,
    allow: Iterable[str] = (),
) -> None:
    """Refuse to resume (:class:`FedPDPOError`) when the config or a client's state differs from the checkpoint's.

    ``cfg`` is the run's saved config as read now; ``allow`` names config keys the user asked to change. A finished
    run has dropped its clients' optimizer states (``ClientStore.finalize``), so those may be missing then.
    """
    changed = []
    saved = recorded.get("config")
    if saved is not None:
        now = config_fingerprint(cfg)
        for key in sorted(set(now) | set(saved)):
            if key not in allow and now.get(key) != saved.get(key):
                changed.append(f"config key '{key}' changed from {saved.get(key)!r} to {now.get(key)!r}")
    finished = saved is not None and as_of_round >= int(saved.get("rounds", 0))
    if store is not None and "clients" in recorded:
        now_clients = clients_fingerprint(store, range(cfg.num_clients), as_of_round)
        for cid, then in sorted(recorded["clients"].items(), key=lambda kv: int(kv[0])):
            current = now_clients.get(cid, {"round": None, "files": {}})
            files = {n: d for n, d in then["files"].items() if not (finished and n == OPTIMIZER_FILE)}
            if current["round"] != then["round"] or any(current["files"].get(n) != d for n, d in files.items()):
                changed.append(f"{store.path(int(cid)).relative_to(run_dir)} is missing or changed")
    if changed:
        more = f" (and {len(changed) - 1} more: {'; '.join(changed[1:4])})" if len(changed) > 1 else ""
        hint = (
            "to run more rounds, pass --rounds N instead of editing config.toml"
            if changed[0].startswith("config key 'rounds'")
            else "undo the change, or start the run again in a new --out directory"
        )
        raise FedPDPOError(f"cannot resume {run_dir}: {changed[0]} since the checkpoint{more}; {hint}")
    if store is not None:
        for cid in range(cfg.num_clients):
            _check_readable(store.path(cid) / REFERENCE_FILE, run_dir)


def _check_readable(path: Path, run_dir: Path) -> None:
    from safetensors import safe_open

    if not path.exists():
        return
    try:
        with safe_open(str(path), "pt"):
            pass
    except Exception as exc:  # safetensors raises its own error types for every kind of corruption
        raise FedPDPOError(
            f"cannot resume {run_dir}: {path.relative_to(run_dir)} is unreadable ({first_line(exc)}); it "
            "caches the frozen model's log-probs: delete it and they are computed again"
        ) from None


def checked_resume(cfg: RunConfig, out: Path, rounds: int | None, store: ClientStore | None) -> RunConfig:
    """``cfg`` with ``rounds`` applied, once the run in ``out`` is found as its last checkpoint left it.

    ``store``: where the clients' state lives when it is in the run directory (in-process); None when it lives on
    the nodes, which check their own state against the round the server resumes from (``RunRecord``)."""
    if rounds is not None and rounds < cfg.rounds:
        raise FedPDPOError(
            f"--rounds {rounds}: the run in {out} already has {cfg.rounds} rounds; --rounds can only raise it"
        )
    ckpt = load_checkpoint(out)
    if ckpt is None:
        log.info("%s has no checkpoint yet: the run starts again from round 0", out)
    else:
        allow = EXTENSIBLE if rounds is not None else ()
        check_resume(ckpt.fingerprint, cfg, out, store, ckpt.server_round, allow)
    if rounds is None or rounds == cfg.rounds:
        return cfg
    if ckpt is not None and ckpt.server_round >= cfg.rounds:
        log.warning(
            "the run had finished, so its clients' optimizer states were dropped and their personalized heads kept "
            "to fp16 precision of their change; the %d extra round(s) start from there (a run started with rounds=%d "
            "would differ)",
            rounds - cfg.rounds,
            rounds,
        )
    cfg = copy.deepcopy(cfg)
    cfg.rounds = rounds
    return cfg
