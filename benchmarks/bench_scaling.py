"""Scaling of the in-process engine with the number of clients: wall time and peak memory of a one-round run.

The in-process engine keeps one model in memory and swaps each client's private state (local modules, optimizer,
cached reference log-probs) in from and out to ``OUT/clients/client_<id>``, so peak memory should stay flat as
clients are added while wall time grows linearly (every client does the same fixed work: ``--train-per-client``
pairs, ``--steps`` steps). Each client count runs in its own subprocess, so its peak RSS is its own.

    python benchmarks/bench_scaling.py                           # tiny model, 3 / 10 / 30 clients
    python benchmarks/bench_scaling.py --model smollm2 --max-length 128 --max-prompt-length 0 --last-n-layers 4

Also reported: bytes of shared tensors each client sends per round (the only uplink traffic) and the client state
kept on disk. The CPU may be shared with other jobs, so wall times are noisy; the process's CPU seconds much less
(they still grow somewhat when two jobs share a core's caches); memory is not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_DATA = "/work/shared/data/imdb_sentiment_pairs.jsonl"
FORWARDED = ("model", "algorithm", "data", "train_per_client", "test_per_client", "steps", "batch_size")
FORWARDED += ("max_length", "max_prompt_length", "last_n_layers", "threads")


def child_env() -> dict[str, str]:
    """This checkout's ``src`` first on the children's path (an installed fedpdpo may be another checkout's)."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    return os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH", "")]))}


def run_config(args: argparse.Namespace, num_clients: int) -> dict[str, Any]:
    return {
        "algorithm": args.algorithm,
        "model": args.model,
        "seed": 0,
        "device": "cpu",
        "num_clients": num_clients,
        "rounds": 1,
        "local_steps": args.steps,
        "batch_size": args.batch_size,
        "eval_batch_size": 16,
        "max_length": args.max_length,
        "threads": args.threads,
        "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "last_n_layers": args.last_n_layers},
        "data": {
            "path": args.data,
            "max_train_per_client": args.train_per_client,
            "max_test_per_client": args.test_per_client,
            "max_prompt_length": args.max_prompt_length,
        },
    }


def child(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fedpdpo.config import config_from_dict
    from fedpdpo.engines.inprocess import run_inprocess
    from fedpdpo.engines.setup import build_setup

    cfg = config_from_dict(run_config(args, args.child))
    with tempfile.TemporaryDirectory() as tmp:
        start, cpu_start = time.perf_counter(), time.process_time()
        run_inprocess(cfg, Path(tmp) / "run", quiet=True)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        state_bytes = sum(f.stat().st_size for f in (Path(tmp) / "run").rglob("clients/**/*") if f.is_file())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    setup = build_setup(cfg)  # after the peak was read: only to size the uplink
    uplink = sum(setup.initial[n].numel() * setup.initial[n].element_size() for n in setup.shared_names)
    out = {
        "clients": args.child,
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_rss_bytes": peak,
        "uplink_bytes_per_client": uplink,
        "client_state_bytes_on_disk": state_bytes,
    }
    print(json.dumps(out))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="3,10,30", help="comma-separated client counts")
    p.add_argument("--model", default="tiny")
    p.add_argument("--algorithm", default="fedpdpo")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--train-per-client", type=int, default=16)
    p.add_argument("--test-per-client", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-prompt-length", type=int, default=16, help="0: chosen from the data (data.max_prompt_length)")
    p.add_argument("--last-n-layers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    forwarded = []
    for key in FORWARDED:
        forwarded += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    results = []
    header = ("clients", "wall s", "s/client", "CPU s/client", "peak RSS MiB", "uplink B/client", "state MiB")
    print("{:>7s} {:>8s} {:>9s} {:>13s} {:>13s} {:>16s} {:>10s}".format(*header))
    for n in (int(x) for x in args.clients.split(",")):
        cmd = [sys.executable, str(Path(__file__).resolve()), *forwarded, "--child", str(n)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), check=False)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"{n} clients: run failed (exit {proc.returncode})")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        print(
            f"{n:7d} {r['wall_s']:8.1f} {r['wall_s'] / n:9.2f} {r['cpu_s'] / n:13.2f} "
            f"{r['peak_rss_bytes'] / 2**20:13.0f} "
            f"{r['uplink_bytes_per_client']:16d} {r['client_state_bytes_on_disk'] / 2**20:10.1f}",
            flush=True,
        )
    growth = results[-1]["peak_rss_bytes"] / results[0]["peak_rss_bytes"]
    print(f"peak RSS {results[-1]['clients']} clients / {results[0]['clients']} clients: {growth:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
