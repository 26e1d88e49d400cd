"""Real Flower deployment on 127.0.0.1: ``flower-superlink`` + one ``flower-supernode`` per client + ``flwr run``.

Every process is started and stopped by the test (also on failure: the launcher is a context manager that kills
each process group). About 3 minutes together on 2 idle cores (each message starts a fresh ClientApp process that
imports torch and builds the model); they run in the default suite because they are the only end-to-end check of a
real deployment.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from fedpdpo.config import save_config
from fedpdpo.engines.flower.deploy import LoopbackDeployment, run_loopback
from fedpdpo.engines.inprocess import run_inprocess


def live_members(pgids: list[int]) -> list[str]:
    """Processes still running in these process groups (zombies waiting for init to reap them do not count)."""
    ps = subprocess.run(["ps", "-eo", "pgid=,stat=,cmd="], capture_output=True, text=True, check=True).stdout
    return [line for line in ps.splitlines() if int(line.split()[0]) in pgids and not line.split()[1].startswith("Z")]


def assert_all_stopped(pgids: list[int], patience: float = 15.0) -> None:
    deadline = time.monotonic() + patience
    while live_members(pgids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not live_members(pgids)


def test_loopback_deployment_with_tls_matches_inprocess(tiny_cfg, tmp_path):
    ref = run_inprocess(tiny_cfg, tmp_path / "inprocess", quiet=True)
    got = run_loopback(tiny_cfg, tmp_path / "deploy", tls=True, timeout=900)
    assert got["engine"] == "flower-deploy"
    for a, b in zip(ref["clients"], got["clients"], strict=True):
        assert a["id"] == b["id"]
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-6)
        assert b["reward_margin"] == pytest.approx(a["reward_margin"], rel=1e-4, abs=1e-6)
    logs = (tmp_path / "deploy" / "deploy" / "logs" / "superlink.log").read_text()
    assert "--insecure" not in logs and "TLS disabled" not in logs


def test_killed_supernode_is_tolerated_and_rejoins(tiny_cfg, tmp_path):
    out, workdir = tmp_path / "run", tmp_path / "deploy"
    workdir.mkdir()
    save_config(tiny_cfg, workdir / "run.toml")
    run_config = {"config": str(workdir / "run.toml"), "out": str(out), "reply-timeout": 120.0}
    with LoopbackDeployment(workdir, tiny_cfg.num_clients) as dep:
        pids = [p.pid for p in dep.procs.values()]
        run = dep.submit(run_config)
        pids.append(run.pid)
        deadline = time.monotonic() + 600
        metrics = out / "metrics.jsonl"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= tiny_cfg.num_clients):
            assert run.poll() is None and time.monotonic() < deadline, "round 0 never finished"
            time.sleep(0.2)
        dep.kill_supernode(0)  # round 1's training has just been sent
        dep.start_supernode(0)  # same partition and disk: rejoins with a new node id
        pids.append(dep.procs["supernode-0"].pid)
        assert run.wait(timeout=900) == 0
    assert_all_stopped(pids)

    summary = json.loads((out / "summary.json").read_text())
    rows = {(r["round"], r["client"]): r for r in map(json.loads, metrics.read_text().splitlines())}
    assert rows[(1, 0)]["train/failed"] == 1.0
    assert "train_loss" in rows[(1, 1)]  # round 1 aggregated the reply it got
    assert "train_loss" in rows[(2, 0)]  # the restarted node trained again in round 2
    assert [(f["round"], f["client"]) for f in summary["rejected_updates"]] == [(1, 0)]
    assert [c["id"] for c in summary["clients"]] == [0, 1]
