"""``fedpdpo run``: train one federated job."""

from __future__ import annotations

import argparse
import json
import os


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run a federated training job")
    run.add_argument("--config", required=True, help="TOML config file (see configs/)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    run.add_argument("--out", required=True, help="output directory for config.toml, metrics.jsonl, summary.json")
    run.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    run.add_argument("--on-bad-record", choices=["error", "skip"], help="what to do with invalid data records")
    run.add_argument("--quiet", action="store_true", help="no progress bar or tables")
    run.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from fedpdpo.config import load_config
    from fedpdpo.engines.inprocess import run_inprocess

    overrides = list(args.set or [])
    if args.on_bad_record:
        overrides.append(f'data.on_bad_record="{args.on_bad_record}"')
    cfg = load_config(args.config, overrides)
    summary = run_inprocess(cfg, args.out, quiet=args.quiet, overwrite=args.overwrite)
    result = {
        "out": os.path.abspath(args.out),
        "algorithm": summary["algorithm"],
        "mean_accuracy_round0": summary["mean_accuracy_round0"],
        "mean_accuracy": summary["mean_accuracy"],
        "time_s": summary["time_s"],
    }
    print(json.dumps(result))
    return 0
