"""Command line: ``fedpdpo run``, ``fedpdpo data validate``.

User errors (bad config, bad data, missing model) print one line and exit with code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable

from fedpdpo.errors import FedPDPOError

log = logging.getLogger("fedpdpo")


def _offline_env() -> None:
    # Nothing is downloaded at run time; Flower must not install or phone home.
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }.items():
        os.environ.setdefault(key, value)


def cmd_run(args: argparse.Namespace) -> int:
    from fedpdpo.config import load_config
    from fedpdpo.engines.inprocess import run_inprocess

    overrides = list(args.set or [])
    if args.on_bad_record:
        overrides.append(f'data.on_bad_record="{args.on_bad_record}"')
    cfg = load_config(args.config, overrides)
    summary = run_inprocess(cfg, args.out, quiet=args.quiet, overwrite=args.overwrite)
    print(
        json.dumps(
            {
                "out": os.path.abspath(args.out),
                "algorithm": summary["algorithm"],
                "mean_accuracy_round0": summary["mean_accuracy_round0"],
                "mean_accuracy": summary["mean_accuracy"],
                "time_s": summary["time_s"],
            }
        )
    )
    return 0


def cmd_data_validate(args: argparse.Namespace) -> int:
    from fedpdpo.data import check_file

    status = 0
    for path in args.files:
        problems = check_file(path)
        for line in problems:
            print(line)
        if problems:
            status = 2
        else:
            print(f"{path}: ok", file=sys.stderr)
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpdpo", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a federated training job")
    run.add_argument("--config", required=True, help="TOML config file (see configs/)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    run.add_argument(
        "--out", required=True, help="output directory for config.toml, metrics.jsonl, summary.json"
    )
    run.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    run.add_argument(
        "--on-bad-record", choices=["error", "skip"], help="what to do with invalid data records"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar or tables")
    run.set_defaults(func=cmd_run)

    data = sub.add_parser("data", help="data tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    validate = data_sub.add_parser("validate", help="check data files; prints FILE:LINE: problem lines")
    validate.add_argument("files", nargs="+")
    validate.set_defaults(func=cmd_data_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    _offline_env()
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "urllib3", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except FedPDPOError as exc:
        if args.debug:
            raise
        print(f"fedpdpo: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fedpdpo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
