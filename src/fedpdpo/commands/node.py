"""``fedpdpo node``: join a federation as one participant, with its own data file (docs/deployment.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
Join a fedpdpo federation as one participant: start a Flower SuperNode configured for fedpdpo that trains this
participant's client on its own preference pairs. The pairs never leave this machine; only the shared LoRA update
does. The node keeps its model loaded for the whole run and its client's private state (personal head, reward head,
adapter, optimizer, cached reference log-probs) in --state-dir, one subdirectory per run, so a node that is stopped
and started again rejoins with its state. Stop it with Ctrl-C."""

EPILOG = """\
example (TLS; the server's operator gives you the SuperLink address, its CA certificate and your client id):
  fedpdpo node --superlink 10.0.0.5:9092 --root-certificates ca.crt --client-id 1 \\
      --data /data/our_pairs.jsonl --state-dir /var/lib/fedpdpo/state"""


def _path(text: str) -> str:
    return str(Path(text).expanduser().absolute())


def register(sub: argparse._SubParsersAction) -> None:
    node = sub.add_parser(
        "node",
        help="join a federation: this participant's node, with its own data file",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    node.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address (Fleet API)")
    tls = node.add_mutually_exclusive_group(required=True)
    tls.add_argument(
        "--root-certificates",
        type=_path,
        metavar="CA_CERT",
        help="CA certificate that signed the SuperLink's TLS certificate (from the server's operator)",
    )
    tls.add_argument(
        "--insecure", action="store_true", help="no TLS: only for a SuperLink on this machine or a trusted test network"
    )
    node.add_argument(
        "--client-id",
        type=int,
        metavar="N",
        help="this participant's client id, 0..num_clients-1, agreed with the server's operator: it names the "
        "client's rows in the results and seeds its randomness",
    )
    node.add_argument(
        "--data",
        type=_path,
        metavar="PATH",
        help="this participant's preference pairs: JSONL, parquet or a datasets directory, validated like "
        "`fedpdpo data validate` (the run config's data.fields and data.on_bad_record apply)",
    )
    node.add_argument(
        "--test",
        type=_path,
        metavar="PATH",
        help="held-out test pairs (default: the records of --data whose split is data.test_split, else a seeded "
        "data.test_fraction of them)",
    )
    node.add_argument(
        "--on-bad-record",
        choices=["error", "skip"],
        help="what to do with an invalid record of --data/--test: error (the node answers every message with "
        "FILE:LINE: problem) or skip (drop and count it); default: the run config's data.on_bad_record",
    )
    node.add_argument(
        "--state-dir",
        type=_path,
        metavar="DIR",
        help="where this node keeps its client's private state, in DIR/run-<run id>/client_<id>/ (default: the "
        "directory the server names, which only works when server and node share a disk)",
    )
    node.add_argument(
        "--auth-key",
        type=_path,
        metavar="PRIVATE_KEY",
        help="node authentication: this node's private key, whose public key the operator registered with "
        "`flwr supernode register` (needs --root-certificates)",
    )
    node.add_argument(
        "--partition-id",
        type=int,
        metavar="N",
        help="instead of --client-id/--data: serve partition N of the run config's shared data.path (which must "
        "exist on this machine), as a simulation does",
    )
    node.add_argument(
        "--runtime-port",
        type=int,
        default=0,
        metavar="PORT",
        help="port of the SuperNode's local Runtime API on 127.0.0.1 (default: a free one)",
    )
    node.set_defaults(func=cmd_node)


def cmd_node(args: argparse.Namespace) -> int:
    from fedpdpo.engines.flower.node import NodeSpec, run_node

    spec = NodeSpec(
        superlink=args.superlink,
        root_certificates=args.root_certificates or "",
        client_id=args.client_id,
        data=args.data or "",
        test=args.test or "",
        on_bad_record=args.on_bad_record or "",
        partition_id=args.partition_id,
        state_dir=args.state_dir or "",
        auth_key=args.auth_key or "",
        runtime_port=args.runtime_port,
    )
    return run_node(spec)
