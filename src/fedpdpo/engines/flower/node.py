"""``fedpdpo node``: one participant joins a federation with its own data file (docs/deployment.md).

:func:`run_node` starts a Flower SuperNode configured for fedpdpo and serves its ClientApp messages itself:

* ``flower-supernode --isolation process`` connects to the SuperLink (TLS with the given CA, optional node
  authentication key) and gets a node config file written from the flags (``client-id``, ``data-path``,
  ``test-path``, ``state-dir``, or ``partition-id`` for the shared data set), so nobody hand-writes
  ``--node-config`` strings;
* this process is the node's long-lived ClientApp process (:mod:`fedpdpo.engines.flower.worker`): it keeps the
  model loaded across messages and rounds. The SuperNode's Runtime API listens on 127.0.0.1 only, and the tasks are
  claimed with a per-start random SuperExec secret, so no other local process can take them.

The SuperNode is this process's child: it is stopped when this process ends (Ctrl-C, SIGTERM, an error) and, on
Linux, also when this process is killed outright. When the SuperNode exits on its own (a restarted SuperLink ends
the sessions it does not know), it is started again and registers anew, with the model still loaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import tomli_w

import fedpdpo
from fedpdpo.engines.flower.deploy import free_port
from fedpdpo.engines.flower.records import (
    NODE_CLIENT,
    NODE_DATA,
    NODE_ON_BAD_RECORD,
    NODE_PARTITION,
    NODE_STATE_DIR,
    NODE_TEST,
)
from fedpdpo.errors import FedPDPOError

log = logging.getLogger(__name__)

#: Linux prctl option: the signal a child gets when its parent dies.
PR_SET_PDEATHSIG = 1


@dataclass
class NodeSpec:
    """One participant's node, as ``fedpdpo node`` is given it (paths absolute)."""

    superlink: str  # HOST:PORT of the SuperLink's Fleet API
    root_certificates: str = ""  # CA certificate of the SuperLink's TLS certificate; "" = --insecure
    client_id: int | None = None  # node-local data: this participant's client id ...
    data: str = ""  # ... and its data file
    test: str = ""  # optional test file
    on_bad_record: str = ""  # "error" / "skip" for this node's file; "" = the run config's data.on_bad_record
    partition_id: int | None = None  # shared data instead: the partition of the run config's data.path
    state_dir: str = ""  # "" = the directory the server names (server and node share a disk)
    auth_key: str = ""  # node authentication: this node's private key
    runtime_port: int = 0  # the SuperNode's Runtime API port on 127.0.0.1 (0 = a free one)

    def check(self) -> None:
        """Refuse a node that could not serve a run (before the SuperNode starts)."""
        if (self.partition_id is None) == (self.client_id is None):
            raise FedPDPOError("fedpdpo node needs either --client-id N with --data FILE, or --partition-id N")
        if self.client_id is not None and not self.data:
            raise FedPDPOError("--client-id needs --data FILE (this participant's preference pairs)")
        if self.partition_id is not None and (self.data or self.test or self.on_bad_record):
            raise FedPDPOError("--partition-id serves the run config's shared data; drop --data/--test/--on-bad-record")
        for flag, value in (("--client-id", self.client_id), ("--partition-id", self.partition_id)):
            if value is not None and value < 0:
                raise FedPDPOError(f"{flag} must be >= 0, got {value}")
        for flag, path in (
            ("--data", self.data),
            ("--test", self.test),
            ("--root-certificates", self.root_certificates),
        ):
            if path and not Path(path).exists():
                raise FedPDPOError(f"{flag} {path} does not exist")
        if self.auth_key:
            if not self.root_certificates:
                raise FedPDPOError("--auth-key needs TLS (--root-certificates): Flower refuses node auth without it")
            if not Path(self.auth_key).is_file():
                raise FedPDPOError(f"--auth-key {self.auth_key} does not exist")
        if self.state_dir and Path(self.state_dir).exists() and not Path(self.state_dir).is_dir():
            raise FedPDPOError(f"--state-dir {self.state_dir} is a file")

    def node_config(self) -> dict[str, Any]:
        if self.partition_id is not None:
            config: dict[str, Any] = {NODE_PARTITION: self.partition_id}
        else:
            config = {NODE_CLIENT: self.client_id, NODE_DATA: self.data}
            if self.test:
                config[NODE_TEST] = self.test
            if self.on_bad_record:
                config[NODE_ON_BAD_RECORD] = self.on_bad_record
        if self.state_dir:
            config[NODE_STATE_DIR] = self.state_dir
        return config

    def supernode_command(self, port: int, config_file: Path, secret_file: Path) -> list[str]:
        tls = ["--root-certificates", self.root_certificates] if self.root_certificates else ["--insecure"]
        auth = ["--auth-supernode-private-key", self.auth_key] if self.auth_key else []
        return [
            flower_executable("flower-supernode"),
            "--superlink",
            self.superlink,
            *tls,
            *auth,
            "--isolation",
            "process",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--superexec-auth-secret-file",
            str(secret_file),
            "--node-config",
            str(config_file),
        ]

    def describe(self) -> str:
        if self.partition_id is not None:
            data = f"partition {self.partition_id} of the run config's data.path"
        else:
            data = f"client {self.client_id}, data {self.data}" + (f", test {self.test}" if self.test else "")
        state = f"state in {self.state_dir}/run-<run id>" if self.state_dir else "state where the server says"
        return f"{data}; {state}"


