"""``fedpdpo data validate``: check data files without training."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="data tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    validate = data_sub.add_parser("validate", help="check data files; prints FILE:LINE: problem lines")
    validate.add_argument("files", nargs="+")
    validate.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
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
