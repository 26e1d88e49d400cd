"""``fedpdpo data validate`` and ``fedpdpo data inspect``: check and describe data files without training."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="data tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    validate = data_sub.add_parser("validate", help="check data files; prints FILE:LINE: problem lines")
    validate.add_argument("files", nargs="+")
    validate.add_argument("--config", help="TOML run config whose data.fields (column mapping) applies")
    validate.set_defaults(func=cmd_validate)
    register_inspect(data_sub)


def cmd_validate(args: argparse.Namespace) -> int:
    from fedpdpo.config import load_config
    from fedpdpo.data import check_file
    from fedpdpo.errors import DataError

    fields = load_config(args.config).data.fields if args.config else None
    found = 0
    for path in args.files:
        problems = check_file(path, fields)
        for line in problems:
            print(line)
        found += len(problems)
        if not problems:
            print(f"{path}: ok", file=sys.stderr)
    if found:
        raise DataError(f"{found} problem(s) in the data (listed above as FILE:LINE: problem)")
    return 0


def register_inspect(data_sub: argparse._SubParsersAction) -> None:
    inspect = data_sub.add_parser(
        "inspect",
        help="counts, token lengths, domains, duplicates, problems and a partition preview of a data file",
        description="Describe a preference data file before training. Validation is the same as in training; "
        "with --partition CONFIG the file is partitioned as that config would (its data.path replaced by FILE).",
    )
    inspect.add_argument("file", help="JSONL, parquet or Hugging Face datasets directory")
    inspect.add_argument("--partition", metavar="CONFIG", help="TOML run config whose partition to preview")
    inspect.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    inspect.add_argument("--model", help="whose tokenizer counts tokens (default: the config's model, else smollm2)")
    inspect.add_argument("--json", metavar="PATH", help="also write the report as JSON ('-' for stdout only)")
    inspect.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedpdpo.client.state import atomic_write
    from fedpdpo.config import load_config
    from fedpdpo.data.inspect import inspect_data, render_report
    from fedpdpo.errors import ConfigError
    from fedpdpo.jsonio import dumps
    from fedpdpo.model.backbone import load_backbone
    from fedpdpo.rundir import check_file_target

    if args.set and not args.partition:
        raise ConfigError("--set needs --partition CONFIG")
    if args.json not in (None, "-"):
        check_file_target(Path(args.json), "--json")
    cfg = load_config(args.partition, args.set) if args.partition else None
    model = args.model or (cfg.model if cfg else "smollm2")
    tokenizer = load_backbone(model)[1]
    report = inspect_data(args.file, tokenizer, cfg) | {"tokenizer": model}
    if args.json == "-":
        print(dumps(report, indent=2))
        return 0
    Console().print(render_report(report))
    if args.json:
        atomic_write(Path(args.json), lambda p: Path(p).write_text(dumps(report, indent=2) + "\n", encoding="utf-8"))
    return 0
