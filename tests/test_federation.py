"""A federation of participants' own files, on the in-process Grid (the same ServerApp/ClientApp code as a real
deployment, synchronously): ``partition.method = "by_file"`` reproduces it in-process bit for bit, a bad file on
one node fails only that node (one line, reason in the metrics), a late joiner is trained and evaluated from the
round it joined, a killed server resumes exactly, a node whose state was lost is refused. ``fedpdpo node`` is
checked here without a SuperLink; tests/test_flower_deploy.py runs real nodes."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedpdpo.cli import build_parser, main
from fedpdpo.config import RunConfig, load_config
from fedpdpo.data import build_clients, load_client_files
from fedpdpo.engines.flower.client_app import NodeClient, node_setup
from fedpdpo.engines.flower.client_app import app as client_app
from fedpdpo.engines.flower.local_grid import LocalGrid
from fedpdpo.engines.flower.node import NodeSpec
from fedpdpo.engines.flower.records import config_text
from fedpdpo.engines.flower.server_app import ServerParams, make_server_app
from fedpdpo.engines.inprocess import run_inprocess
from fedpdpo.errors import ConfigError, FedPDPOError
from tests.conftest import TINY_DATA, interrupt_at_checkpoint

LONG_PROMPT = "Write a review of this film, keeping in mind everything said before. " * 60


def write_jsonl(path: Path, rows: Iterable[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def site_files(tmp_path: Path) -> list[tuple[str, str]]:
    """Two participants' files in their own directories, from the fixture: movies (its split field marks the test
    pairs, one prompt far longer than max_length) and books (a separate test file)."""
    rows = [json.loads(line) for line in TINY_DATA.read_text().splitlines()]
    movies = [r for r in rows if r["domain"] == "movies"]
    movies[1] = movies[1] | {"prompt": LONG_PROMPT}
    books = [{k: v for k, v in r.items() if k != "split"} for r in rows if r["domain"] == "books"]
    return [
        (write_jsonl(tmp_path / "site_a" / "movies.jsonl", movies), ""),
        (
            write_jsonl(tmp_path / "site_b" / "train.jsonl", books[:30]),
            write_jsonl(tmp_path / "site_b" / "test.jsonl", books[30:]),
        ),
    ]


def by_file(cfg: RunConfig, files: list[tuple[str, str]]) -> RunConfig:
    """``cfg`` reproducing a federation of ``files`` in-process."""
    cfg.partition.method, cfg.partition.conflict_fraction = "by_file", 0.0
    cfg.num_clients = len(files)
    cfg.data.path, cfg.data.test_path = files[0]
    cfg.data.extra_paths = [f for f, _ in files[1:]]
    cfg.data.extra_test_paths = [t for _, t in files[1:]]
    cfg.validate()
    return cfg


def federated(cfg: RunConfig, n: int) -> RunConfig:
    """``cfg`` as the server of a federation of ``n`` nodes holding their own files: no data.path."""
    cfg.partition.conflict_fraction = 0.0
    cfg.num_clients = n
    cfg.data.path, cfg.data.test_path, cfg.data.extra_paths = "", "", []
    cfg.validate()
    return cfg


def node_configs(files: list[tuple[str, str]], state: Path | None = None) -> list[dict]:
    configs = []
    for cid, (data, test) in enumerate(files):
        config: dict = {"client-id": cid, "data-path": data} | ({"test-path": test} if test else {})
        configs.append(config | ({"state-dir": str(state / f"node{cid}")} if state else {}))
    return configs


def run_grid(
    cfg: RunConfig, out: Path, configs: list[dict], grid_type=LocalGrid, engine: str = "flower-local", **params
) -> dict:
    grid = grid_type(client_app, len(configs), node_configs=configs)
    server_app = make_server_app(ServerParams(cfg, str(out), engine, node_wait=0.0, **params))
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    return json.loads((out / "summary.json").read_text())


def rows_of(out: Path) -> dict[tuple[int, int], dict]:
    return {(r["round"], r["client"]): r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def assert_same_results(a: Path, b: Path) -> None:
    """Every metric of every round and the final global tensors, bit for bit."""
    assert rows_of(a) == rows_of(b)
    assert (a / "global.safetensors").read_bytes() == (b / "global.safetensors").read_bytes()


# -- one participant's data ----------------------------------------------------------------------------------------


def test_by_file_config_is_checked(tiny_cfg):
    tiny_cfg.partition.method, tiny_cfg.partition.conflict_fraction = "by_file", 0.0
    with pytest.raises(ConfigError, match=r"one client per data file.*'num_clients' is 2.*1 file"):
        tiny_cfg.validate()
    tiny_cfg.num_clients, tiny_cfg.data.extra_paths = 2, [str(TINY_DATA)]
    tiny_cfg.validate()
    tiny_cfg.data.extra_test_paths = ["", ""]
    with pytest.raises(ConfigError, match=r"one entry per data\.extra_paths file"):
        tiny_cfg.validate()
    tiny_cfg.data.extra_test_paths, tiny_cfg.partition.conflict_fraction = [], 0.5
    with pytest.raises(ConfigError, match="conflict_fraction' must be 0"):
        tiny_cfg.validate()
    tiny_cfg.partition.method, tiny_cfg.data.extra_test_paths = "iid", [""]
    with pytest.raises(ConfigError, match=r"extra_test_paths' needs partition\.method"):
        tiny_cfg.validate()


def test_a_participants_test_pairs_and_seeds_are_its_own(tiny_cfg, tmp_path):
    files = site_files(tmp_path)
    tiny_cfg.partition.conflict_fraction = 0.0
    movies, _ = load_client_files(0, files[0][0], "", tiny_cfg)
    assert len(movies.test) == 8 and all(r.split == "test" for r in movies.test)  # the file's split field
    books, _ = load_client_files(1, *files[1], tiny_cfg)
    assert len(books.train) == 30 and len(books.test) == 10  # the separate test file
    seeded, _ = load_client_files(1, files[1][0], "", tiny_cfg)  # no split field, no test file: test_fraction
    assert len(seeded.test) == round(0.2 * 30) and not seeded.conflict
    # a client's data depends on (seed, client id) and its own file only, as on a node that has nothing else
    clients, _ = build_clients(by_file(tiny_cfg, files))
    assert [c.train for c in clients] == [movies.train, books.train]
    again, _ = load_client_files(1, files[1][0], "", tiny_cfg)
    assert again.test == seeded.test
    other, _ = load_client_files(2, files[1][0], "", tiny_cfg)
    assert other.test != seeded.test


# -- parity: a federation of files equals its in-process by_file reproduction --------------------------------------


def test_node_files_match_inprocess_by_file_and_truncate_a_long_prompt_alike(tiny_cfg, tmp_path):
    files = site_files(tmp_path)
    ref = run_inprocess(by_file(copy.deepcopy(tiny_cfg), files), tmp_path / "inprocess", quiet=True)
    got = run_grid(federated(tiny_cfg, 2), tmp_path / "nodes", node_configs(files, tmp_path / "state"))
    assert_same_results(tmp_path / "inprocess", tmp_path / "nodes")
    assert [c["id"] for c in got["clients"]] == [0, 1] and got["clients"] == ref["clients"]
    # the long prompt was cut the same way on both sides (the template kept): the row above says so bit for bit
    assert got["clients"][0]["prompts_truncated"] > 0
    assert load_config(tmp_path / "nodes" / "config.toml").data.path == ""  # the server named no data file
    # each node kept its client's state in its own directory, under the run's id
    runs = list((tmp_path / "state" / "node1").glob("run-*"))
    assert len(runs) == 1 and list(runs[0].glob("client_1/rounds/round_*/local.safetensors"))
    assert not (tmp_path / "nodes" / "clients").exists()


# -- faults: bad data on one node, a late joiner ---------------------------------------------------------------------


def test_bad_file_on_one_node_fails_only_that_node_with_one_line(tiny_cfg, tmp_path, caplog):
    files = site_files(tmp_path)
    lines = Path(files[1][0]).read_text().splitlines(keepends=True)
    lines[2] = '{"prompt": "x", "chosen": \n'
    Path(files[1][0]).write_text("".join(lines))
    tiny_cfg.rounds = 2
    with caplog.at_level(logging.ERROR, logger="fedpdpo.engines.flower.client_app"):
        summary = run_grid(federated(tiny_cfg, 2), tmp_path / "run", node_configs(files))
    where = f"{files[1][0]}:3: malformed JSON"
    errors = [r for r in caplog.records if r.name == "fedpdpo.engines.flower.client_app"]
    assert errors and all(where in r.getMessage() and "\n" not in r.getMessage() for r in errors)
    assert all(r.exc_info is None for r in errors)  # one line, no traceback
    rows = rows_of(tmp_path / "run")
    for server_round in (0, 1, 2):
        assert rows[(server_round, 1)]["eval/failed"] == 1.0
        assert rows[(server_round, 1)]["eval/error"].startswith(f"node 1001: {where}")
        assert "accuracy" in rows[(server_round, 0)]
    assert rows[(1, 1)]["train/error"].startswith(f"node 1001: {where}")
    assert "train_loss" in rows[(1, 0)] and "train_loss" in rows[(2, 0)]  # the other node went on
    assert [c["id"] for c in summary["clients"]] == [0]
    assert [(r["round"], r["client"]) for r in summary["rejected_updates"]] == [(1, 1), (2, 1)]


def test_a_node_may_skip_its_own_bad_records(tiny_cfg, tmp_path):
    """``fedpdpo node --on-bad-record skip``: the participant's choice for its own file (the run config says error)."""
    files = site_files(tmp_path)
    Path(files[1][0]).write_text(Path(files[1][0]).read_text() + "not json\n")
    cfg = federated(tiny_cfg, 2)
    with pytest.raises(FedPDPOError, match=r"train\.jsonl:31: malformed JSON"):
        node_setup(config_text(cfg), NodeClient(1, files[1][0]))
    setup = node_setup(config_text(cfg), NodeClient(1, files[1][0], "", "skip"))
    assert len(setup.client.train) + len(setup.client.test) == 30