def _die_with_parent() -> None:
    """In the SuperNode child, before exec: get SIGTERM when the ``fedpdpo node`` process dies (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def flower_executable(name: str) -> str:
    """A Flower command next to this interpreter (the virtualenv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else (shutil.which(name) or name)


#: A SuperNode that exits sooner than this after its start, this many times in a row, is not started again.
QUICK_EXIT_S = 15.0
QUICK_EXITS = 3


def run_node(spec: NodeSpec, restart_delay: float = 2.0) -> int:
    """Run the node until it is stopped (SIGINT/SIGTERM); returns the exit code.

    When the SuperNode exits by itself, it is started again (the loaded model stays): a SuperLink that restarted
    without its database no longer knows the node and ends its session, and the node must register anew to take
    part in the resumed run. A SuperNode that keeps exiting right after its start is given up on (an error)."""
    from fedpdpo.engines.flower.worker import serve_tasks

    spec.check()
    if spec.state_dir:
        Path(spec.state_dir).mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with tempfile.TemporaryDirectory(prefix="fedpdpo-node-") as tmp:
        config_file, secret_file = Path(tmp) / "node-config.toml", Path(tmp) / "superexec.secret"
        config_file.write_text(tomli_w.dumps(spec.node_config()), encoding="utf-8")
        secret = secrets.token_bytes(32)
        secret_file.touch(mode=0o600)
        secret_file.write_bytes(secret)
        port = spec.runtime_port or free_port()
        logging.getLogger("flwr").propagate = False  # Flower logs through its own handler, at its own level
        log.info("fedpdpo %s from %s", version("fedpdpo"), Path(fedpdpo.__file__).parent)
        log.info("joining %s as %s", spec.superlink, spec.describe())
        quick_exits = 0
        while not stop.is_set():
            started = time.monotonic()
            code = _serve(spec.supernode_command(port, config_file, secret_file), port, stop, secret, serve_tasks)
            if stop.is_set():
                break
            quick_exits = quick_exits + 1 if time.monotonic() - started < QUICK_EXIT_S else 0
            if quick_exits >= QUICK_EXITS:
                raise FedPDPOError(
                    f"flower-supernode exited {quick_exits} times in a row right after its start (last exit code "
                    f"{code}); see its messages above"
                )
            log.warning("flower-supernode exited (code %s); joining %s again", code, spec.superlink)
            stop.wait(restart_delay)
    log.info("node stopped")
    return 0


def _serve(command: list[str], port: int, stop: threading.Event, secret: bytes, serve_tasks) -> int | None:
    """Run one SuperNode and serve its tasks until it exits or ``stop`` is set; returns its exit code."""
    supernode = subprocess.Popen(command, preexec_fn=_die_with_parent)
    try:
        serve_tasks(f"127.0.0.1:{port}", stop, secret, alive=lambda: supernode.poll() is None)
    finally:
        if supernode.poll() is None:
            supernode.terminate()
            try:
                supernode.wait(timeout=10)
            except subprocess.TimeoutExpired:
                supernode.kill()
                supernode.wait()
    return supernode.returncode
