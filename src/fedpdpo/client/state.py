"""A client's private state on disk: local modules, optimizer state, cached reference log-probs.

One directory per client. Training state is *versioned by server round*: ``rounds/round_<r>/`` holds the local
tensors and the optimizer state as they were at the end of round ``r``, written to a temporary directory and
renamed into place, so a version is either complete or absent and its two files always belong to the same round.

Why versions rather than one file per kind: a run may be killed after a client has saved round ``r`` but before
the server has checkpointed round ``r``. Resuming then re-runs round ``r`` and needs the client's state as of
round ``r - 1``, which is still there. A client therefore loads "its state as of round ``r - 1``" when it trains in
round ``r`` (:meth:`ClientStore.load` with ``as_of_round``), and keeps at most the version it started the round
from plus the new one. Because all randomness is derived from (seed, round, client), re-running a round from the
same inputs gives the same bits, so a resumed run is identical to an uninterrupted one.

A finished run keeps only each client's newest local tensors (:meth:`ClientStore.finalize`), and stores the largest
of them, the personalized head (vocabulary x hidden: 113 MB in fp32 for SmolLM2), as an fp16 delta from the
backbone's head it started from, in ``local_compact.safetensors`` (57 MB). The delta is small, so fp16 keeps it to
within about 5e-4 of its own size (a few 1e-7 absolute for the head's weights); reading adds the backbone's head back
in fp32. An fp16 copy of the whole head would be the same size but lose that much of the weights themselves.

The reference log-probs never change (frozen backbone), so they live unversioned in ``reference.safetensors``.
Only the engine that runs the client (the in-process loop or the Flower ClientApp on the client's node) reads or
writes this directory; nothing in it is sent to the server.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedpdpo.errors import FedPDPOError, environment_error, first_line
from fedpdpo.timing import phase

T = TypeVar("T")

LOCAL_FILE = "local.safetensors"
COMPACT_FILE = "local_compact.safetensors"  # a finished run's local tensors, some as fp16 deltas (finalize)
TASK_FILE = "task.json"  # the client's data sizes and length limits (chosen from its own data)
OPTIMIZER_FILE = "optimizer.pt"
REFERENCE_FILE = "reference.safetensors"
VERSIONS_DIR = "rounds"
VERSION_PREFIX = "round_"
BEST_DIR = "best"  # the client's kept best-validation snapshot (fedpdpo/client/selection.py)
DAMAGED = "the client's saved state is damaged: restore it from a backup or run again in a new --out directory"
# Metadata of a compact file: the tensors stored as fp16 deltas (JSON list), a digest of each one's base (JSON object),
# and the digest of the local.safetensors it was made from (which a resume's fingerprint compares).
DELTAS_KEY, BASES_KEY, SOURCE_KEY = "fp16_deltas", "base_sha256", "source_sha256"


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` and rename the result to ``path`` (same directory, so the rename is atomic).

    The data is flushed to disk before the rename: after a crash the file holds either the old or the new
    content, never a prefix of the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_dir(target: Path, fill: Callable[[Path], object]) -> None:
    """Make directory ``target`` as ``fill(tmp)`` writes it: in a temporary directory next to it, flushed, renamed
    into place; so ``target`` is either complete or absent. An existing ``target`` (left by a run killed before the
    server checkpointed its round, and written again with the same content) is replaced."""
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp_", dir=parent))
    try:
        fill(tmp)
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(parent)


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link ``dst`` to ``src`` (no bytes copied: both files are written once and never changed in place), or a
    copy where the file system has no hard links."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def _load_compact(path: Path) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """A compact file's tensors, the names stored as deltas and the digest of each one's base."""
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    return load_file(path), json.loads(meta[DELTAS_KEY]), json.loads(meta[BASES_KEY])


def compacted_from(path: Path) -> str:
    """The digest of the ``local.safetensors`` that the compact file ``path`` was made from."""
    with safe_open(str(path), "pt") as f:
        return str((f.metadata() or {}).get(SOURCE_KEY, ""))


def read_checked(path: Path, load: Callable[[Path], T], remedy: str) -> T:
    """``load(path)``; a corrupt file is a one-line error naming it and what to do, not a deserializer traceback."""
    try:
        return load(path)
    except Exception as exc:  # safetensors and torch.load raise many types for truncated or foreign bytes
        if isinstance(exc, OSError) and environment_error(exc) is not None:
            raise  # a full disk or a missing permission, which the CLI reports as such
        raise FedPDPOError(f"{path} is unreadable ({first_line(exc)}); {remedy}") from exc


@dataclass
class ClientState:
    """What a client keeps between rounds."""

    local: dict[str, torch.Tensor] = field(default_factory=dict)  # non-shared trainable tensors
    optimizer: dict | None = None  # torch optimizer state_dict
    personal_optimizer: dict | None = None  # Ditto: the optimizer of the personal copies of the shared tensors
    reference: dict[str, torch.Tensor] = field(default_factory=dict)  # "train"/"test" -> [n, 2] ref logps
    rounds_trained: int = 0


class ClientStore:
    """Reads and writes :class:`ClientState` under ``root/client_<id>/``.

    ``bases``: the frozen tensors some local tensors start as copies of, by the local tensor's name
    (``FedPDPOModel.delta_bases``). :meth:`finalize` stores those as fp16 deltas from them and :meth:`load` adds them
    back; a store without ``bases`` compacts nothing and cannot read what a finished run compacted.
    """

    def __init__(self, root: str | Path, bases: Mapping[str, torch.Tensor] | None = None) -> None:
        self.root = Path(root)
        self.bases = dict(bases or {})
        self._base_digests: dict[str, str] = {}

    def path(self, client_id: int) -> Path:
        return self.root / f"client_{client_id}"

    def version_dir(self, client_id: int, server_round: int) -> Path:
        return self.path(client_id) / VERSIONS_DIR / f"{VERSION_PREFIX}{server_round:05d}"

    def versions(self, client_id: int) -> list[int]:
        """Rounds for which a complete training state is stored, ascending."""
        d = self.path(client_id) / VERSIONS_DIR
        if not d.is_dir():
            return []
        rounds = []
        for child in d.iterdir():
            suffix = child.name.removeprefix(VERSION_PREFIX)
            if child.is_dir() and child.name.startswith(VERSION_PREFIX) and suffix.isdigit():
                rounds.append(int(suffix))
        return sorted(rounds)

    def latest_version(self, client_id: int, as_of_round: int | None = None) -> int | None:
        """The newest stored round ``<= as_of_round`` (any round when None), or None before the first training."""
        eligible = [r for r in self.versions(client_id) if as_of_round is None or r <= as_of_round]
        return eligible[-1] if eligible else None

    def local_file(self, client_id: int, as_of_round: int | None = None) -> Path | None:
        """Path of the client's local tensors (personalized modules) as of a round; None if it never trained."""
        version = self.latest_version(client_id, as_of_round)
        if version is None:
            return None
        path = self.version_dir(client_id, version) / LOCAL_FILE
        return path if path.is_file() else None

    def load(self, client_id: int, as_of_round: int | None = None, optimizer: bool = True) -> ClientState:
        """The client's state at the end of round ``as_of_round`` (default: its newest state).

        A client that trains in round ``r`` loads ``as_of_round=r - 1``; evaluation after round ``r`` loads ``r``,
        and without ``optimizer``: evaluation never reads the optimizer state (twice the size of the local modules'
        tensors with AdamW), so it is not deserialised (``rounds_trained`` is then 0).
        """
        with phase("client state load"):
            return self._load(client_id, as_of_round, optimizer)

    def _load(self, client_id: int, as_of_round: int | None, optimizer: bool) -> ClientState:
        state = ClientState(reference=self.reference(client_id))
        version = self.latest_version(client_id, as_of_round)
        if version is None:
            return state
        d = self.version_dir(client_id, version)
        state.local = self.read_local(d)
        if optimizer and (d / OPTIMIZER_FILE).is_file():
            blob = read_checked(d / OPTIMIZER_FILE, lambda p: torch.load(p, weights_only=True), DAMAGED)
            state.optimizer = blob["optimizer"]
            state.personal_optimizer = blob.get("personal_optimizer")
            state.rounds_trained = int(blob["rounds_trained"])
        return state

    def reference(self, client_id: int) -> dict[str, torch.Tensor]:
        """The cached reference log-probs (empty before the first evaluation)."""
        ref = self.path(client_id) / REFERENCE_FILE
        if not ref.is_file():
            return {}
        return read_checked(ref, load_file, "it caches the frozen model's log-probs: delete it to recompute them")

    def read_local(self, directory: Path) -> dict[str, torch.Tensor]:
        """The local tensors stored in ``directory`` (a version, or a kept snapshot): the full file, else the
        compact one with its fp16 deltas added back; empty when it holds neither."""
        if (directory / LOCAL_FILE).is_file():
            return read_checked(directory / LOCAL_FILE, load_file, DAMAGED)
        if (directory / COMPACT_FILE).is_file():
            return self._expand(directory / COMPACT_FILE, DAMAGED)
        return {}

    def _base_digest(self, name: str) -> str:
        if name not in self._base_digests:
            self._base_digests[name] = tensor_sha256(self.bases[name])
        return self._base_digests[name]

    def _expand(self, path: Path, remedy: str) -> dict[str, torch.Tensor]:
        """The local tensors of a compact file, fp16 deltas added back to their bases in fp32."""
        tensors, deltas, digests = read_checked(path, _load_compact, remedy)
        for name in deltas:
            if name not in self.bases:
                raise FedPDPOError(
                    f"{path} stores {name} as a delta from the backbone's tensor, but it was read without the "
                    "backbone (internal error: give ClientStore the model's delta_bases())"
                )
            if self._base_digest(name) != digests.get(name):
                raise FedPDPOError(
                    f"{path} stores {name} as a delta from another backbone than this run's model loads now (was "
                    "the model file replaced?); the client's personalized head cannot be rebuilt"
                )
            tensors[name] = self.bases[name].detach().float().cpu() + tensors[name].float()
        return tensors

    def save_task_info(self, client_id: int, info: dict[str, Any]) -> None:
        """Record the client's data sizes and length limits (``task.json``) when they are new or changed: export,
        scoring and generation rebuild prompts with the client's own limits, which only its data determined."""
        if self.task_info(client_id) != info:
            text = json.dumps(info, indent=1, sort_keys=True, allow_nan=False)
            atomic_write(self.path(client_id) / TASK_FILE, lambda p: Path(p).write_text(text, encoding="utf-8"))

    def task_info(self, client_id: int) -> dict[str, Any] | None:
        path = self.path(client_id) / TASK_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def save_reference(self, client_id: int, reference: dict[str, torch.Tensor]) -> None:
        """Cache the reference log-probs (deterministic, so written once and never versioned)."""
        with phase("client state save"):
            ref = {k: v.contiguous() for k, v in reference.items()}
            atomic_write(self.path(client_id) / REFERENCE_FILE, lambda p: save_file(ref, p))

    def save(self, client_id: int, state: ClientState, server_round: int) -> None:
        """Store the state reached by training in ``server_round`` as one atomic version.

        Versions older than the one this round started from are deleted: no checkpoint can need them any more,
        because the server has checkpointed round ``server_round - 1`` before this round began.
        """
        with phase("client state save"):
            self._save(client_id, state, server_round)

    def _save(self, client_id: int, state: ClientState, server_round: int) -> None:
        # Training may have filled more rows of the reference cache (perf.fused_reference computes a pair's
        # reference in the first step that sees it); a row never changes once computed, so rewriting the small
        # table only adds rows.
        if state.reference:
            self.save_reference(client_id, state.reference)

        def fill(tmp: Path) -> None:
            if state.local:
                local = {k: v.contiguous() for k, v in state.local.items()}
                save_file(local, tmp / LOCAL_FILE)
            if state.optimizer is not None:
                blob = {"optimizer": state.optimizer, "rounds_trained": state.rounds_trained}
                if state.personal_optimizer is not None:
                    blob["personal_optimizer"] = state.personal_optimizer
                torch.save(blob, tmp / OPTIMIZER_FILE)

        atomic_dir(self.version_dir(client_id, server_round), fill)
        self._prune(client_id, server_round)

    def finalize(self, client_ids: Iterable[int]) -> int:
        """Shrink a finished run to what evaluation, export and generation read: each client's newest local tensors,
        those with a base (the personalized head) as fp16 deltas from it (see the module doc).

        Older versions and optimizer states only serve resuming an unfinished run (the optimizer of 3 clients of
        SmolLM2 is 650 MB, twice their personal heads); a finished run has nothing left to resume, so a comparison
        of many algorithms and seeds would otherwise keep gigabytes per run. Returns the bytes freed."""
        freed = 0
        for cid in client_ids:
            versions = self.versions(cid)
            if not versions:
                continue
            older = (f for r in versions[:-1] for f in self.version_dir(cid, r).rglob("*") if f.is_file())
            freed += sum(f.stat().st_size for f in older)
            self._prune(cid, versions[-1] + 1)  # every version before the newest
            newest = self.version_dir(cid, versions[-1])
            optimizer = newest / OPTIMIZER_FILE
            if optimizer.is_file():
                freed += optimizer.stat().st_size
                optimizer.unlink()
            twin = self._snapshot_twin(cid, newest)
            freed += self._compact(newest)
            if twin is not None and (newest / COMPACT_FILE).is_file():
                # the same file as the newest version's: share its compact file too (there is none when no local
                # tensor has a base, e.g. for Local or FedAvg's empty state: both keep the full file, linked)
                link_or_copy(newest / COMPACT_FILE, twin / COMPACT_FILE)
                (twin / LOCAL_FILE).unlink()
                fsync_dir(twin)
            for snapshot in (self.path(cid) / BEST_DIR).glob(f"{VERSION_PREFIX}*"):  # one of an older version
                freed += self._compact(snapshot)
        return freed

    def _snapshot_twin(self, client_id: int, version: Path) -> Path | None:
        """The kept snapshot whose local tensors are a link to ``version``'s local file, if there is one."""
        for snapshot in (self.path(client_id) / BEST_DIR).glob(f"{VERSION_PREFIX}*"):
            a, b = snapshot / LOCAL_FILE, version / LOCAL_FILE
            if a.is_file() and b.is_file() and a.samefile(b):
                return snapshot
        return None

    def _compact(self, version: Path) -> int:
        """Replace ``version``'s local tensors by a compact file (tensors with a base as fp16 deltas); returns the
        bytes freed. Written before the full file is deleted, so a kill in between leaves both (and ``load`` reads
        the full one)."""
        path = version / LOCAL_FILE
        if not path.is_file():
            return 0
        local = read_checked(path, load_file, "the client's saved state is damaged: run again in a new --out directory")
        names = [n for n, b in self.bases.items() if n in local and local[n].shape == b.shape]
        if not names:
            return 0
        packed = {
            n: (t.float() - self.bases[n].detach().float().cpu()).half() if n in names else t.contiguous()
            for n, t in local.items()
        }
        meta = {
            DELTAS_KEY: json.dumps(names),
            BASES_KEY: json.dumps({n: self._base_digest(n) for n in names}),
            SOURCE_KEY: file_sha256(path),
        }
        atomic_write(version / COMPACT_FILE, lambda p: save_file(packed, p, metadata=meta))
        size = path.stat().st_size
        path.unlink()
        fsync_dir(version)
        return size - (version / COMPACT_FILE).stat().st_size

    def _prune(self, client_id: int, server_round: int) -> None:
        start = self.latest_version(client_id, server_round - 1)
        parent = self.path(client_id) / VERSIONS_DIR
        for r in self.versions(client_id):
            if start is not None and r < start:
                shutil.rmtree(self.version_dir(client_id, r), ignore_errors=True)
        for stale in parent.glob(".tmp_*"):  # a version being written when a run was killed
            shutil.rmtree(stale, ignore_errors=True)
