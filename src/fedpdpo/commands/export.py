"""``fedpdpo export``: write a client's model as a PEFT adapter directory plus its local modules."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export",
        help="export a client's model: PEFT adapter + local modules (+ merged model)",
        description="Write the shared LoRA of a finished run as a standard PEFT adapter directory (loadable with "
        "peft.PeftModel.from_pretrained on the same base model), the client's local modules (personalized head, "
        "reward head, adapter) next to it and a model card (README.md: provenance, metrics, how to load it and build "
        "prompts without fedpdpo); fedpdpo.load_personalized(ADIR) rebuilds the client's full model.",
    )
    export.add_argument("--run", required=True, help="the --out directory of a finished `fedpdpo run`")
    export.add_argument("--client", type=int, required=True, help="client id (0-based)")
    export.add_argument("--out", required=True, help="directory to write (must be new or empty)")
    export.add_argument(
        "--merged",
        action="store_true",
        help="also write OUT/merged/, a plain causal LM (save_pretrained): LoRA merged in, plus the personalized "
        "head when the client has no bottleneck adapter (else it is the global model; see docs/tutorial.md)",
    )
    export.add_argument(
        "--save-base",
        action="store_true",
        help="also copy the exact base model to OUT/base/ (always done for 'tiny'); adapter_config.json then names it "
        "by the relative path 'base', so the export loads offline wherever it is moved (without: the Hub id)",
    )
    export.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    export.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from fedpdpo.export import export_client

    result = export_client(
        args.run, args.client, args.out, merged=args.merged, save_base=args.save_base, overwrite=args.overwrite
    )
    print(json.dumps({"out": str(result.out), "merged": result.merged or None, "files": result.files}))
    return 0
