"""``fedpdpo config show``: the resolved run config, every default spelled out."""

from __future__ import annotations

import argparse
import sys

from fedpdpo.errors import FedPDPOError


def register(sub: argparse._SubParsersAction) -> None:
    config = sub.add_parser("config", help="config tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser(
        "show",
        help="print the resolved config as TOML, with every default",
        description="Print the config a run would use: the file's settings, the --set overrides and every key the "
        "file leaves out at its default, as TOML (what `fedpdpo run` saves as OUT/config.toml). Without --config: "
        "the defaults. Relative data paths are shown made absolute, with the text as given in comments.",
    )
    show.add_argument("--config", help="TOML run config to resolve (default: none, show the defaults)")
    show.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    show.set_defaults(func=cmd_show)


def cmd_show(args: argparse.Namespace) -> int:
    from fedpdpo.config import RunConfig, dump_config, load_config

    if args.config:
        cfg = load_config(args.config, args.set or [])
    elif args.set:
        raise FedPDPOError("--set needs --config FILE (a config without data.path cannot be resolved)")
    else:
        cfg = RunConfig()
    sys.stdout.write(dump_config(cfg))
    return 0
