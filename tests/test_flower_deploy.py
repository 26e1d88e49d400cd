"""Real Flower deployments on 127.0.0.1: ``flower-superlink`` + one ``fedpdpo node`` per client + ``flwr run``.

Every process is started and stopped by the test (also on failure: the launcher is a context manager that kills
each process group). They run in the default suite because they are the only end-to-end checks of real nodes:

* the docs/deployment.md walkthrough: three participants, each with its own file in its own directory and its own
  state directory, TLS, a server config without ``data.path``; the server side is killed mid-run twice, and the
  run resumed once with the nodes still running (a restarted SuperLink, the documented multi-machine commands) and
  once with ``fedpdpo run --resume``; the results equal the in-process ``by_file`` run of the same files;
* faults: a bad file on one node (one line in that node's log, the reason in the server's metrics, the others go
  on), a node that joins late, and a node killed mid-round and restarted (it rejoins with its state).

The shared-data mode of the nodes (``--partition-id``) runs the same ClientApp code, tested on the in-process Grid
(tests/test_flower_apps.py) and on Ray (tests/test_flower_sim.py).
"""

from __future__ import annotations

import copy
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from fedpdpo.cli import main
from fedpdpo.config import load_config, save_config
from fedpdpo.engines.checkpoint import load_checkpoint
from fedpdpo.engines.flower.deploy import LoopbackDeployment, NodeFiles, free_port, save_nodes
from fedpdpo.engines.inprocess import run_inprocess
from tests.conftest import ROOT, TINY_DATA
from tests.test_federation import by_file, federated, rows_of, write_jsonl

SHARED_DATA = ROOT.parent / "shared" / "data"  # IMDB and TruthfulQA pairs, where the configs expect them


def live_members(pgids: list[int]) -> list[str]:
    """Processes still running in these process groups (zombies waiting for init to reap them do not count)."""
    ps = subprocess.run(["ps", "-eo", "pgid=,stat=,cmd="], capture_output=True, text=True, check=True).stdout
    return [line for line in ps.splitlines() if int(line.split()[0]) in pgids and not line.split()[1].startswith("Z")]