class LateGrid(LocalGrid):
    """Node 1001 connects only once the server has sent round ``join``'s first messages."""

    def __init__(self, *args, join: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.join, self.sent_round = join, -1

    def get_node_ids(self):
        return [n for n in self.contexts if n != 1001 or self.sent_round >= self.join]

    def push_messages(self, messages):
        messages = list(messages)
        for m in messages:
            if m.metadata.group_id.isdigit():
                self.sent_round = max(self.sent_round, int(m.metadata.group_id))
        return super().push_messages(messages)


def test_late_joiner_is_evaluated_and_trained_from_the_round_it_joined(tiny_cfg, tmp_path):
    files = site_files(tmp_path)
    tiny_cfg.rounds = 3
    summary = run_grid(federated(tiny_cfg, 2), tmp_path / "run", node_configs(files), grid_type=LateGrid)
    rows = rows_of(tmp_path / "run")
    assert rows[(0, 1)]["eval/error"] == "no SuperNode holds this client"
    assert rows[(1, 1)]["train/error"] == "no SuperNode holds this client"
    assert "accuracy" in rows[(1, 1)]  # connected during round 1: evaluated with round 1's global, seeded modules
    assert "train_loss" in rows[(2, 1)] and "train_loss" in rows[(3, 1)]
    clients = {c["id"]: c for c in summary["clients"]}
    assert clients[0]["joined_round"] == 0 and clients[1]["joined_round"] == 1
    assert clients[1]["rounds_trained"] == 2 and clients[0]["rounds_trained"] == 3


def test_node_outside_the_clients_is_ignored(tiny_cfg, tmp_path, caplog):
    files = site_files(tmp_path)
    configs = node_configs(files)
    configs[1]["client-id"] = 7
    tiny_cfg.rounds = 1
    with caplog.at_level(logging.WARNING):
        run_grid(federated(tiny_cfg, 2), tmp_path / "run", configs)
    assert "node 1001 holds client 7, outside 0..1 (num_clients): ignored" in caplog.text
    assert rows_of(tmp_path / "run")[(1, 1)]["eval/error"] == "no SuperNode holds this client"


# -- resume: the server killed, the nodes' state on their own disks ---------------------------------------------------


def test_killed_server_resumes_exactly_with_the_nodes_state(tiny_cfg, tmp_path, monkeypatch):
    files = site_files(tmp_path)
    tiny_cfg.rounds = 3
    run_inprocess(by_file(copy.deepcopy(tiny_cfg), files), tmp_path / "uninterrupted", quiet=True)
    cfg, out, configs = federated(tiny_cfg, 2), tmp_path / "run", node_configs(files, tmp_path / "state")
    interrupt_at_checkpoint(monkeypatch, 2)  # killed in round 2: the nodes saved round 2, the server did not
    with pytest.raises(KeyboardInterrupt):
        run_grid(cfg, out, configs)
    run_grid(load_config(out / "config.toml"), out, configs, resume=True)
    assert_same_results(tmp_path / "uninterrupted", out)
    assert len(list((tmp_path / "state" / "node0").glob("run-*"))) == 1  # the resumed run kept its id


def test_resume_refuses_a_node_whose_state_was_lost(tiny_cfg, tmp_path, monkeypatch):
    files = site_files(tmp_path)
    tiny_cfg.rounds = 3
    cfg, out, configs = federated(tiny_cfg, 2), tmp_path / "run", node_configs(files, tmp_path / "state")
    interrupt_at_checkpoint(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_grid(cfg, out, configs)
    shutil.rmtree(tmp_path / "state" / "node0")  # node 0's disk was wiped while the server was down
    summary = run_grid(load_config(out / "config.toml"), out, configs, resume=True)
    rows = rows_of(out)
    for key in ((2, 0), (3, 0)):
        assert "lost or replaced" in rows[key]["train/error"] and "round 1" in rows[key]["train/error"]
    assert "train_loss" in rows[(3, 1)]
    assert [c["id"] for c in summary["clients"]] == [1]


# -- fedpdpo node and run --------------------------------------------------------------------------------------------


def test_node_help_documents_every_flag(capsys):
    node = build_parser()._subparsers._group_actions[0].choices["node"]  # type: ignore[union-attr]
    flags = [a for a in node._actions if a.option_strings and a.dest != "help"]
    assert {f.option_strings[0] for f in flags} >= {
        "--superlink",
        "--root-certificates",
        "--insecure",
        "--client-id",
        "--data",
        "--test",
        "--on-bad-record",
        "--state-dir",
        "--auth-key",
        "--partition-id",
        "--runtime-port",
    }
    assert all(f.help and len(f.help) > 20 for f in flags)
    with pytest.raises(SystemExit):
        main(["node", "--help"])
    text = capsys.readouterr().out
    assert all(f.option_strings[0] in text for f in flags)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (NodeSpec("h:1"), "either --client-id N with --data FILE, or --partition-id N"),
        (NodeSpec("h:1", client_id=0), "--client-id needs --data"),
        (NodeSpec("h:1", client_id=0, data="/no/such.jsonl"), "--data /no/such.jsonl does not exist"),
        (NodeSpec("h:1", partition_id=0, data=str(TINY_DATA)), "drop --data"),
        (NodeSpec("h:1", client_id=-1, data=str(TINY_DATA)), "--client-id must be >= 0"),
        (NodeSpec("h:1", client_id=0, data=str(TINY_DATA), auth_key=str(TINY_DATA)), "--auth-key needs TLS"),
    ],
)
def test_node_refuses_what_could_not_serve_a_run(spec, message):
    with pytest.raises(FedPDPOError, match=message):
        spec.check()


