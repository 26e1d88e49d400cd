"""``fedpdpo report``: report.md, comparison.json and plots of one finished run or a comparison of several."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedpdpo.errors import FedPDPOError
from fedpdpo.timing import phase


def register(sub: argparse._SubParsersAction) -> None:
    rep = sub.add_parser(
        "report",
        help="write report.md and plots of one finished run, or a comparison of several",
        description="One run: its clients' results, accuracy and training loss by round (plots titled with the "
        "run). Several: a comparison of their algorithms over seeds, with a fairness check. The sections of "
        "`fedpdpo evaluate` are included where it was run.",
    )
    rep.add_argument("runs", nargs="+", help="run directories, or directories holding runs (searched recursively)")
    rep.add_argument("--out", help="where to write the report (default: the only RUN_DIR given)")
    rep.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from fedpdpo.report.compare import find_runs, write_report
    from fedpdpo.rundir import locked_dir

    if args.out is None and len(args.runs) > 1:
        raise FedPDPOError("several run directories given: say where the report goes with --out")
    out = Path(args.out or args.runs[0])
    runs = find_runs(args.runs)
    with locked_dir(out), phase("report"):  # not while a run or another report writes there
        write_report(runs, out)
    print(out / "report.md")
    return 0