def assert_all_stopped(pgids: list[int], patience: float = 15.0) -> None:
    deadline = time.monotonic() + patience
    while live_members(pgids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not live_members(pgids)


def wait_until(ready: Callable[[], bool], run: subprocess.Popen, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert run.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.1)


def metric_lines(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def participant_files(tmp_path: Path) -> list[tuple[str, str]]:
    """Three participants' files, 12 pairs each, in three directories: IMDB reviews (with a separate test file)
    and two groups of TruthfulQA categories (test pairs: a seeded share), from the shared data when this machine
    has it, else from the fixture's movies and books."""
    imdb, tqa = SHARED_DATA / "imdb_sentiment_pairs.jsonl", SHARED_DATA / "truthfulqa_pairs.jsonl"
    if imdb.is_file() and tqa.is_file():
        reviews = [json.loads(line) for line in imdb.read_text().splitlines()]
        train = [r for r in reviews if r["split"] == "train"][:12]
        test = [r for r in reviews if r["split"] == "test"][:4]
        truthful = [json.loads(line) for line in tqa.read_text().splitlines()]
        health = [r for r in truthful if r["domain"] in ("Health", "Nutrition")][:12]
        law = [r for r in truthful if r["domain"] in ("Law", "Economics")][:12]
    else:
        rows = [json.loads(line) for line in TINY_DATA.read_text().splitlines()]
        movies, books = [r for r in rows if r["domain"] == "movies"], [r for r in rows if r["domain"] == "books"]
        train, test = [r for r in movies if r["split"] == "train"][:12], [r for r in movies if r["split"] == "test"]
        health, law = books[:12], books[12:24]
    return [
        (
            write_jsonl(tmp_path / "hospital_a" / "pairs.jsonl", train),
            write_jsonl(tmp_path / "hospital_a" / "test.jsonl", test),
        ),
        (write_jsonl(tmp_path / "clinic_b" / "health.jsonl", health), ""),
        (write_jsonl(tmp_path / "firm_c" / "law.jsonl", law), ""),
    ]


def test_walkthrough_three_participants_server_killed_and_resumed(tiny_cfg, tmp_path):
    files = participant_files(tmp_path)
    tiny_cfg.rounds = 3
    run_inprocess(by_file(copy.deepcopy(tiny_cfg), files), tmp_path / "inprocess", quiet=True)

    cfg, out = federated(tiny_cfg, 3), tmp_path / "server" / "run"
    config_file = tmp_path / "server" / "fedpdpo.toml"
    config_file.parent.mkdir()
    save_config(cfg, config_file)
    nodes = {i: NodeFiles(data, test, str(Path(data).parent / "state")) for i, (data, test) in enumerate(files)}
    workdir = out / "deploy"  # where `fedpdpo run --resume` looks for the nodes a loopback run had
    workdir.mkdir(parents=True)
    save_nodes(workdir, nodes)

    def after(server_round: int) -> Callable[[], bool]:
        return lambda: (ckpt := load_checkpoint(out)) is not None and ckpt.server_round >= server_round

    with LoopbackDeployment(workdir, 3, tls=True, nodes=nodes) as dep:
        run = dep.submit({"config": str(config_file), "out": str(out)})
        wait_until(after(1), run, "round 1")
        # the server machine crashes (SuperLink and ServerApp) mid-run; the nodes keep running. As in
        # docs/deployment.md: restart the SuperLink, submit the run again with resume=true; the nodes join again
        dep.kill_superlink()
        dep.start_superlink()
        run = dep.submit({"out": str(out), "resume": True})
        wait_until(after(2), run, "round 2")
        dep.kill_superlink()  # and once more, now with the whole loopback deployment stopped after it
    ckpt = load_checkpoint(out)
    assert ckpt is not None and ckpt.server_round == 2 and not (out / "summary.json").exists()

    assert main(["run", "--resume", str(out), "--tls"]) == 0  # the same nodes, their state directories
    assert rows_of(out) == rows_of(tmp_path / "inprocess")  # every metric of every round, bit for bit
    assert (out / "global.safetensors").read_bytes() == (tmp_path / "inprocess" / "global.safetensors").read_bytes()
    assert json.loads((out / "summary.json").read_text())["engine"] == "flower-deploy"
    for i, (data, _) in enumerate(files):  # each participant's state stayed in its own directory, one run
        assert len(list((Path(data).parent / "state").glob(f"run-*/client_{i}/task.json"))) == 1
        log = (workdir / "logs" / f"supernode-{i}.log").read_text()
        assert f"from {ROOT / 'src' / 'fedpdpo'}" in log  # the nodes ran this checkout
    assert not (out / "clients").exists()
    assert main(["report", str(out)]) == 0 and (out / "report.md").is_file()


def test_faults_bad_file_late_joiner_and_killed_node(tiny_cfg, tmp_path):
    """Node 0 is killed right after round 1's training was sent and restarted; node 1's file has a bad record;
    node 2 joins after round 0. Each shows in the metrics as it should, and the run finishes."""
    files = [(data, "") for data, _ in participant_files(tmp_path)]
    bad = Path(files[1][0])
    lines = bad.read_text().splitlines(keepends=True)
    record = {"prompt": "Is it true?", "chosen": "", "rejected": "No."}
    bad.write_text("".join(lines[:4]) + json.dumps(record) + "\n" + "".join(lines[4:]))
    tiny_cfg.rounds = 3
    cfg, out, workdir = federated(tiny_cfg, 3), tmp_path / "run", tmp_path / "deploy"
    workdir.mkdir()
    save_config(cfg, workdir / "run.toml")
    nodes = {i: NodeFiles(files[i][0], state_dir=str(Path(files[i][0]).parent / "state")) for i in (0, 1)}
    run_config = {"config": str(workdir / "run.toml"), "out": str(out), "node-wait": 0.0, "reply-timeout": 40.0}
    with LoopbackDeployment(workdir, 3, nodes=nodes) as dep:
        pids = [p.pid for p in dep.procs.values()]
        for i in (0, 1):  # both up before the run starts; node 2 is not
            log, proc = workdir / "logs" / f"supernode-{i}.log", dep.procs[f"supernode-{i}"]
            wait_until(lambda log=log: log.is_file() and "SuperNode ID" in log.read_text(), proc, "node start", 180)
        run = dep.submit(run_config)
        pids.append(run.pid)
        wait_until(lambda: metric_lines(out) >= 3, run, "round 0")
        dep.kill_supernode(0)  # round 1's training has just been sent
        dep.start_supernode(0)  # same files and state directory: rejoins with a new node id
        assert dep.nodes is not None
        dep.nodes[2], dep.node_ports[2] = NodeFiles(files[2][0]), free_port()
        dep.start_supernode(2)  # joins while the run is under way
        pids += [dep.procs["supernode-0"].pid, dep.procs["supernode-2"].pid]
        assert run.wait(timeout=900) == 0
    assert_all_stopped(pids)

    rows, summary = rows_of(out), json.loads((out / "summary.json").read_text())
    # the bad file: one line in node 1's log, its reason in every row of client 1, the others go on
    where = f"{bad}:5: field 'chosen' is empty"
    assert all(rows[(r, 1)]["eval/error"].startswith("node ") and where in rows[(r, 1)]["eval/error"] for r in range(4))
    assert all(where in rows[(r, 1)]["train/error"] for r in (1, 2, 3))
    node1 = (workdir / "logs" / "supernode-1.log").read_text()
    assert where in node1 and "Traceback" not in node1
    # the killed node: round 1's update lost, back with its state from round 2 on
    assert rows[(1, 0)]["train/failed"] == 1.0 and rows[(1, 0)]["train/error"].startswith("node ")
    assert "train_loss" in rows[(2, 0)] and "train_loss" in rows[(3, 0)]
    assert [f["round"] for f in summary["rejected_updates"] if f["client"] == 0] == [1]
    # the late joiner: absent at round 0, evaluated from the round it joined, trained after
    clients = {c["id"]: c for c in summary["clients"]}
    assert sorted(clients) == [0, 2] and clients[0]["joined_round"] == 0
    assert rows[(0, 2)]["eval/error"] == "no SuperNode holds this client"
    joined = clients[2]["joined_round"]
    assert joined >= 1 and all("accuracy" in rows[(r, 2)] for r in range(joined, 4))
    assert clients[2]["rounds_trained"] == sum("train_loss" in rows[(r, 2)] for r in range(1, 4)) >= 1


def test_resume_needs_the_nodes_a_config_without_data_path_names(tiny_cfg, tmp_path, capsys):
    cfg = federated(tiny_cfg, 2)
    save_config(cfg, tmp_path / "c.toml")
    args = ["run", "--config", str(tmp_path / "c.toml"), "--engine", "flower-deploy", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "no data.path: give each node its own file with --node-data ID=PATH" in capsys.readouterr().err
    assert main([*args, "--node-data", f"5={TINY_DATA}"]) == 2
    assert "--node-data names client(s) [5], outside 0..1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert load_config(tmp_path / "c.toml").data.path == ""
