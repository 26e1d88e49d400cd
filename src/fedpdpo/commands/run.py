"""``fedpdpo run``: train one federated job."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fedpdpo.errors import FedPDPOError, environment_error
from fedpdpo.jsonio import dumps


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run a federated training job")
    run.add_argument("--config", help="TOML config file (see configs/); not with --resume")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    run.add_argument("--out", help="output directory for config.toml, metrics.jsonl, summary.json")
    run.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR, or an interrupted --overwrite of it, after its last checkpoint (uses its "
        "config.toml, and the engine it was started with)",
    )
    run.add_argument(
        "--rounds",
        type=int,
        metavar="N",
        help="with --resume: raise the run's number of rounds to N (the only setting a resume may change)",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run already in --out, once the new run has finished (it runs in OUT.overwrite until then)",
    )
    run.add_argument("--on-bad-record", choices=["error", "skip"], help="what to do with invalid data records")
    run.add_argument(
        "--evaluate",
        action="store_true",
        help="when the run has finished, also do what `fedpdpo evaluate --run OUT` does with its defaults (judge "
        "and cross-client matrix), in this process: the frozen layers' outputs computed in training are reused",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar or tables")
    run.add_argument(
        "--json-logs", action="store_true", help="progress, round metrics and log records as JSON lines on stderr"
    )
    eng = run.add_argument_group("engine (docs/deployment.md)")
    eng.add_argument(
        "--engine",
        choices=ENGINES,
        help="inprocess (default; with --resume: the engine the run was started with); flower-sim: Flower's Ray "
        "simulation; flower-deploy: SuperLink + one node per client on 127.0.0.1 (loopback launcher)",
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
    eng.add_argument(
        "--node-data",
        action="append",
        metavar="ID=PATH",
        help="flower-deploy: client ID's node holds its own data file PATH (repeatable, one per client); the "
        "config then needs no data.path. With --resume: the files the run started with, unless given again",
    )
    eng.add_argument(
        "--node-test", action="append", metavar="ID=PATH", help="flower-deploy: client ID's node's own test file"
    )
    run.set_defaults(func=cmd_run)


ENGINES = ["inprocess", "flower-sim", "flower-deploy"]


def _id_paths(flag: str, values: list[str] | None) -> dict[int, str]:
    """``ID=PATH`` arguments by client id, paths made absolute (the nodes run elsewhere in the file system)."""
    out: dict[int, str] = {}
    for text in values or []:
        cid, sep, path = text.partition("=")
        if not sep or not cid.strip().isdigit() or not path:
            raise FedPDPOError(f"{flag} expects ID=PATH with a client id, got {text!r}")
        if int(cid) in out:
            raise FedPDPOError(f"{flag} names client {int(cid)} twice")
        out[int(cid)] = os.path.abspath(os.path.expanduser(path))
    return out


def node_files(args: argparse.Namespace):
    """Each loopback node's own files from ``--node-data``/``--node-test`` (None: the shared data.path)."""
    data, test = _id_paths("--node-data", args.node_data), _id_paths("--node-test", args.node_test)
    if (data or test) and args.engine != "flower-deploy":
        raise FedPDPOError("--node-data and --node-test need --engine flower-deploy")
    if stray := sorted(set(test) - set(data)):
        raise FedPDPOError(f"--node-test names client(s) {stray} without --node-data")
    if not data:
        return None
    # imported only here: the deployment module pulls in Flower and cryptography, which an in-process run never needs
    from fedpdpo.engines.flower.deploy import NodeFiles

    return {cid: NodeFiles(path, test.get(cid, "")) for cid, path in data.items()}


def recorded_engine(run_dir: str) -> str | None:
    """The engine that ran the run in ``run_dir`` up to its last checkpoint (None: no checkpoint yet)."""
    from fedpdpo.engines.checkpoint import load_checkpoint
    from fedpdpo.rundir import resume_source

    ckpt = load_checkpoint(resume_source(Path(run_dir)))
    return ckpt.fingerprint.get("engine") if ckpt is not None else None


