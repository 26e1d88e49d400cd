"""``fedpdpo compare``: run several algorithms x seeds on one config and write a comparison report."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedpdpo.errors import FedPDPOError
from fedpdpo.jsonio import dumps


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise FedPDPOError(f"--seeds expects comma-separated integers, got {text!r}") from None


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options of every command that runs many runs of one config (``compare``, ``tune``)."""
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key for every run")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or round tables")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="runs at a time, each in its own process (cores shared; several GPUs: one each); results as when "
        "run one after another",
    )


def run_options(args: argparse.Namespace) -> list[int]:
    """Check the shared options; returns the seeds."""
    seeds = parse_seeds(args.seeds)
    if not seeds:
        raise FedPDPOError("--seeds must name at least one seed")
    if args.jobs < 1:
        raise FedPDPOError(f"--jobs must be at least 1, got {args.jobs}")
    return seeds


def register(sub: argparse._SubParsersAction) -> None:
    cmp = sub.add_parser(
        "compare",
        help="run algorithms x seeds fairly on one config; write comparison.json, report.md and plots",
        description="Every run uses the same config and overrides; only algorithm and seed change. Finished runs "
        "(OUT/<algorithm>/seed<k>/summary.json) are skipped, so re-running the command resumes.",
    )
    cmp.add_argument("--config", required=True, help="TOML config file shared by all runs")
    cmp.add_argument("--algorithms", required=True, help="comma-separated, e.g. fedpdpo,fedavg,local")
    add_run_options(cmp)
    cmp.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from fedpdpo.rundir import locked_dir
    from fedpdpo.sweep import run_comparison

    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    seeds = run_options(args)
    if not algorithms:
        raise FedPDPOError("--algorithms must name at least one algorithm")
    with locked_dir(Path(args.out)):  # one comparison per directory; each run also locks its own
        comparison = run_comparison(
            args.config, algorithms, seeds, args.out, args.set or [], quiet=args.quiet, workers=args.jobs
        )
    table = {
        a: {
            "mean_accuracy": round(comparison["algorithms"][a]["mean_accuracy"], 4),
            "std_accuracy": round(comparison["algorithms"][a]["std_accuracy"], 4),
        }
        for a in comparison["ranking"]
    }
    print(dumps({"out": args.out, "ranking": table}))
    return 0
