"""``fedpdpo deploy``: files for running fedpdpo on a real Flower deployment (see docs/deployment.md).

``fedpdpo run --engine flower-deploy`` tries a deployment on one machine; a real one is started by hand, one
process per machine, and these subcommands write what those commands need.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedpdpo.errors import FedPDPOError


def register(sub: argparse._SubParsersAction) -> None:
    deploy = sub.add_parser("deploy", help="files for a multi-machine Flower deployment (docs/deployment.md)")
    dsub = deploy.add_subparsers(dest="deploy_command", required=True)
    app = dsub.add_parser("app", help="write the Flower app project that `flwr run DIR CONNECTION` submits")
    app.add_argument("dir", help="directory to write pyproject.toml into")
    app.set_defaults(func=cmd_app)
    certs = dsub.add_parser("certs", help="write a CA and a SuperLink TLS certificate (for test federations)")
    certs.add_argument("dir", help="directory for ca.crt, server.pem, server.key")
    certs.add_argument(
        "--host", action="append", required=True, help="SuperLink IP address or DNS name the nodes use (repeatable)"
    )
    certs.add_argument("--days", type=int, default=30, help="validity in days (default 30)")
    certs.set_defaults(func=cmd_certs)


def cmd_app(args: argparse.Namespace) -> int:
    from fedpdpo.engines.flower.deploy import write_flower_app
    from fedpdpo.rundir import check_out_path

    check_out_path(Path(args.dir), "deploy app")
    path = write_flower_app(Path(args.dir).resolve())
    print(json.dumps({"app": str(path), "pyproject": str(path / "pyproject.toml")}))
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from fedpdpo.engines.flower.certs import make_certs
    from fedpdpo.rundir import check_out_path

    check_out_path(Path(args.dir), "deploy certs")
    if args.days < 1:
        raise FedPDPOError(f"--days must be at least 1, got {args.days}")
    if bad := [h for h in args.host if not 0 < len(h.strip()) <= 64]:
        raise FedPDPOError(f"--host {bad[0]!r}: give an IP address or DNS name of 1 to 64 characters")
    files = make_certs(Path(args.dir).resolve(), tuple(args.host), days=args.days)
    print(json.dumps({k: str(v) for k, v in vars(files).items()}))
    return 0