def resume_config(args: argparse.Namespace):
    """The saved config of the run in ``--resume DIR``: a resumed run must use exactly the settings it started with.

    When an ``--overwrite`` of DIR was interrupted, that newer run (in DIR.overwrite) is the one continued.
    """
    from fedpdpo.config import load_config
    from fedpdpo.rundir import resume_source

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
    saved = resume_source(args.resume) / "config.toml"
    if not saved.is_file():
        raise FedPDPOError(f"--resume {args.resume}: no run to resume there (no config.toml); start it with --config")
    return load_config(saved), args.resume


def cmd_run(args: argparse.Namespace) -> int:
    from fedpdpo.config import load_config
    from fedpdpo.engines.setup import check_device, check_quantization

    if args.resume:
        cfg, args.out = resume_config(args)
        recorded = recorded_engine(args.resume)
        if args.engine and recorded in ENGINES and args.engine != recorded:
            raise FedPDPOError(f"--resume {args.resume}: the run was started with --engine {recorded}; resume it so")
        args.engine = args.engine or (recorded if recorded in ENGINES else "inprocess")
    else:
        args.engine = args.engine or "inprocess"
        if not args.config or not args.out:
            raise FedPDPOError("fedpdpo run needs --config FILE and --out DIR (or --resume DIR)")
        if args.rounds is not None:
            raise FedPDPOError("--rounds works with --resume only; for a new run use --set rounds=N")
        overrides = list(args.set or [])
        if args.on_bad_record:
            overrides.append(f'data.on_bad_record="{args.on_bad_record}"')
        cfg = load_config(args.config, overrides)
    check_device(cfg.device)
    check_quantization(cfg)
    args.nodes = node_files(args)  # checked before anything starts
    if args.evaluate and (args.nodes or not cfg.data.path):
        raise FedPDPOError(
            "--evaluate samples and scores each client's held-out pairs here, but the nodes hold the data "
            "(--node-data, or no data.path); drop --evaluate"
        )
    if args.json_logs:
        from fedpdpo.report.progress import use_json_logs

        use_json_logs()
    try:
        summary = _run(args, cfg)
    except OSError as exc:
        if (error := environment_error(exc)) is None:
            raise
        raise FedPDPOError(f"{error}{_resume_hint(args.out)}") from exc
    result = {
        "out": os.path.abspath(args.out),
        "algorithm": summary["algorithm"],
        "mean_accuracy_round0": summary["mean_accuracy_round0"],
        "mean_accuracy": summary["mean_accuracy"],
        "time_s": summary["time_s"],
    }
    if args.evaluate:
        from fedpdpo.commands.evaluate import brief
        from fedpdpo.evaluation import evaluate_run

        result["evaluation"] = brief(evaluate_run(args.out))
    print(dumps(result))
    return 0


def _run(args: argparse.Namespace, cfg) -> dict:
    from fedpdpo.engines.inprocess import run_inprocess

    if args.engine == "inprocess":
        if cfg.privacy.clipping_norm > 0 or cfg.privacy.secagg:
            raise FedPDPOError("[privacy] (DP clipping and noise, SecAgg+) needs --engine flower-sim or flower-deploy")
        return run_inprocess(
            cfg, args.out, quiet=args.quiet, overwrite=args.overwrite, resume=bool(args.resume), rounds=args.rounds
        )
    from fedpdpo.engines.flower import run_flower

    return run_flower(
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
        nodes=args.nodes,
        resume=bool(args.resume),
        rounds=args.rounds,
    )


def _resume_hint(out: str) -> str:
    """What to run after the disk was full, when the run got far enough to be continued."""
    from fedpdpo.rundir import resume_source

    if (resume_source(Path(out)) / "config.toml").is_file():
        return f"; free some space, then continue with `fedpdpo run --resume {out}`"
    return "; free some space and run the command again"
