"""``fedpdpo tune``: a grid of config variants over seeds, chosen on validation pairs (see :mod:`fedpdpo.tune`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedpdpo.commands.compare import add_run_options, run_options
from fedpdpo.jsonio import dumps


def register(sub: argparse._SubParsersAction) -> None:
    tune = sub.add_parser(
        "tune",
        help="run a grid of config variants over seeds and choose one on the clients' validation pairs",
        description="Each variant (one combination of the --grid values) is a `fedpdpo compare` of one algorithm "
        "over the seeds, in OUT/<variant>/. The variant whose clients rank their own validation pairs best wins; "
        "test accuracies are reported beside it, never used. Finished runs are skipped, so re-running resumes.",
    )
    tune.add_argument("--config", required=True, help="TOML config file shared by all runs")
    tune.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="KEY=V1,V2,...",
        help="a config key and its values (TOML literals; commas inside [] or quotes stay in a value); repeat for "
        "more keys, every combination runs",
    )
    tune.add_argument("--algorithm", default="fedpdpo", help="the algorithm tuned (default: fedpdpo)")
    add_run_options(tune)
    tune.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    from fedpdpo.rundir import locked_dir
    from fedpdpo.tune import parse_grid, run_tune

    seeds = run_options(args)
    grid = parse_grid(args.grid)
    with locked_dir(Path(args.out)):  # one sweep per directory; each variant's runs also lock their own
        tune = run_tune(args.config, grid, args.algorithm, seeds, args.out, args.set or [], args.quiet, args.jobs)
    chosen = next(v for v in tune["variants"] if v["name"] == tune["chosen"])
    print(dumps({"out": args.out, "chosen": chosen["sets"], "validation_score": chosen["validation_score"]}))
    return 0
