"""``fedpdpo run``: train one federated job."""

from __future__ import annotations

import argparse
import json
import os

from fedpdpo.errors import FedPDPOError


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run a federated training job")
    run.add_argument("--config", help="TOML config file (see configs/); not with --resume")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    run.add_argument("--out", help="output directory for config.toml, metrics.jsonl, summary.json")
    run.add_argument(
        "--resume", metavar="DIR", help="continue the run in DIR after its last checkpoint (uses DIR/config.toml)"
    )
    run.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    run.add_argument("--on-bad-record", choices=["error", "skip"], help="what to do with invalid data records")
    run.add_argument("--quiet", action="store_true", help="no progress bar or tables")
    run.add_argument(
        "--json-logs", action="store_true", help="progress, round metrics and log records as JSON lines on stderr"
    )
    eng = run.add_argument_group("engine (docs/deployment.md)")
    eng.add_argument(
        "--engine",
        choices=["inprocess", "flower-sim", "flower-deploy"],
        default="inprocess",
        help="inprocess (default); flower-sim: Flower's Ray simulation; flower-deploy: SuperLink + one SuperNode "
        "per client on 127.0.0.1 (loopback launcher)",
    )
    eng.add_argument("--sim-cpus", type=float, default=1.0, help="flower-sim: CPUs per virtual client (Ray)")
    eng.add_argument("--sim-gpus", type=float, default=0.0, help="flower-sim: GPUs per virtual client (Ray)")
    eng.add_argument(
        "--min-fit-replies", type=int, default=1, help="Flower engines: fewer accepted updates keep the old global"
    )
    eng.add_argument(
        "--reply-timeout", type=float, default=0.0, help="flower-deploy: seconds to wait for a round's replies (0=none)"
    )
    eng.add_argument("--tls", action="store_true", help="flower-deploy loopback: TLS with a throw-away CA")
    run.set_defaults(func=cmd_run)


def resume_config(args: argparse.Namespace):
    """The saved config of the run in ``--resume DIR``: a resumed run must use exactly the settings it started with."""
    from fedpdpo.config import load_config

    conflicting = [
        flag
        for flag, value in (
            ("--config", args.config),
            ("--set", args.set),
            ("--overwrite", args.overwrite),
            ("--on-bad-record", args.on_bad_record),
        )
        if value
    ]
    if conflicting:
        raise FedPDPOError(f"--resume uses the run's own config.toml; drop {', '.join(conflicting)}")
    if args.out and os.path.abspath(args.out) != os.path.abspath(args.resume):
        raise FedPDPOError("--resume DIR writes to DIR; drop --out or give the same directory")
    saved = os.path.join(args.resume, "config.toml")
    if not os.path.isfile(saved):
        raise FedPDPOError(f"--resume {args.resume}: no run to resume there (no config.toml); start it with --config")
    return load_config(saved), args.resume


def cmd_run(args: argparse.Namespace) -> int:
    from fedpdpo.config import load_config
    from fedpdpo.engines.inprocess import run_inprocess

    if args.resume:
        cfg, args.out = resume_config(args)
    else:
        if not args.config or not args.out:
            raise FedPDPOError("fedpdpo run needs --config FILE and --out DIR (or --resume DIR)")
        overrides = list(args.set or [])
        if args.on_bad_record:
            overrides.append(f'data.on_bad_record="{args.on_bad_record}"')
        cfg = load_config(args.config, overrides)
    if args.json_logs:
        from fedpdpo.report.progress import use_json_logs

        use_json_logs()
    if args.engine == "inprocess":
        if cfg.privacy.clipping_norm > 0 or cfg.privacy.secagg:
            raise FedPDPOError("[privacy] (DP clipping and noise, SecAgg+) needs --engine flower-sim or flower-deploy")
        summary = run_inprocess(cfg, args.out, quiet=args.quiet, overwrite=args.overwrite, resume=bool(args.resume))
    else:
        from fedpdpo.engines.flower import run_flower

        if args.resume:
            raise FedPDPOError(f"--resume works with --engine inprocess only, not {args.engine}")
        summary = run_flower(
            args.engine,
            cfg,
            args.out,
            quiet=args.quiet,
            overwrite=args.overwrite,
            min_fit_replies=args.min_fit_replies,
            reply_timeout=args.reply_timeout,
            sim_cpus=args.sim_cpus,
            sim_gpus=args.sim_gpus,
            tls=args.tls,
        )
    result = {
        "out": os.path.abspath(args.out),
        "algorithm": summary["algorithm"],
        "mean_accuracy_round0": summary["mean_accuracy_round0"],
        "mean_accuracy": summary["mean_accuracy"],
        "time_s": summary["time_s"],
    }
    print(json.dumps(result))
    return 0