def test_node_config_names_the_participants_files(tmp_path):
    spec = NodeSpec("10.0.0.5:9092", str(TINY_DATA), client_id=2, data=str(TINY_DATA), state_dir=str(tmp_path))
    assert spec.node_config() == {"client-id": 2, "data-path": str(TINY_DATA), "state-dir": str(tmp_path)}
    cmd = spec.supernode_command(9094, tmp_path / "node.toml", tmp_path / "secret")
    assert cmd[cmd.index("--isolation") + 1] == "process" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert "--root-certificates" in cmd and "--insecure" not in cmd


def test_run_refuses_node_files_without_flower_deploy(tmp_path, capsys):
    args = ["run", "--config", str(TINY_DATA.parent.parent / "configs" / "tiny.toml"), "--out", str(tmp_path / "o")]
    assert main([*args, "--node-data", f"0={TINY_DATA}"]) == 2
    assert "--node-data and --node-test need --engine flower-deploy" in capsys.readouterr().err
    assert main([*args, "--engine", "flower-deploy", "--node-data", "zero=x"]) == 2
    assert "--node-data expects ID=PATH" in capsys.readouterr().err
    node = ["--engine", "flower-deploy", "--node-data", f"0={TINY_DATA}", "--evaluate"]
    assert main([*args, *node]) == 2  # the data lives on the nodes: nothing to evaluate here
    assert "drop --evaluate" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_resume_continues_with_the_engine_that_started_the_run(tiny_cfg, tmp_path, monkeypatch, capsys):
    """A killed flower-sim run resumes on flower-sim (the checkpoint records the engine); another one is refused."""
    from fedpdpo.engines import flower

    out = tmp_path / "run"
    interrupt_at_checkpoint(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run_grid(tiny_cfg, out, [{"partition-id": i} for i in range(2)], engine="flower-sim")
    assert main(["run", "--resume", str(out), "--engine", "flower-deploy"]) == 2
    assert "started with --engine flower-sim" in capsys.readouterr().err
    calls = []
    summary = {"algorithm": "fedpdpo", "mean_accuracy_round0": 0.5, "mean_accuracy": 0.5, "time_s": 1.0}
    monkeypatch.setattr(flower, "run_flower", lambda engine, cfg, out, **kw: calls.append((engine, kw)) or summary)
    assert main(["run", "--resume", str(out), "--rounds", "3"]) == 0
    assert [(engine, kw["resume"], kw["rounds"]) for engine, kw in calls] == [("flower-sim", True, 3)]


def test_a_supernode_that_keeps_exiting_is_given_up(monkeypatch):
    """``fedpdpo node`` starts its SuperNode again when it exits (a restarted SuperLink forgets the node), but not
    forever when it exits right after every start."""
    import signal
    import sys

    from fedpdpo.engines.flower import node

    monkeypatch.setattr(node.NodeSpec, "supernode_command", lambda *_: [sys.executable, "-c", "raise SystemExit(3)"])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(FedPDPOError, match=r"exited 3 times in a row right after its start \(last exit code 3\)"):
            node.run_node(NodeSpec("127.0.0.1:1", client_id=0, data=str(TINY_DATA)), restart_delay=0.0)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_no_summary_without_a_client_evaluated_in_the_last_round(tiny_cfg, tmp_path):
    files = site_files(tmp_path)
    for data, _ in files:
        Path(data).write_text("not json\n")
    tiny_cfg.rounds = 1
    with pytest.raises(FedPDPOError, match=r"no client was evaluated in the last round \(1; metrics\.jsonl says why"):
        run_grid(federated(tiny_cfg, 2), tmp_path / "run", node_configs(files))
    assert all("malformed JSON" in r["eval/error"] for r in rows_of(tmp_path / "run").values())
    assert not (tmp_path / "run" / "summary.json").exists()
