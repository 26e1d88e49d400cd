"""Command line entry point: ``fedpdpo <command>``; each command lives in ``fedpdpo.commands.<name>``.

User errors (bad config, bad data, missing model) print one line and exit with code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from fedpdpo import __version__
from fedpdpo.errors import FedPDPOError, environment_error

#: Subcommand modules, each with ``register(subparsers)``.
COMMANDS = ["run", "node", "data", "config", "export", "generate", "evaluate", "compare", "tune", "report", "deploy"]


def offline_env() -> None:
    """Nothing is downloaded at run time; Flower must not install packages or phone home."""
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' per-load weight bars; we draw our own progress
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }.items():
        os.environ.setdefault(key, value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedpdpo", description="Federated, personalized preference alignment of LLMs."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--version", action="version", version=f"fedpdpo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"fedpdpo.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    offline_env()
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "urllib3", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except FedPDPOError as exc:
        if args.debug:
            raise
        print(f"fedpdpo: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a full disk or a read-only --out is the user's to fix, not a bug to trace
        error = environment_error(exc)
        if error is None or args.debug:
            raise
        print(f"fedpdpo: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("fedpdpo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
