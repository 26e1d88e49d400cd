"""``--engine flower-deploy``: the Flower apps on real ``flower-superlink`` / ``flower-supernode`` processes.

A real deployment runs one SuperLink (with the ServerApp) and one node per client, each on its own machine, each
started with ``fedpdpo node`` (docs/deployment.md gives the commands). :class:`LoopbackDeployment` starts the same
processes on 127.0.0.1 with free ports so the whole path (Fleet API, ``flwr run``, the nodes' SuperNodes and their
long-lived ClientApp processes) can be tried and tested on one machine; every process it starts is stopped again on
exit, also when the run fails. Each node either holds its own files (:class:`NodeFiles`, ``--node-data ID=PATH``)
or serves its partition of the config's shared ``data.path``. Loopback traffic never leaves the machine, so TLS is
off by default there; ``tls=True`` runs it with a throw-away CA.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import IO, Any

import tomli_w

import fedpdpo
from fedpdpo.config import RunConfig, save_config
from fedpdpo.engines.flower.certs import TlsFiles, make_certs
from fedpdpo.errors import FedPDPOError
from fedpdpo.rundir import preflight, run_directory

CONNECTION = "fedpdpo"

#: The Flower app ``flwr run`` submits: no code of its own (the components live in the installed fedpdpo package),
#: only the components and the run config keys that the ServerApp reads (``ServerParams.from_run_config``).
APP_PYPROJECT = {
    "project": {
        "name": "fedpdpo-flower",
        "version": version("fedpdpo"),
        "description": "fedpdpo (federated personalized preference alignment) on Flower",
        "license": "Apache-2.0",
        "dependencies": [f"fedpdpo=={version('fedpdpo')}"],
    },
    "tool": {
        "flwr": {
            "app": {
                "publisher": "fedpdpo",
                "components": {
                    "serverapp": "fedpdpo.engines.flower.server_app:app",
                    "clientapp": "fedpdpo.engines.flower.client_app:app",
                },
                "config": {
                    "config": "",
                    "out": "",
                    "set": "",
                    "engine": "flower-deploy",
                    "overwrite": False,
                    "lock": True,
                    "min-fit-replies": 1,
                    "reply-timeout": 0.0,
                    "node-wait": 120.0,
                    "resume": False,
                    "rounds": 0,
                },
            }
        }
    },
}


def write_flower_app(directory: Path) -> Path:
    """Write the Flower app project (a ``pyproject.toml``) that ``flwr run DIR`` builds and submits."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(tomli_w.dumps(APP_PYPROJECT), encoding="utf-8")
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    program = proc.args[0] if isinstance(proc.args, list) else proc.args  # (always a list here)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedPDPOError(f"{program!s} exited with code {proc.returncode}; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise FedPDPOError(f"{program!s} did not open port {port} within {timeout:.0f} s; see {log}")


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Offline, quiet Flower: no dependency installation, telemetry or update checks; a private FLWR_HOME.

    The processes started with it import the fedpdpo this process runs (its source root first on PYTHONPATH), not
    whichever one the interpreter has installed: the ServerApp and the nodes must run the same code as the launcher.
    """
    env = dict(os.environ)
    # The Flower executables (and the flower-superexec / flwr-serverapp processes they start) live next to this
    # interpreter; a caller whose PATH lacks the virtualenv's bin/ (``make test``, cron, systemd) must still find them.
    bin_dir = str(Path(sys.executable).parent)
    source_root = str(Path(fedpdpo.__file__).resolve().parents[1])
    env.update(
        PATH=os.pathsep.join([bin_dir, env.get("PATH", "")]),
        PYTHONPATH=os.pathsep.join(p for p in [source_root, env.get("PYTHONPATH", "")] if p),
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        HF_HUB_OFFLINE="1",
    )
    return env


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (Linux ``/proc``; None where there is no such process or no ``/proc``)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> list[tuple[int, str]]:
    """Every process below ``pid``, with its start time. Flower starts its SuperExec (and so the ServerApp) in a
    session of its own, which the SuperLink's process group does not hold. Empty without ``/proc``: there the
    SuperExec and the ServerApp end by themselves once their parent is gone (Flower's parent-process monitor)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if (started := _start_time(child)) is not None:
                found.append((child, started))
            todo.append(child)
    return found


@dataclass
class NodeFiles:
    """What one participant's node holds: its own data file, optionally a test file and a state directory ("":
    the directory the server names, on the shared disk of a loopback run)."""

    data: str
    test: str = ""
    state_dir: str = ""


@dataclass
class LoopbackDeployment:
    """A SuperLink and one ``fedpdpo node`` per client on 127.0.0.1.

    Without ``nodes``, node ``i`` serves partition ``i`` of the config's ``data.path`` for ``i < num_nodes``; with
    ``nodes``, node ``i`` is client ``i`` with its own files, for each ``i`` in ``nodes``.
    """

    workdir: Path
    num_nodes: int
    tls: bool = False
    nodes: dict[int, NodeFiles] | None = None
    superlink_port: int = 0
    node_ports: dict[int, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    certs: TlsFiles | None = None
    _logs: list[IO[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = self.workdir.resolve()
        self.flwr_home = self.workdir / "flwr_home"
        self.env = flower_env(self.flwr_home)

    def __enter__(self) -> LoopbackDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = (self.workdir / "logs" / f"{name}.log").open("ab")
        self._logs.append(log)
        # own process group: stopping it also stops what it starts there (a node's SuperNode); what Flower starts in
        # sessions of its own (the SuperLink's SuperExec and ServerApp) is found by _stop as its descendants
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs[name] = proc
        return proc

    @property
    def node_ids(self) -> list[int]:
        return sorted(self.nodes) if self.nodes is not None else list(range(self.num_nodes))

    def _superlink_tls_args(self) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        c = self.certs
        files = {"--ssl-certfile": c.server_cert, "--ssl-keyfile": c.server_key, "--ssl-ca-certfile": c.ca_cert}
        return [a for flag, path in files.items() for a in (flag, str(path))]

    def start(self) -> None:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self.certs = make_certs(self.workdir / "certs")
        self.start_superlink()
        self.node_ports = {i: free_port() for i in self.node_ids}
        for i in self.node_ids:
            self.start_supernode(i)
        self.write_connection()

    def start_superlink(self) -> None:
        """Start (or restart, on the same port) the SuperLink; its ServerApp process runs in its process group."""
        self.superlink_port = self.superlink_port or free_port()
        cmd = ["flower-superlink", *self._superlink_tls_args(), "--port", str(self.superlink_port)]
        proc = self._spawn("superlink", [*cmd, "--disable-runtime-dependency-installation"])
        wait_for_port(self.superlink_port, proc, self.workdir / "logs" / "superlink.log")

    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink and the ServerApp it runs, as a crash of the server machine would."""
        self._stop(self.procs.pop("superlink"), sig=signal.SIGKILL)

    def node_command(self, i: int) -> list[str]:
        """``fedpdpo node`` for node ``i`` (what a participant runs on its machine)."""
        cmd = [sys.executable, "-m", "fedpdpo.cli", "node", "--superlink", f"127.0.0.1:{self.superlink_port}"]
        cmd += ["--root-certificates", str(self.certs.ca_cert)] if self.certs else ["--insecure"]
        cmd += ["--runtime-port", str(self.node_ports[i])]
        if self.nodes is None:
            return [*cmd, "--partition-id", str(i)]
        files = self.nodes[i]
        cmd += ["--client-id", str(i), "--data", files.data]
        cmd += ["--test", files.test] if files.test else []
        return cmd + (["--state-dir", files.state_dir] if files.state_dir else [])

    def start_supernode(self, i: int) -> None:
        """Start (or restart) node ``i``; a restarted node registers with a new node id and keeps its state."""
        self._spawn(f"supernode-{i}", self.node_command(i))

    def kill_supernode(self, i: int) -> None:
        """SIGKILL the node (its SuperNode and its ClientApp process), as a machine crash would."""
        self._stop(self.procs.pop(f"supernode-{i}"), sig=signal.SIGKILL)

    def write_connection(self) -> None:
        conn: dict[str, Any] = {"address": f"127.0.0.1:{self.superlink_port}"}
        if self.certs is None:
            conn["insecure"] = True
        else:
            conn["root-certificates"] = str(self.certs.ca_cert)
        doc = {"superlink": {"default": CONNECTION, CONNECTION: conn}}
        (self.flwr_home / "config.toml").write_text(tomli_w.dumps(doc), encoding="utf-8")

    def submit(self, run_config: dict[str, Any]) -> subprocess.Popen:
        """``flwr run`` the fedpdpo app with ``run_config`` (streams the ServerApp log until the run ends)."""
        app = write_flower_app(self.workdir / "app")
        rc_file = self.workdir / "run_config.toml"
        rc_file.write_text(tomli_w.dumps(run_config), encoding="utf-8")
        cmd = ["flwr", "run", str(app), CONNECTION, "--run-config", str(rc_file), "--stream"]
        return self._spawn("flwr-run", cmd)

    @staticmethod
    def _stop(*procs: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        """Signal the processes' groups (all at once: nodes stop in parallel), wait up to ``grace`` seconds, then
        SIGKILL whatever of the groups is left, and the processes they started in sessions of their own (the
        SuperLink's SuperExec and ServerApp)."""
        below = [d for proc in procs for d in descendants(proc.pid)]  # before the signal: orphans are re-parented
        for proc in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
        deadline = time.monotonic() + (grace if sig != signal.SIGKILL else 0.0)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid, started in below:
            if _start_time(pid) == started:  # still that process, not a new one that got its pid
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        self._stop(*(p for name, p in self.procs.items() if name != "superlink"))  # nodes and flwr first
        if "superlink" in self.procs:
            self._stop(self.procs["superlink"])
        self.procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()


NODES_FILE = "nodes.json"


def save_nodes(workdir: Path, nodes: dict[int, NodeFiles] | None) -> None:
    """Record which files each loopback node held, for ``fedpdpo run --resume`` to start the same nodes."""
    doc = {str(i): vars(f) for i, f in sorted(nodes.items())} if nodes is not None else None
    (workdir / NODES_FILE).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def saved_nodes(workdir: Path) -> dict[int, NodeFiles] | None:
    path = workdir / NODES_FILE
    doc = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    return {int(i): NodeFiles(**f) for i, f in doc.items()} if doc is not None else None


def check_nodes(cfg: RunConfig, nodes: dict[int, NodeFiles] | None) -> None:
    """Refuse, before any process starts, a loopback deployment whose nodes would have no data."""
    if nodes is None:
        if not cfg.data.path:
            raise FedPDPOError(
                "the config has no data.path: give each node its own file with --node-data ID=PATH (repeatable)"
            )
        return
    if outside := sorted(i for i in nodes if not 0 <= i < cfg.num_clients):
        raise FedPDPOError(f"--node-data names client(s) {outside}, outside 0..{cfg.num_clients - 1} (num_clients)")
    for i, files in sorted(nodes.items()):
        for flag, path in (("--node-data", files.data), ("--node-test", files.test)):
            if path and not Path(path).exists():
                raise FedPDPOError(f"{flag} {i}={path}: does not exist")


def run_loopback(
    cfg: RunConfig,
    out: str | Path,
    overwrite: bool = False,
    tls: bool = False,
    min_fit_replies: int = 1,
    reply_timeout: float = 0.0,
    timeout: float | None = None,
    nodes: dict[int, NodeFiles] | None = None,
    resume: bool = False,
    rounds: int | None = None,
) -> dict[str, Any]:
    """Run the job on a loopback deployment (logs in ``OUT/deploy/logs``); returns the summary.

    ``nodes``: each node's own files (``--node-data``), else every node serves its partition of ``data.path``.
    With ``resume`` (``cfg`` is the run's config.toml) the run continues after its last checkpoint, with the nodes
    it had (unless ``nodes`` says otherwise) and their state. This launcher holds the run directory
    (:mod:`fedpdpo.rundir`) for the whole deployment, so its ServerApp is told not to lock it again.
    """
    out = Path(out).resolve()
    if resume:
        with run_directory(out, resume=True) as target:
            nodes = nodes if nodes is not None else saved_nodes(target / "deploy")
            check_nodes(cfg, nodes)
            run_config: dict[str, Any] = {"resume": True, "rounds": rounds or 0}
            return _run_loopback(cfg, target, tls, nodes, run_config, min_fit_replies, reply_timeout, timeout)
    check_nodes(cfg, nodes)
    preflight(out, overwrite)
    with run_directory(out, overwrite=overwrite) as target:
        return _run_loopback(cfg, target, tls, nodes, {}, min_fit_replies, reply_timeout, timeout)


def _run_loopback(
    cfg: RunConfig,
    out: Path,
    tls: bool,
    nodes: dict[int, NodeFiles] | None,
    run_config: dict[str, Any],
    min_fit_replies: int,
    reply_timeout: float,
    timeout: float | None,
) -> dict[str, Any]:
    workdir = out / "deploy"
    workdir.mkdir(exist_ok=True)
    save_nodes(workdir, nodes)
    if not run_config.get("resume"):
        config_file = workdir / "run.toml"
        save_config(cfg, config_file)
        run_config["config"] = str(config_file)
    run_config |= {
        "out": str(out),
        "engine": "flower-deploy",
        "lock": False,  # held by this launcher
        "min-fit-replies": min_fit_replies,
        "reply-timeout": float(reply_timeout),
    }
    with LoopbackDeployment(workdir, cfg.num_clients, tls=tls, nodes=nodes) as dep:
        proc = dep.submit(run_config)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise FedPDPOError(f"the deployment did not finish within {timeout} s; see {workdir / 'logs'}") from None
    summary = out / "summary.json"
    if not summary.is_file() or proc.returncode != 0:
        logs = workdir / "logs"
        raise FedPDPOError(f"the Flower deployment run failed (flwr run exit {proc.returncode}); see {logs}")
    return json.loads(summary.read_text(encoding="utf-8"))
