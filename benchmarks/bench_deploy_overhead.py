"""Per-round overhead of a deployed round beyond training time (docs/deployment.md, "Overhead").

Runs a loopback deployment (a SuperLink and one node per client on 127.0.0.1, as ``fedpdpo run --engine
flower-deploy`` starts them) whose Flower app names this module's wrappers as its components:

* the ServerApp wrapper times each exchange of the server loop (one round's train messages, one round's evaluate
  messages): from sending to the last reply, as the server sees it;
* the ClientApp wrapper times, per message and node, what fedpdpo computes (``fit`` / ``evaluate``, the training
  and evaluation work itself), the whole handler (that work + model build, tokenization and state I/O when they
  happen), and the process age at handler entry (process start + imports + Flower's message pull, when the node
  starts a process per message).

The overhead of an exchange is its wall time minus the slowest node's compute; a round's overhead is the sum over
its exchanges (round 0: evaluation only; later rounds: training + evaluation).

    PYTHONPATH=src:benchmarks python benchmarks/bench_deploy_overhead.py --json overhead.json
    PYTHONPATH=src:benchmarks python benchmarks/bench_deploy_overhead.py --config configs/tiny.toml

Defaults: configs/demo.toml (SmolLM2) with 2 clients, 1 round, 2 local steps, 16 training / 8 test pairs each,
1 torch thread per node.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR_ENV = "FEDPDPO_BENCH_DIR"
SMALL = [
    "num_clients=2",
    "rounds=1",
    "local_steps=2",
    "threads=1",
    "data.max_train_per_client=16",
    "data.max_test_per_client=8",
    "partition.conflict_fraction=0.0",
]


def _record(name: str, row: dict[str, Any]) -> None:
    directory = os.environ.get(BENCH_DIR_ENV)
    if directory:
        with open(Path(directory) / name, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


def _server_app():
    """fedpdpo's ServerApp, with every exchange of the server loop timed."""
    from fedpdpo.engines.flower import server_app as sa

    send = sa.GridTransport._send

    def timed_send(self, kind, server_round, client_ids, *args, **kwargs):
        start = time.perf_counter()
        out = send(self, kind, server_round, client_ids, *args, **kwargs)
        _record("server.jsonl", {"round": server_round, "kind": kind, "wall_s": time.perf_counter() - start})
        return out

    sa.GridTransport._send = timed_send
    return sa.app


def _client_app():
    """fedpdpo's ClientApp, with each message's compute, handler time and process age recorded."""
    import psutil
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    from fedpdpo.engines.flower import client_app as ca

    compute: dict[str, float] = {}

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                compute["s"] = compute.get("s", 0.0) + time.perf_counter() - start

        return wrapper

    ca.fit, ca.evaluate = timed(ca.fit), timed(ca.evaluate)
    created = psutil.Process().create_time()
    app = ClientApp()

    def handle(msg: Message, ctx: Context) -> Message:
        entry = time.time()
        compute.clear()
        start = time.perf_counter()
        reply = ca.app(msg, ctx)
        config = msg.content.config_records.get("config")
        _record(
            f"client-{os.getpid()}.jsonl",
            {
                "node": ctx.node_id,
                "pid": os.getpid(),
                "kind": msg.metadata.message_type,
                "round": int(config["server-round"]) if config is not None else None,
                "age_at_entry_s": entry - created,
                "handler_s": time.perf_counter() - start,
                "compute_s": compute.get("s", 0.0),
            },
        )
        return reply

    app.train()(handle)
    app.evaluate()(handle)
    app.query()(handle)
    return app


#: The Flower components (``flwr run`` looks for module-level assignments). They are built when a Flower process
#: imports this module, not when it runs as the launcher script.
if __name__ != "__main__":
    server_app = _server_app()
    client_app = _client_app()


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


def analyse(bench: Path) -> dict[str, Any]:
    server = _rows(bench / "server.jsonl")
    clients = [row for f in sorted(bench.glob("client-*.jsonl")) for row in _rows(f)]
    clients = [c for c in clients if c["kind"] in ("train", "evaluate")]
    exchanges = []
    for s in server:
        mine = [c for c in clients if c["round"] == s["round"] and c["kind"] == s["kind"]]
        slowest = max((c["compute_s"] for c in mine), default=0.0)
        exchanges.append(s | {"max_compute_s": slowest, "overhead_s": s["wall_s"] - slowest})
    rounds: dict[int, float] = {}
    for e in exchanges:
        rounds[e["round"]] = rounds.get(e["round"], 0.0) + e["overhead_s"]
    return {
        "exchanges": exchanges,
        "overhead_per_round_s": rounds,
        "mean_overhead_per_round_s": statistics.fmean(rounds.values()) if rounds else None,
        "messages": len(clients),
        "processes": len({c["pid"] for c in clients}),
        "mean_age_at_entry_s": statistics.fmean(c["age_at_entry_s"] for c in clients) if clients else None,
        "mean_handler_minus_compute_s": statistics.fmean(c["handler_s"] - c["compute_s"] for c in clients)
        if clients
        else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.toml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    parser.add_argument("--json", metavar="PATH", help="also write the result here")
    parser.add_argument("--workdir", help="keep the run here (default: a temporary directory)")
    args = parser.parse_args(argv)

    from fedpdpo.cli import offline_env
    from fedpdpo.config import load_config, save_config
    from fedpdpo.engines.flower import deploy

    offline_env()
    cfg = load_config(args.config, SMALL + args.set)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fedpdpo-overhead-")).resolve()
    bench = workdir / "bench"
    bench.mkdir(parents=True, exist_ok=True)
    os.environ[BENCH_DIR_ENV] = str(bench)
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), here, os.environ.get("PYTHONPATH", "")])
    components = deploy.APP_PYPROJECT["tool"]["flwr"]["app"]["components"]  # type: ignore[index]
    components.update(serverapp="bench_deploy_overhead:server_app", clientapp="bench_deploy_overhead:client_app")
    config_file = workdir / "run.toml"
    save_config(cfg, config_file)
    out = workdir / "run"
    start = time.perf_counter()
    with deploy.LoopbackDeployment(workdir / "deploy", cfg.num_clients) as dep:
        proc = dep.submit({"config": str(config_file), "out": str(out)})
        code = proc.wait(timeout=3600)
    total = time.perf_counter() - start
    if code != 0 or not (out / "summary.json").is_file():
        print(f"the deployment failed (flwr run exit {code}); see {workdir / 'deploy' / 'logs'}", file=sys.stderr)
        return 1
    result = analyse(bench) | {
        "config": args.config,
        "overrides": SMALL + args.set,
        "total_s": round(total, 1),
        "load_average": os.getloadavg(),
        "workdir": str(workdir),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    print(f"mean_overhead_per_round_s={result['mean_overhead_per_round_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
